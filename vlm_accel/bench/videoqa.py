"""Video Q&A accuracy retained vs budget, per method, on local clips + a JSONL of questions.

Frames are sampled uniformly (``--frames``) and given to the model as images in one prompt, so every supported
family runs the same way. ``--task`` names the question file by lmms-eval task name inside ``--data-dir``
(``videomme.jsonl``, ``mvbench.jsonl``, ``mlvu.jsonl`` ... in ``{video, question, answer[, type]}`` form, video
paths relative to the file); ``--task synthetic`` writes and uses seeded clips of moving / appearing shapes.

    vlm-accel bench videoqa --task synthetic --n 40
    vlm-accel bench videoqa --task videomme --data-dir ~/data/lmms --model DIR
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

from .common import environment, format_table, write_results
from .vqa import BUDGETS, plot, summarize

logger = logging.getLogger(__name__)


def load_items(path: str | Path, n: int, frames: int) -> list[dict]:
    """``[{frames: [PIL], question, answer, type}]`` from a JSONL whose ``video`` paths are relative to it."""
    from ..video import load

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such question file")
    items = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            clip = load(path.parent / rec["video"], num_frames=frames)
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}:{line_no}: expected JSON with video, question, answer ({e})") from e
        items.append(
            {
                "frames": clip.images(),
                "question": rec["question"],
                "answer": str(rec["answer"]),
                "type": rec.get("type", rec.get("task", "all")),
            }
        )
        if len(items) >= n:
            break
    if not items:
        raise ValueError(f"{path}: no questions")
    return items


@torch.no_grad()
def answer(model, processor, frames, question: str, max_new_tokens: int = 8) -> str:
    content = [{"type": "image"} for _ in frames] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=frames, text=prompt, return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def score(model, processor, items, desc: str) -> list[int]:
    from ..zoo import normalize_answer

    hits = []
    for it in tqdm(items, desc=desc, leave=False, file=sys.stderr):
        pred = answer(model, processor, it["frames"], it["question"])
        hits.append(int(normalize_answer(pred) == normalize_answer(it["answer"])))
    return hits


def run(model, processor, items, methods, budgets=BUDGETS, out_dir="eval/results", name="videoqa", meta=None):
    full = score(model, processor, items, "full budget")
    rows = [summarize(items, full, full, "none", 1.0)]
    for method, budget in tqdm(
        [(m, b) for m in methods for b in budgets if b != 1.0], desc="methods x budgets", file=sys.stderr
    ):
        with vlm_accel.accelerate(model, budget=budget, method=method):
            rows.append(summarize(items, score(model, processor, items, f"{method}@{budget}"), full, method, budget))
    meta = {"benchmark": "videoqa", "env": environment(str(model.device)), **(meta or {})}
    write_results(out_dir, name, meta, rows)
    print(
        format_table(
            rows,
            ["method", "budget", "accuracy", "retained_pct"]  # noqa: T201
            + [k for k in rows[0] if k.startswith("acc_")],
        )
    )
    plot(rows, Path(out_dir) / f"{name}.png")
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="synthetic", help="synthetic, or a question file name in --data-dir")
    p.add_argument("--data-dir", default="eval/videoqa_data")
    p.add_argument("--model", default=None, help="local model directory (default: the embedded model)")
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=vlm_accel.methods())
    p.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="eval/results")
    p.add_argument("--name", default=None)


def cli(a: argparse.Namespace) -> int:
    from ..loading import load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    data = Path(a.data_dir)
    if a.task == "synthetic":
        from ..video.synthetic import write_clips

        qfile = write_clips(data / "synthetic", n=a.n, frames=a.frames)
    else:
        qfile = data / f"{a.task}.jsonl"
    items = load_items(qfile, a.n, a.frames)
    model, processor = load_model(a.model)
    run(
        model,
        processor,
        items,
        a.methods,
        a.budgets,
        a.out,
        a.name or f"videoqa_{a.task}",
        meta={
            "task": a.task,
            "questions": str(qfile),
            "frames": a.frames,
            "model": a.model or "default",
            "command": "vlm-accel bench videoqa " + " ".join(sys.argv[3:]),
        },
    )
    return 0
