"""Held-out accuracy of the default VLM through the standard processor → generate flow, per question type.

python -m vlm_accel.zoo.evaluate --n 1000 --seed 0 [--model DIR] [--json out.json]              # images
python -m vlm_accel.zoo.evaluate --clips 300 --n 0 --model DIR [--json out.json]                # clips only
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from . import build_prompt, has_video_input, load_default
from .render import heldout, normalize_answer

log = logging.getLogger(__name__)


@torch.no_grad()
def answer_batch(model, processor, images, questions_: list[str], max_new_tokens: int = 4) -> list[str]:
    """Greedy answers for a batch of (image, question) pairs; left padding, one image per prompt."""
    prompts = [build_prompt(processor, q) for q in questions_]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [s.strip() for s in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]


def evaluate(model, processor, n: int = 1000, seed: int = 0, batch: int = 16) -> dict:
    """Exact-match accuracy (after :func:`normalize_answer`) on ``heldout(n, seed)``; returns per-type and overall."""
    items = list(heldout(n, seed))
    hits: dict[str, list[int]] = {}
    wrong = []
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        preds = answer_batch(model, processor, [it["image"] for it in chunk], [it["question"] for it in chunk])
        for it, p in zip(chunk, preds, strict=True):
            ok = normalize_answer(p) == normalize_answer(it["answer"])
            hits.setdefault(it["type"], []).append(int(ok))
            if not ok:
                wrong.append({"scene": it["scene"], "question": it["question"], "answer": it["answer"], "pred": p})
    res = {
        "n": len(items),
        "seed": seed,
        "per_type": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
        "per_type_n": {k: len(v) for k, v in sorted(hits.items())},
        "overall": sum(sum(v) for v in hits.values()) / len(items),
        "wrong_examples": wrong[:20],
    }
    return res


@torch.no_grad()
def answer_clips(model, processor, clips, questions_: list[str], max_new_tokens: int = 4) -> list[str]:
    """Greedy answers for a batch of (clip frames, question) pairs through the model's video input."""
    from PIL import Image

    prompts = [build_prompt(processor, q, "video") for q in questions_]
    processor.tokenizer.padding_side = "left"
    videos = [[Image.fromarray(f) for f in c] for c in clips]
    inputs = processor(videos=videos, text=prompts, return_tensors="pt", padding=True).to(model.device)
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [s.strip() for s in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]


def evaluate_clips(model, processor, n: int = 300, seed: int = 0, batch: int = 8, frames: int = 8) -> dict:
    """Exact-match accuracy on ``heldout_clips(n, seed)`` (8 uniformly sampled frames), per question type."""
    from .clips import heldout_clips

    if not has_video_input(model, processor):
        raise ValueError(f"{type(model).__name__} has no video input; evaluate a llava_onevision model (--model DIR)")
    items = list(heldout_clips(n, seed, frames=frames))
    hits: dict[str, list[int]] = {}
    wrong = []
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        preds = answer_clips(model, processor, [it["frames"] for it in chunk], [it["question"] for it in chunk])
        for it, p in zip(chunk, preds, strict=True):
            ok = normalize_answer(p) == normalize_answer(it["answer"])
            hits.setdefault(it["type"], []).append(int(ok))
            if not ok:
                wrong.append({"clip": it["clip"], "question": it["question"], "answer": it["answer"], "pred": p})
    return {
        "n": len(items),
        "seed": seed,
        "frames": frames,
        "per_type": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
        "per_type_n": {k: len(v) for k, v in sorted(hits.items())},
        "overall": sum(sum(v) for v in hits.values()) / len(items),
        "wrong_examples": wrong[:30],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="held-out image questions (0: none)")
    ap.add_argument("--clips", type=int, default=0, help="held-out clip questions (needs a model with video input)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    model, processor = load_default(args.model)
    out = {"command": "python -m vlm_accel.zoo.evaluate " + " ".join(sys.argv[1:]), "model": args.model or "default"}
    for name, n, fn in (("images", args.n, evaluate), ("clips", args.clips, evaluate_clips)):
        if not n:
            continue
        t0 = time.time()
        res = fn(model, processor, n, args.seed, args.batch if name == "images" else max(1, args.batch // 2))
        res["seconds"] = round(time.time() - t0, 1)
        for k, v in res["per_type"].items():
            log.info("%-6s %-9s %6.1f %%  (n=%d)", name, k, 100 * v, res["per_type_n"][k])
        log.info("%-6s overall   %6.1f %%  (n=%d, %.0f s)", name, 100 * res["overall"], res["n"], res["seconds"])
        out[name] = res
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
