"""Video Q&A accuracy retained vs budget, per method, on local clips + a JSONL of questions.

Frames are sampled uniformly (``--frames``). A model with a video input (LLaVA-OneVision, Qwen-VL) gets them through
it (``pixel_values_videos``) and is measured on the full video matrix (:func:`run_video`): every method at each
budget per frame and per clip (``Budget(video="clip")``), the frame cache at several thresholds (frames encoded vs
answers changed) and the streaming session at token bounds of a fraction of the clip's tokens. An image-only model
gets the frames as images in one prompt (:func:`run`). ``--task`` names the question file by lmms-eval task name
inside ``--data-dir`` (``videomme.jsonl``, ``mvbench.jsonl``, ``mlvu.jsonl`` ... in ``{video, question, answer[,
type]}`` form, video paths relative to the file); ``--task synthetic`` writes and uses the held-out clips of
:mod:`vlm_accel.zoo.clips` (six question types).

    vlm-accel bench videoqa --task synthetic --n 300 --budgets 1.0 0.5 0.25 0.1
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

from .common import environment, format_table, tower_memo, write_results
from .vqa import BUDGETS, plot, summarize

logger = logging.getLogger(__name__)
VIDEO_METHODS = ["temporal", "tome", "divprune", "visionzip", "random", "pool"]
VIDEO_BUDGETS = [1.0, 0.5, 0.25, 0.1]


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
    """Greedy answer: through the model's video input when it has one, else the frames as images in one prompt."""
    from ..zoo import ask, has_video_input

    if has_video_input(model, processor):
        return ask(model, processor, frames, question, max_new_tokens=max_new_tokens, num_frames=len(frames))
    content = [{"type": "image"} for _ in frames] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=frames, text=prompt, return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def predict(model, processor, items, desc: str, on_item=None) -> list[str]:
    """Normalised predictions, one per item; ``on_item()`` is called after each (to read per-item stats)."""
    from ..zoo import normalize_answer

    preds = []
    for it in tqdm(items, desc=desc, leave=False, file=sys.stderr):
        preds.append(normalize_answer(answer(model, processor, it["frames"], it["question"])))
        if on_item is not None:
            on_item()
    return preds


def score(model, processor, items, desc: str) -> list[int]:
    from ..zoo import normalize_answer

    preds = predict(model, processor, items, desc)
    return [int(p == normalize_answer(it["answer"])) for p, it in zip(preds, items, strict=True)]


def video_tokens(model, processor, frames) -> int:
    """Visual tokens of one clip through the model's video input (placeholders in the prompt)."""
    from ..zoo import build_prompt

    inputs = processor(videos=[frames], text=build_prompt(processor, "x", "video"), return_tensors="pt")
    cfg = model.config
    token = getattr(cfg, "video_token_id", None)
    token = getattr(cfg, "video_token_index", None) if token is None else token
    return int((inputs["input_ids"] == token).sum())


def video_configs(methods, budgets, cache_thresholds, stream_fractions) -> list[tuple[str, str, float]]:
    """``(method, scope, budget)`` of every row of :func:`run_video`, the full budget first."""
    jobs = [("none", "frame", 1.0)]
    jobs += [(m, sc, b) for m in methods for b in budgets if b != 1.0 for sc in ("frame", "clip")]
    jobs += [("frame_cache", "frame_cache", th) for th in cache_thresholds]
    return jobs + [("stream", "stream", frac) for frac in stream_fractions]


def _vision_tower(model):
    inner = getattr(model, "model", model)
    return getattr(inner, "vision_tower", None) or getattr(inner, "visual", None)


