"""Run transformers' own model test suites with every supported model accelerated right after construction.

Checks "budget 1.0 changes nothing" with the tests transformers itself uses for LLaVA, LLaVA-NeXT, LLaVA-OneVision,
Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``ModelTesterMixin``, ``GenerationTesterMixin``, ...): each family's
``tests/models/<family>/test_modeling_<family>.py`` runs once per budget with ``transformers_suites_plugin`` loaded
(every ``...ForConditionalGeneration`` the tests build goes through ``vlm_accel.accelerate(model, budget=B)``); every
test that fails accelerated is then run again unaccelerated, so failures that are transformers' or the environment's
own are told apart from ours. Run by hand, never part of the default suite; nothing is downloaded here.

1. Prepare a test tree once (transformers' test files are not in its wheel; its sdist holds only ``tests/*.py``)::

       python scripts/transformers_suites.py prepare --git-dir TRANSFORMERS.git --rev REV \\
           [--sdist transformers-X.Y.Z.tar.gz] --out /tmp/tf-tests

   ``REV`` should match the installed transformers; the sdist's top-level ``tests/*.py`` (the common mixins) are laid
   over the git revision's when given. The test files need ``parameterized`` (``pip install --target DIR
   parameterized``; pass ``--extra-path DIR``).

2. Run::

       python scripts/transformers_suites.py run --tests-dir /tmp/tf-tests --budgets 1.0 0.5 --jobs 3 \\
           --logs /tmp/tfs-logs --out eval/results/transformers_suites.json

   ``--resume`` skips (family, budget) runs whose logs are complete; ``report`` rebuilds the JSON from the logs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FAILED = ("failed", "error")

# transformers 5.24 moved this out of testing_utils; test trees from before that still import it from there
_CONFTEST = '''"""Written by vlm-accel's scripts/transformers_suites.py prepare: compatibility of older test files."""

import transformers.testing_utils as _tu

if not hasattr(_tu, "_TEXT_MODEL_TESTER_DEFAULTS"):
    _tu._TEXT_MODEL_TESTER_DEFAULTS = %r
