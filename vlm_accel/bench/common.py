"""Shared helpers for the benchmark runners: output files, tables, environment facts."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def environment(device: str) -> dict:
    import transformers

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": device,
        "threads": torch.get_num_threads(),
    }
    env.update(cpu_info())
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def cpu_info() -> dict:
    """CPU model, logical cores and the vector / matrix extensions that decide CPU speed (from /proc/cpuinfo)."""
    import os

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and "cpu_model" not in info:
            info["cpu_model"] = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            info["cpu_flags"] = sorted(flags & {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
            break
    return info


def write_results(out_dir: str | Path, name: str, meta: dict, rows: list[dict]) -> Path:
    """Write ``name.json`` (meta + rows) and ``name.csv`` (rows) under ``out_dir``; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({**meta, "rows": rows}, indent=2, default=str))
    with open(out / f"{name}.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r))  # every row's keys, first-seen order
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    return path


def format_table(rows: list[dict], cols: list[str]) -> str:
    """Plain-text table of ``cols`` (floats with 3 significant decimals)."""

    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    body = [[cell(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def build_model(cls, cfg, dtype: torch.dtype, device: str):
    """Instantiate ``cls(cfg)`` directly in ``dtype`` on ``device`` (a 7B-wide model never exists in fp32)."""
    cfg._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


class SpanTimer:
    """Milliseconds between ``start``'s forward entry and ``stop``'s forward exit, summed over a forward's spans.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs at both ends so GPU work is counted."""

    def __init__(self, start: torch.nn.Module, stop: torch.nn.Module, sync=lambda: None):
        self.sync, self.t0, self.ms = sync, 0.0, 0.0
        self.handles = [start.register_forward_pre_hook(self._start), stop.register_forward_hook(self._stop)]

    def _start(self, *a):
        self.sync()
        self.t0 = time.perf_counter()

    def _stop(self, *a):
        self.sync()
        self.ms += (time.perf_counter() - self.t0) * 1e3

    def close(self):
        for h in self.handles:
            h.remove()


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and torch.equal(a, b)
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _looked_inside(tower: torch.nn.Module) -> bool:
    """Whether anything observes or replaces part of ``tower``'s computation: a hook (other than transformers' own
    output-capturing ones, which every module carries after its first forward) or an instance ``forward``."""
    for m in tower.modules():
        hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
        if any(not getattr(h, "__module__", "").startswith("transformers.") for h in hooks):
            return True
        if m is not tower and "forward" in vars(m):
            return True
    return False


@contextmanager
def tower_memo(tower: torch.nn.Module):
    """Inside the block, calling ``tower`` again on inputs bit-identical to its previous call returns the previous
    output instead of running it again.

    For benchmarks that run many configurations on one clip whose methods act after the vision tower (the tower is
    deterministic in eval mode, so the output is the one it would compute). Whenever anything inside the tower is
    hooked or patched (CLS-attention capture, ``tome_vit``, the per-patch frame cache) the tower runs as usual and
    the memo is not used, so configurations that look inside it are measured as they are. Yields ``{"hits",
    "runs"}`` counts. ``RuntimeError`` if the tower's ``forward`` is already overridden on the instance."""
    if "forward" in vars(tower):
        raise RuntimeError(f"{type(tower).__name__}.forward is already overridden on the instance; not memoizing")
    run = tower.forward
    last: dict = {}
    counts = {"hits": 0, "runs": 0}

    def forward(*args, **kwargs):
        inside = _looked_inside(tower)
        if not inside and last and _same(last["args"], args) and _same(last["kwargs"], kwargs):
            counts["hits"] += 1
            return last["out"]
        out = run(*args, **kwargs)
        counts["runs"] += 1
        last.clear()
        if not inside:
            clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731  (the caller may reuse)
            last.update(args=tuple(clone(a) for a in args), kwargs={k: clone(v) for k, v in kwargs.items()}, out=out)
        return out

    tower.forward = forward
    try:
        yield counts
    finally:
        del tower.forward


def run_main(doc: str | None, add_arguments, cli, argv=None) -> int:
    """``python -m vlm_accel.bench.NAME``: parse ``argv`` with the bench's ``add_arguments`` and run its ``cli``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return cli(p.parse_args(argv)) or 0
