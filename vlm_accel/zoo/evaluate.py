"""Held-out accuracy of the default VLM through the standard processor → generate flow, per question type.

python -m vlm_accel.zoo.evaluate --n 1000 --seed 0 [--model DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from . import build_prompt, load_default
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    model, processor = load_default(args.model)
    t0 = time.time()
    res = evaluate(model, processor, args.n, args.seed, args.batch)
    res["seconds"] = round(time.time() - t0, 1)
    for k, v in res["per_type"].items():
        log.info("%-7s %6.1f %%  (n=%d)", k, 100 * v, res["per_type_n"][k])
    log.info("overall %6.1f %%  (n=%d, %.0f s)", 100 * res["overall"], res["n"], res["seconds"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
