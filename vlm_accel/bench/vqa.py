"""Accuracy retained vs visual-token budget on a VQA set, per method.

Runs the model unpatched (the full-budget reference) and accelerated for every method x budget on the same cases;
accuracy is normalised exact match, reported as % of the full-budget accuracy, overall and per question type.

    vlm-accel bench vqa                       # embedded default model on its held-out split
    vlm-accel bench vqa --data my.jsonl --model DIR   # any {image, question, answer[, type]} JSONL
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import vlm_accel

from .common import environment, format_table, run_main, write_results

logger = logging.getLogger(__name__)

BUDGETS = [1.0, 0.33, 0.22, 0.11]


def load_items(data: str | None, n: int, seed: int) -> list[dict]:
    """``[{image (PIL), question, answer, type}]``: the default model's held-out split, or a JSONL file whose image
    paths are relative to the file."""
    from ..zoo import heldout, load_image

    if data is None:
        return list(heldout(n, seed))
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"--data {data}: no such JSONL file")
    items = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                image = load_image(path.parent / rec["image"])
                items.append(
                    {
                        "image": image,
                        "question": rec["question"],
                        "answer": str(rec["answer"]),
                        "type": rec.get("type", "all"),
                    }
                )
            except (KeyError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}:{line_no}: expected JSON with image, question, answer ({e})") from e
            if len(items) >= n:
                break
    if not items:
        raise ValueError(f"{path}: no questions")
    return items


def score(model, processor, items: list[dict], batch: int, desc: str) -> list[int]:
    """1/0 per item: normalised prediction == normalised answer."""
    from ..zoo import normalize_answer
    from ..zoo.evaluate import answer_batch

    hits = []
    for s in tqdm(range(0, len(items), batch), desc=desc, leave=False, file=sys.stderr):
        chunk = items[s : s + batch]
        preds = answer_batch(model, processor, [it["image"] for it in chunk], [it["question"] for it in chunk])
        hits += [int(normalize_answer(p) == normalize_answer(it["answer"])) for it, p in zip(chunk, preds, strict=True)]
    return hits


def summarize(items, hits, full_hits, method, budget) -> dict:
    acc = sum(hits) / len(hits)
    full = sum(full_hits) / len(full_hits)
    row = {
        "method": method,
        "budget": budget,
        "n": len(hits),
        "accuracy": acc,
        "retained_pct": 100.0 * acc / full if full else float("nan"),
    }
    for t in sorted({it["type"] for it in items}):
        sel = [h for h, it in zip(hits, items, strict=True) if it["type"] == t]
        row[f"acc_{t}"] = sum(sel) / len(sel)
    return row


@torch.no_grad()
def run(
    model, processor, items, methods, budgets=BUDGETS, batch=16, out_dir="eval/results", name="vqa_default", meta=None
) -> list[dict]:
    full_hits = score(model, processor, items, batch, "full budget")
    rows = [summarize(items, full_hits, full_hits, "none", 1.0)]
    configs = [(m, b) for m in methods for b in budgets if b != 1.0]
    for method, budget in tqdm(configs, desc="methods x budgets", file=sys.stderr):
        with vlm_accel.accelerate(model, budget=budget, method=method):
            hits = score(model, processor, items, batch, f"{method}@{budget}")
        rows.append(summarize(items, hits, full_hits, method, budget))
        logger.info("%s @ %s: %.1f %% retained", method, budget, rows[-1]["retained_pct"])
    meta = {
        "benchmark": "vqa",
        "env": environment(str(model.device)),
        "command": "vlm-accel bench vqa " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        **(meta or {}),
    }
    write_results(out_dir, name, meta, rows)
    cols = ["method", "budget", "accuracy", "retained_pct"] + [k for k in rows[0] if k.startswith("acc_")]
    print(format_table(rows, cols))  # noqa: T201
    plot(rows, Path(out_dir) / f"{name}.png")
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in rows} - {"none"}):
        pts = sorted((r["budget"], r["retained_pct"]) for r in rows if r["method"] == method)
        style = "--" if method in ("random", "pool") else "-"
        ax.plot(*zip(*pts + [(1.0, 100.0)], strict=True), style, marker="o", label=method)
    ax.set_xlabel("fraction of visual tokens kept")
    ax.set_ylabel("% of full-budget accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="JSONL of {image, question, answer[, type]} (default: held-out)")
    p.add_argument("--model", default=None, help="local model directory (default: the embedded model)")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=vlm_accel.methods())
    p.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="eval/results")
    p.add_argument("--name", default="vqa_default")


def cli(a: argparse.Namespace) -> int:
    from ..loading import load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    items = load_items(a.data, a.n, a.seed)
    model, processor = load_model(a.model)
    run(
        model,
        processor,
        items,
        a.methods,
        a.budgets,
        a.batch,
        a.out,
        a.name,
        meta={"data": a.data or f"default held-out split (n={a.n}, seed={a.seed})", "model": a.model or "default"},
    )
    return 0


def main(argv=None) -> int:
    return run_main(__doc__, add_arguments, cli, argv)


if __name__ == "__main__":
    sys.exit(main())
