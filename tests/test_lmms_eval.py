"""lmms-eval runs the embedded model accelerated through ``vlm_accel.lmms_eval`` on a local task made from the
held-out split, offline, and reproduces ``vlm-accel bench vqa`` on the same questions, answer for answer.

Needs ``pip install lmms-eval`` (0.7.3 installs beside this project's pins; it imports ``filelock._api``, so it needs
``filelock<4``). Where it is not installed this file skips. Documented run (README, "lmms-eval"):
``python -m venv --system-site-packages .venv-lmms && .venv-lmms/bin/pip install lmms-eval==0.7.3 "filelock<4" &&
.venv-lmms/bin/python -m pytest -q tests/test_lmms_eval.py``.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lmms_eval") is None,
    reason="lmms-eval is not installed (pip install lmms-eval==0.7.3 'filelock<4'; see the README's lmms-eval section)",
)

ROOT = Path(__file__).resolve().parent.parent
N = 48


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "eval" / "lmms"))
    from make_task import write_task

    out = tmp_path_factory.mktemp("lmms_task")
    write_task(out, n=N, seed=0)
    return out


@pytest.mark.parametrize("budget,method", [(0.11, "visionzip"), (0.22, "divprune")])
def test_lmms_eval_reproduces_bench_vqa(task_dir, budget, method, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    import vlm_accel
    from vlm_accel import lmms_eval as plugin
    from vlm_accel.bench import vqa

    plugin.register()
    out = simple_evaluate(
        model="vlm_accel",
        model_args=f"pretrained=default,budget={budget},method={method}",
        tasks=["vlm_accel_shapes"],
        batch_size=16,
        task_manager=TaskManager("WARNING", include_path=str(task_dir)),
        log_samples=True,
    )
    samples = sorted(out["samples"]["vlm_accel_shapes"], key=lambda s: s["doc_id"])
    lmms_hits = [int(s["exact_match"]) for s in samples]
    accuracy = out["results"]["vlm_accel_shapes"]["exact_match,none"]

    model, processor = vlm_accel.load_default()
    items = vqa.load_items(str(task_dir / "questions.jsonl"), N, 0)
    with vlm_accel.accelerate(model, budget=budget, method=method):
        bench_hits = vqa.score(model, processor, items, batch=16, desc="bench")
    assert len(lmms_hits) == len(bench_hits) == N
    assert lmms_hits == bench_hits  # the same questions answered the same way
    assert accuracy == pytest.approx(sum(bench_hits) / N)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