'''
_TEXT_DEFAULTS = {
    "batch_size": 13,
    "seq_length": 7,
    "is_training": True,
    "use_input_mask": True,
    "use_labels": True,
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 32,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "expert_interval": 1,
    "moe_layer_start_index": 0,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 36,
    "shared_expert_gate": True,
    "moe_num_shared_experts": 2,
    "num_experts_per_tok": 2,
    "num_experts": 8,
}


def test_file(family: str) -> str:
    return f"tests/models/{family}/test_modeling_{family}.py"


# --- prepare ----------------------------------------------------------------------------------------------------
def prepare(git_dir: str, rev: str, out: str, sdist: str | None) -> None:
    """Lay out ``out/tests`` from ``rev`` of a transformers git directory (only the six families' model tests)."""
    import transformers

    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    paths = ["tests", "utils/test_module", "utils/fetch_hub_objects_for_ci.py"]
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "tests.tar"
        subprocess.run(["git", f"--git-dir={git_dir}", "archive", "-o", str(tar), rev, *paths], check=True)
        keep = tuple(f"tests/models/{f}/" for f in FAMILIES)
        with tarfile.open(tar) as t:
            members = [
                m
                for m in t.getmembers()
                if not m.name.startswith("tests/models/")
                or m.name.startswith(keep)
                or (m.isfile() and m.name.count("/") == 2)
            ]
            t.extractall(dest, members=members, filter="data")
    if sdist:  # the released common mixins, over the git revision's
        with tarfile.open(sdist) as t:
            for m in t.getmembers():
                parts = m.name.split("/")
                if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py") and m.isfile():
                    (dest / "tests" / parts[2]).write_bytes(t.extractfile(m).read())
    src = dest / "src"
    src.mkdir(exist_ok=True)
    link = src / "transformers"  # test_pipeline_mixin imports src/transformers of the checkout
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(transformers.__file__).parent)
    (dest / "conftest.py").write_text(_CONFTEST % (_TEXT_DEFAULTS,))
    (dest / "SOURCE.json").write_text(
        json.dumps({"git_dir": git_dir, "rev": rev, "sdist": sdist, "transformers": transformers.__version__})
    )
    print(f"prepared {dest} from {rev} (installed transformers {transformers.__version__})")


# --- run --------------------------------------------------------------------------------------------------------
def _env(extra_path: list[str], budget: str | None, results: Path, method: str) -> dict:
    env = dict(os.environ)
    env.pop("VLM_ACCEL_SUITE_BUDGET", None)
    paths = [*extra_path, str(HERE), str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", VLM_ACCEL_SUITE_RESULTS=str(results))
    if budget is not None:
        env["VLM_ACCEL_SUITE_BUDGET"] = budget
        env["VLM_ACCEL_SUITE_METHOD"] = method
    return env


def _pytest_cmd(targets: list[str], k: str | None) -> list[str]:
    cmd = ["nice", "-n", "10", sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p"]
    cmd += ["transformers_suites_plugin", "-q", "-W", "ignore", "-o", "addopts=", *targets]
    return cmd + (["-k", k] if k else [])


def _log(logs: Path, family: str, budget: str, ext: str) -> Path:
    return logs / f"{family}_{budget}.{ext}"


def _read(path: Path) -> dict[str, dict]:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["test"]] = row
    return rows


def run(args) -> None:
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    tests_dir = Path(args.tests_dir).resolve()
    jobs = [(f, b) for b in args.budgets for f in args.families]
    running: list[tuple[subprocess.Popen, Path]] = []
    for family, budget in jobs:
        done = _log(logs, family, budget, "done")
        if args.resume and done.exists():
            continue
        while len(running) >= args.jobs:
            running = _reap(running)
            time.sleep(2)
        results = _log(logs, family, budget, "jsonl")
        results.unlink(missing_ok=True)
        env = _env(args.extra_path, budget, results, args.method)
        log = open(_log(logs, family, budget, "log"), "w")
        cmd = _pytest_cmd([test_file(family)], args.k)
        proc = subprocess.Popen(cmd, cwd=tests_dir, env=env, stdout=log, stderr=log)
        print(f"started {family} budget {budget} (pid {proc.pid})", flush=True)
        running.append((proc, done))
    while running:
        running = _reap(running)
        time.sleep(2)
    # every test that failed accelerated, once more without the plugin's acceleration
    for family in args.families:
        failed = set()
        for budget in args.budgets:
            failed |= {t for t, r in _read(_log(logs, family, budget, "jsonl")).items() if r["outcome"] in FAILED}
        results = _log(logs, family, "base", "jsonl")
        have = _read(results) if args.resume else {}
        todo = sorted(failed - set(have))
        if not args.resume:
            results.unlink(missing_ok=True)
        if not todo:
            continue
        print(f"baseline: {len(todo)} {family} tests unaccelerated", flush=True)
        env = _env(args.extra_path, None, results, args.method)
        with open(_log(logs, family, "base", "log"), "a") as log:
            targets = [t.replace(f"{tests_dir}/", "") for t in todo]
            subprocess.run(_pytest_cmd(targets, None), cwd=tests_dir, env=env, stdout=log, stderr=log)
    write_report(args, logs)


def _reap(running):
    left = []
    for proc, done in running:
        if proc.poll() is None:
            left.append((proc, done))
        else:
            done.write_text(str(proc.returncode))
            print(f"finished {done.name} (exit {proc.returncode})", flush=True)
    return left


# --- report -----------------------------------------------------------------------------------------------------
def _machine() -> dict:
    cpu = platform.processor()
    flags = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = sorted(f for f in ("avx2", "avx512f", "amx_tile") if f in have)
                break
    except OSError:
        pass
    return {"cpu": cpu, "flags": flags, "cores": os.cpu_count(), "python": platform.python_version()}


def write_report(args, logs: Path) -> None:
    import torch
    import transformers

    source = {}
    src_file = Path(args.tests_dir) / "SOURCE.json"
    if src_file.exists():
        source = json.loads(src_file.read_text())
    families = {}
    for family in args.families:
        base = _read(_log(logs, family, "base", "jsonl"))
        per_budget = {}
        for budget in args.budgets:
            rows = _read(_log(logs, family, budget, "jsonl"))
            if not rows:
                continue
            count = {o: sum(r["outcome"] == o for r in rows.values()) for o in ("passed", "failed", "error", "skipped")}
            failing = {t: r for t, r in rows.items() if r["outcome"] in FAILED}
            # a test that accelerated no model cannot fail because of us (e.g. a test file older than transformers)
            idle = sorted(t for t, r in failing.items() if r["accelerated"] == 0)
            ours = sorted(t for t in failing if base.get(t, {}).get("outcome") == "passed" and t not in idle)
            theirs = sorted(t for t in failing if base.get(t, {}).get("outcome") in (*FAILED, "skipped"))
            theirs = sorted(set(theirs) - set(idle))
            unknown = sorted(set(failing) - set(ours) - set(theirs) - set(idle))
            per_budget[budget] = {
                "tests": len(rows),
                **count,
                "ran_accelerated": sum(r["accelerated"] > 0 and r["outcome"] != "skipped" for r in rows.values()),
                "accelerated_fail_unaccelerated_pass": [
                    {"test": t.split("::", 1)[1], "message": rows[t].get("message", "")} for t in ours
                ],
                "fail_unaccelerated_too": [t.split("::", 1)[1] for t in theirs],
                "fail_without_accelerating_a_model": [t.split("::", 1)[1] for t in idle],
                "baseline_not_run": [t.split("::", 1)[1] for t in unknown],
                "complete": _log(logs, family, budget, "done").exists(),
            }
        families[family] = per_budget
    report = {
        "what": "transformers' own model tests with every supported ...ForConditionalGeneration accelerated right "
        "after construction (scripts/transformers_suites_plugin.py); a failure counts as ours only if the same "
        "test passes unaccelerated",
        "command": "python scripts/transformers_suites.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "method": args.method,
        "transformers_installed": transformers.__version__,
        "torch": torch.__version__,
        "tests_source": source,
        "k": args.k,
        "machine": _machine(),
        "families": families,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for family, per_budget in families.items():
        for budget, r in per_budget.items():
            print(
                f"{family:16s} budget {budget:>4s}: {r['passed']:4d} passed {r['failed'] + r['error']:3d} failed "
                f"{r['skipped']:4d} skipped; ours {len(r['accelerated_fail_unaccelerated_pass'])}, "
                f"theirs {len(r['fail_unaccelerated_too']) + len(r['fail_without_accelerating_a_model'])}, "
                f"unknown {len(r['baseline_not_run'])}"
            )
    print(f"wrote {out}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="lay out transformers' test files for the six families")
    pp.add_argument("--git-dir", required=True)
    pp.add_argument("--rev", required=True)
    pp.add_argument("--sdist", help="transformers sdist whose tests/*.py replace the revision's")
    pp.add_argument("--out", required=True)
    for name in ("run", "report"):
        r = sub.add_parser(name)
        r.add_argument("--tests-dir", required=True)
        r.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
        r.add_argument("--budgets", nargs="+", default=["1.0", "0.5"])
        r.add_argument("--method", default="auto")
        r.add_argument("--logs", default="transformers-suites-logs")
        r.add_argument("--out", default=str(ROOT / "eval/results/transformers_suites.json"))
        r.add_argument("--extra-path", action="append", default=[], help="added to PYTHONPATH (e.g. parameterized)")
        r.add_argument("-k", dest="k", help="pytest -k filter")
        r.add_argument("--jobs", type=int, default=1, help="families run at once")
        r.add_argument("--resume", action="store_true", help="skip runs whose logs are complete")
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.git_dir, args.rev, args.out, args.sdist)
    elif args.cmd == "run":
        run(args)
    else:
        write_report(args, Path(args.logs))


if __name__ == "__main__":
    main()
