"""pytest plugin for ``scripts/transformers_suites.py``: accelerate every supported VLM right after construction.

Loaded with ``-p transformers_suites_plugin`` (``scripts/`` on ``PYTHONPATH``) into a run of transformers' own model
test files. With ``VLM_ACCEL_SUITE_BUDGET`` set (``1.0``, ``0.5``, ...) it wraps ``__init__`` of every
``...ForConditionalGeneration`` class that vlm_accel supports, so each model the tests build (directly, through
``from_pretrained`` or ``from_config``) is passed to ``vlm_accel.accelerate(model, budget=B)`` as soon as it exists.
Without the variable it changes nothing (the baseline run). With ``VLM_ACCEL_SUITE_RESULTS`` it appends one JSON line
per test: its outcome and ``accelerated``, how many models it accelerated (a test that built none compares nothing).
Never part of the default test suite.
"""

from __future__ import annotations

import functools
import json
import os

import pytest

_ENV = "VLM_ACCEL_SUITE_BUDGET"
_METHOD_ENV = "VLM_ACCEL_SUITE_METHOD"
_RESULTS_ENV = "VLM_ACCEL_SUITE_RESULTS"  # JSON lines, one per test
_count = {"n": 0, "errors": 0}
_outcome: dict = {}


def _budget() -> float | None:
    raw = os.environ.get(_ENV, "").strip()
    return float(raw) if raw else None


def _wrap_init(cls, budget: float, method: str):
    orig = cls.__init__

    @functools.wraps(orig)
    def __init__(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        if type(self) is not cls:  # a subclass: its own wrapper (or none) decides
            return
        import vlm_accel

        try:
            vlm_accel.accelerate(self, budget=budget, method=method)
        except Exception:
            _count["errors"] += 1
            raise
        _count["n"] += 1

    cls.__init__ = __init__


def pytest_configure(config):
    budget = _budget()
    if budget is None:
        return
    import transformers

    from vlm_accel.adapters import supported

    method = os.environ.get(_METHOD_ENV, "auto")
    for name in supported():
        cls = getattr(transformers, name, None)
        if cls is not None:
            _wrap_init(cls, budget, method)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _count["n"] = 0
    _count["errors"] = 0
    _outcome.clear()
    yield
    path = os.environ.get(_RESULTS_ENV)
    if path:
        row = {"test": item.nodeid, "outcome": _outcome.get("outcome", "passed"), "accelerated": _count["n"]}
        if _count["errors"]:
            row["accelerate_errors"] = _count["errors"]
        if "message" in _outcome:
            row["message"] = _outcome["message"]
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def pytest_runtest_logreport(report):
    """Per test: ``failed`` if any phase failed (``error`` in setup / teardown), ``skipped`` if the call was skipped."""
    if report.failed:
        if _outcome.get("outcome") not in ("failed", "error"):
            _outcome["outcome"] = "failed" if report.when == "call" else "error"
            crash = getattr(report.longrepr, "reprcrash", None)
            _outcome["message"] = (crash.message if crash is not None else str(report.longrepr))[:300]
    elif report.skipped and _outcome.get("outcome") is None:
        _outcome["outcome"] = "skipped"
