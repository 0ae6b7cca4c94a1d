"""KV-cache compression on the embedded default model: bytes held, decode speed and accuracy retained.

Protocol (the hard case, as in multi-turn chat and streaming): the image is prefilled *before* the question is known
(``USER: <image>``), the KV budget is applied to that cache, then the question arrives as a second turn on the
compressed cache and the answer is decoded greedily. (With the question inside the prompt, the first answer token
comes from the exact prefill logits and one-word answers could not show any loss.) Every configuration runs on the
same held-out questions; accuracy is % of the unpatched model's; bytes are the cache really held after answering
(packed codes, scales, exact window), relative to the unpatched cache; decode speed is the median over interleaved
repeats of a 48-token greedy generation.

    python -m vlm_accel.bench.kv --n 100
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import torch

import vlm_accel
from vlm_accel import Budget

from .common import environment, format_table, write_results

logger = logging.getLogger(__name__)

CONFIGS = [
    ("unpatched", None, None),
    ("kv 0.5", Budget(kv=0.5), "vision"),
    ("kv 0.25", Budget(kv=0.25), "vision"),
    ("kv 0.1", Budget(kv=0.1), "vision"),
    ("kv 0.25 snapkv", Budget(kv=0.25), "snapkv"),
    ("kv 0.25 streaming", Budget(kv=0.25), "streaming"),
    ("4 bits", Budget(kv_bits=4), "vision"),
    ("2 bits", Budget(kv_bits=2), "vision"),
    ("2 bits + 10% at 8", Budget(kv_bits=2, kv_important=0.1), "vision"),
    ("visual 0.25 (visionzip)", Budget(visual=0.25), "vision"),
]


@torch.no_grad()
def answer_two_turns(model, processor, image, question: str, max_new_tokens: int = 4):
    """Prefill the image turn, then the question on that cache; greedy answer. Returns (text, cache)."""
    from ..zoo import build_prompt

    inputs = processor(images=[image], text=[build_prompt(processor, question)], return_tensors="pt")
    ids = inputs["input_ids"]
    cut = int((ids[0] == model.config.image_token_id).nonzero().max()) + 1
    pix = inputs["pixel_values"].to(model.dtype)
    out = model(input_ids=ids[:, :cut], attention_mask=torch.ones(1, cut, dtype=torch.long), pixel_values=pix)
    cache = out.past_key_values
    step = ids[:, cut:]
    total = ids.shape[1]
    eos = model.generation_config.eos_token_id
    tokens = []
    for _ in range(max_new_tokens):
        out = model(input_ids=step, attention_mask=torch.ones(1, total, dtype=torch.long), past_key_values=cache)
        cache = out.past_key_values
        tok = int(out.logits[0, -1].argmax())
        if tok == eos:
            break
        tokens.append(tok)
        step = torch.tensor([[tok]])
        total += 1
    return processor.tokenizer.decode(tokens, skip_special_tokens=True).strip(), cache


def _session(model, budget, press):
    return None if budget is None else vlm_accel.accelerate(model, budget=budget, method="visionzip", kv_press=press)


def _decode_speed(model, processor, item, budget, press, repeats_tokens: int = 48) -> float:
    from ..zoo import build_prompt

    inputs = processor(images=[item["image"]], text=[build_prompt(processor, item["question"])], return_tensors="pt")
    t0 = time.perf_counter()
    model.generate(**inputs, max_new_tokens=repeats_tokens, min_new_tokens=repeats_tokens, do_sample=False)
    return repeats_tokens / (time.perf_counter() - t0)


@torch.no_grad()
def run(n: int = 100, seed: int = 0, repeats: int = 3, out_dir="eval/results", name="kv_default", configs=None):
    from ..zoo import normalize_answer
    from .vqa import load_items

    model, processor = vlm_accel.load_default()
    items = load_items(None, n, seed)
    chosen = [c for c in CONFIGS if configs is None or c[0] in configs or c[0] == "unpatched"]
    rows = []
    full_hits = None
    dense = None
    for label, budget, press in chosen:
        sess = (
            None if budget is None else vlm_accel.accelerate(model, budget=budget, method="visionzip", kv_press=press)
        )
        hits, held = [], []
        try:
            for it in items:
                text, cache = answer_two_turns(model, processor, it["image"], it["question"])
                hits.append(int(normalize_answer(text) == normalize_answer(it["answer"])))
                held.append(vlm_accel.kv.nbytes(cache))
        finally:
            if sess is not None:
                sess.restore()
        if full_hits is None:
            full_hits, dense = hits, statistics.mean(held)
        acc = sum(hits) / len(hits)
        row = {
            "config": label,
            "press": press or "",
            "accuracy": acc,
            "retained_pct": 100.0 * acc / (sum(full_hits) / len(full_hits)),
            "kv_bytes": round(statistics.mean(held)),
            "kv_bytes_pct": round(100.0 * statistics.mean(held) / dense, 1),
        }
        for t in sorted({i["type"] for i in items}):
            sel = [h for h, i in zip(hits, items, strict=True) if i["type"] == t]
            row[f"acc_{t}"] = round(sum(sel) / len(sel), 3)
        logger.info("%s: %.1f %% retained, %.1f %% of the bytes", label, row["retained_pct"], row["kv_bytes_pct"])
        rows.append(row)
    speeds = {label: [] for label, _, _ in chosen}
    for _ in range(repeats):  # interleaved
        for label, budget, press in chosen:
            sess = (
                None
                if budget is None
                else vlm_accel.accelerate(model, budget=budget, method="visionzip", kv_press=press)
            )
            try:
                speeds[label].append(_decode_speed(model, processor, items[0], budget, press))
            finally:
                if sess is not None:
                    sess.restore()
    base = statistics.median(speeds["unpatched"])
    for row in rows:
        s = statistics.median(speeds[row["config"]])
        row["decode_tok_s"] = round(s, 1)
        row["decode_speed_ratio"] = round(s / base, 3)
    meta = {"command": " ".join(sys.argv), "env": environment("cpu"), "n": n, "protocol": __doc__.split("\n\n")[1]}
    path = write_results(out_dir, name, meta, rows)
    _plot(rows, path.with_suffix(".png"))
    print(format_table(rows, ["config", "retained_pct", "kv_bytes_pct", "decode_tok_s", "decode_speed_ratio"]))
    return rows


def _plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["kv_bytes_pct"], r["retained_pct"])
        ax.annotate(r["config"], (r["kv_bytes_pct"], r["retained_pct"]), fontsize=7)
    ax.set_xlabel("KV bytes held (% of the unpatched cache)")
    ax.set_ylabel("% of full accuracy (question after the image)")
    ax.set_title("KV compression on the embedded default")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="eval/results")
    p.add_argument("--name", default="kv_default")
    p.add_argument("--configs", nargs="+", default=None, help="labels of CONFIGS to run (default: all)")


def cli(a: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    run(a.n, a.seed, a.repeats, a.out, a.name, a.configs)
    return 0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cli(p.parse_args(argv))


if __name__ == "__main__":
    main()