@torch.no_grad()
def run_video(
    model,
    processor,
    items,
    methods,
    budgets=tuple(VIDEO_BUDGETS),
    cache_thresholds=(0.0, 0.05, 0.15),
    stream_fractions=(0.5, 0.25),
    out_dir="eval/results",
    name="videoqa",
    meta=None,
    memo: bool = True,
):
    """The video matrix on a model with a video input; rows ``{method, budget, scope, accuracy, retained_pct,
    acc_<type>...}`` (+ ``frames_encoded_pct`` / ``answers_changed`` for the frame cache, ``max_tokens`` for the
    stream). Scopes: ``frame`` (the budget applies to every frame), ``clip`` (``Budget(video="clip")``),
    ``frame_cache`` (full budget, encoder reuse at ``budget`` = threshold), ``stream`` (a :class:`StreamSession`
    bounded at ``budget`` × the clip's tokens; frames go in as images).

    Clip by clip, every configuration in turn; with ``memo`` the vision tower's output on a clip is computed once and
    reused by the configurations whose method acts after the tower (:func:`~vlm_accel.bench.common.tower_memo`;
    methods that hook or patch the tower, the frame cache and the stream run it themselves)."""
    import contextlib

    from ..control.budget import Budget
    from ..video.stream import stream
    from ..zoo import normalize_answer

    jobs = video_configs(methods, budgets, cache_thresholds, stream_fractions)
    n_clip = video_tokens(model, processor, items[0]["frames"])
    preds: dict[tuple, list[str]] = {job: [] for job in jobs}
    frames = {job: [0, 0] for job in jobs}  # frame cache: frames in, frames encoded
    tower = _vision_tower(model) if memo else None
    with tower_memo(tower) if tower is not None else contextlib.nullcontext({}) as counts:
        for it in tqdm(items, desc="clips x configurations", file=sys.stderr):
            for job in jobs:
                method, scope, b = job
                if scope == "stream":
                    with stream(model, processor, budget=1.0, max_tokens=max(1, int(b * n_clip))) as live:
                        for k, frame in enumerate(it["frames"]):
                            live.add_frame(frame, float(k))
                        preds[job].append(normalize_answer(live.ask(it["question"], max_new_tokens=8)))
                    continue
                if method == "none":
                    ctx = contextlib.nullcontext()
                elif scope == "frame_cache":
                    ctx = vlm_accel.accelerate(model, budget=1.0, frame_cache=b)
                else:
                    budget = b if scope == "frame" else Budget(visual=b, video="clip")
                    ctx = vlm_accel.accelerate(model, budget=budget, method=method)
                with ctx as sess:
                    preds[job].append(normalize_answer(answer(model, processor, it["frames"], it["question"])))
                    if scope == "frame_cache":
                        frames[job][0] += sess.stats.frames_in
                        frames[job][1] += sess.stats.frames_encoded
    gold = [normalize_answer(it["answer"]) for it in items]
    full_preds = preds[jobs[0]]
    full = [int(p == g) for p, g in zip(full_preds, gold, strict=True)]
    rows = []
    for job in jobs:
        method, scope, b = job
        hits = [int(p == g) for p, g in zip(preds[job], gold, strict=True)]
        row = {**summarize(items, hits, full, method, b), "scope": scope}
        row["answers_changed"] = sum(p != f for p, f in zip(preds[job], full_preds, strict=True))
        row["frames_encoded_pct"] = round(100 * frames[job][1] / frames[job][0], 1) if frames[job][0] else None
        row["max_tokens"] = max(1, int(b * n_clip)) if scope == "stream" else None
        rows.append(row)
    meta = {
        "benchmark": "videoqa",
        "clip_tokens": n_clip,
        "tower_memo": dict(counts),
        "env": environment(str(model.device)),
        **(meta or {}),
    }
    write_results(out_dir, name, meta, rows)
    cols = ["method", "scope", "budget", "accuracy", "retained_pct", "answers_changed"]
    print(format_table(rows, cols + [k for k in rows[0] if k.startswith("acc_")]))  # noqa: T201
    curves = [
        {**r, "method": r["method"] if r["scope"] == "frame" else f"{r['method']} (per clip)"}
        for r in rows
        if r["scope"] in ("frame", "clip")
    ]
    plot(curves, Path(out_dir) / f"{name}.png")
    return rows


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
    p.add_argument("--methods", nargs="+", default=[m for m in VIDEO_METHODS if m in vlm_accel.methods()])
    p.add_argument("--budgets", nargs="+", type=float, default=VIDEO_BUDGETS)
    p.add_argument("--cache-thresholds", nargs="*", type=float, default=[0.0, 0.05, 0.15], help="none: no cache rows")
    p.add_argument("--stream-fractions", nargs="*", type=float, default=[0.5, 0.25], help="none: no stream rows")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="eval/results")
    p.add_argument("--name", default=None)


def cli(a: argparse.Namespace) -> int:
    from ..loading import load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    from ..zoo import has_video_input

    data = Path(a.data_dir)
    if a.task == "synthetic":
        from ..zoo.clips import write_heldout_clips

        qfile = write_heldout_clips(data / "synthetic", n=a.n)
    else:
        qfile = data / f"{a.task}.jsonl"
    items = load_items(qfile, a.n, a.frames)
    model, processor = load_model(a.model)
    meta = {
        "task": a.task,
        "questions": str(qfile),
        "frames": a.frames,
        "model": a.model or "default",
        "command": "vlm-accel bench videoqa " + " ".join(sys.argv[3:]),
    }
    name = a.name or f"videoqa_{a.task}"
    if has_video_input(model, processor):
        run_video(
            model, processor, items, a.methods, a.budgets, a.cache_thresholds, a.stream_fractions, a.out, name, meta
        )
    else:
        run(model, processor, items, a.methods, a.budgets, a.out, name, meta=meta)
    return 0
