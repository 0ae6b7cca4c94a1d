"""Shared helpers for the benchmark runners: output files, tables, environment facts."""

from __future__ import annotations

import csv
import json
import logging
import platform
import sys
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
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_results(out_dir: str | Path, name: str, meta: dict, rows: list[dict]) -> Path:
    """Write ``name.json`` (meta + rows) and ``name.csv`` (rows) under ``out_dir``; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({**meta, "rows": rows}, indent=2, default=str))
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
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
