"""KV-cache compression on the embedded default model: bytes held, peak KV, decode speed and accuracy retained.

Two protocols, each a full set of rows (``protocol`` column); in both the answer is decoded from the compressed
cache alone, never from the exact prefill logits:

- ``question in prompt`` (standard, SnapKV's setting; kvpress's query-aware one): ``USER: <image> question`` is
  prefilled and compressed with the question inside the observation window, then the generation header
  (``ASSISTANT:``) and the answer are decoded on the compressed cache.
- ``question after image`` (hard, as in multi-turn chat and streaming): ``USER: <image>`` is prefilled and compressed
  before the question is known; the question arrives as a second turn on the compressed cache.

Every configuration runs on the same held-out questions, greedy. Accuracy is % of the unpatched model's under the
same protocol. ``kv_bytes``: the cache really held after answering (packed codes, scales, exact window);
``peak_kv_bytes``: the most the cache held at any moment of the request (read right after every attention module
ran, before the press evicts from that layer: the prefill peak is the full cache of one layer plus the compressed
ones before it); both as % of the unpatched cache. Decode speed: the median over interleaved repeats of a 48-token
greedy ``generate`` (question in the prompt), the same value in both row sets.

    python -m vlm_accel.bench.kv --n 200
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import time

import torch

import vlm_accel
from vlm_accel import Budget

from ..kv.presses import VisionAwarePress
from ..kv.quant import nbytes
from ..llm.layout import cache_arg
from .common import environment, format_table, run_main, write_results

logger = logging.getLogger(__name__)

CONFIGS = [  # label, budget, press
    ("unpatched", None, None),
    ("kv 0.5", Budget(kv=0.5), "vision"),
    ("kv 0.25", Budget(kv=0.25), "vision"),
    ("kv 0.1", Budget(kv=0.1), "vision"),
    ("kv 0.25 vision relevant=1 (SnapKV ranking)", Budget(kv=0.25), VisionAwarePress(relevant=1.0)),
    ("kv 0.1 vision relevant=1 (SnapKV ranking)", Budget(kv=0.1), VisionAwarePress(relevant=1.0)),
    ("kv 0.25 snapkv", Budget(kv=0.25), "snapkv"),
    ("kv 0.25 h2o", Budget(kv=0.25), "h2o"),
    ("kv 0.25 streaming", Budget(kv=0.25), "streaming"),
    ("4 bits", Budget(kv_bits=4), "vision"),
    ("2 bits", Budget(kv_bits=2), "vision"),
    ("2 bits + 10% at 8", Budget(kv_bits=2, kv_important=0.1), "vision"),
    ("visual 0.25 (visionzip)", Budget(visual=0.25), "vision"),
    ("visual 0.1 (visionzip)", Budget(visual=0.1), "vision"),
]
PROTOCOLS = ("question in prompt", "question after image")


def _split(processor, ids: torch.Tensor, image_token_id: int, protocol: str) -> int:
    """Tokens of ``ids`` ``[1, L]`` prefilled (and compressed) before the rest is fed on the cache."""
    if protocol == "question after image":
        return int((ids[0] == image_token_id).nonzero().max()) + 1
    if protocol == "question in prompt":  # all but the generation header
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
        tok = processor.tokenizer
        with_header, without = (
            len(tok(processor.apply_chat_template(conv, add_generation_prompt=g))["input_ids"]) for g in (True, False)
        )
        return ids.shape[1] - (with_header - without)
    raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")


class _TowerMemo:
    """While installed, the vision tower's output for item ``key`` is computed once and reused: for configurations
    that leave the tower alone (no visual budget) the same pixels give the same features, and the tower is most of
    the accuracy loop's time. Configurations with a visual budget run without it."""

    def __init__(self, model):
        self.tower = model.model.vision_tower
        self.memo, self.key = {}, None

    def __enter__(self):
        orig = self.tower.forward

        def forward(*args, **kwargs):
            if self.key not in self.memo:
                self.memo[self.key] = orig(*args, **kwargs)
            return self.memo[self.key]

        self.tower.forward = forward
        return self

    def __exit__(self, *exc):
        del self.tower.forward


class _PeakKV:
    """Largest ``nbytes(cache)`` seen right after any attention module of ``model`` ran while installed (before the
    KV press evicts from that layer: its hook runs later)."""

    def __init__(self, model):
        self.peak = 0
        layers = model.model.language_model.layers
        self._hooks = [
            layer.self_attn.register_forward_hook(self._after, with_kwargs=True, prepend=True) for layer in layers
        ]

    def _after(self, module, args, kwargs, output):
        cache = cache_arg(kwargs)
        if cache is not None:
            self.peak = max(self.peak, nbytes(cache))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


@torch.no_grad()
def answer_on_cache(model, processor, inputs, protocol: str, max_new_tokens: int = 4):
    """Prefill (and compress) the first part of the prompt, feed the rest on that cache, answer greedily.

    ``inputs``: the processor's output for one image and its question prompt. Returns
    ``(text, cache, peak_kv_bytes)``."""
    ids = inputs["input_ids"]
    cut = _split(processor, ids, model.config.image_token_id, protocol)
    pix = inputs["pixel_values"].to(model.dtype)
    peak = _PeakKV(model)
    try:
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
    finally:
        peak.remove()
    return processor.tokenizer.decode(tokens, skip_special_tokens=True).strip(), cache, peak.peak


def _session(model, budget, press):
    return None if budget is None else vlm_accel.accelerate(model, budget=budget, method="visionzip", kv_press=press)


def _decode_speed(model, processor, item, tokens: int = 48) -> float:
    from ..zoo import build_prompt

    inputs = processor(images=[item["image"]], text=[build_prompt(processor, item["question"])], return_tensors="pt")
    t0 = time.perf_counter()
    model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return tokens / (time.perf_counter() - t0)


def _press_name(press) -> str:
    return press if isinstance(press, str) or press is None else repr(press)


@torch.no_grad()
def run(n: int = 100, seed: int = 0, repeats: int = 3, out_dir="eval/results", name="kv_default", configs=None):
    from ..zoo import build_prompt, normalize_answer
    from .vqa import load_items

    model, processor = vlm_accel.load_default()
    items = load_items(None, n, seed)
    prepared = [
        processor(images=[it["image"]], text=[build_prompt(processor, it["question"])], return_tensors="pt")
        for it in items
    ]
    memo = _TowerMemo(model)
    chosen = [c for c in CONFIGS if configs is None or c[0] in configs or c[0] == "unpatched"]
    results = {}  # (label, protocol) -> (hits, held, peaks)
    for label, budget, press in chosen:
        for protocol in PROTOCOLS:
            sess = _session(model, budget, press)
            hits, held, peaks = [], [], []
            try:
                with memo if budget is None or budget.visual == 1.0 else contextlib.nullcontext():
                    for i, (it, inputs) in enumerate(zip(items, prepared, strict=True)):
                        memo.key = i
                        text, cache, peak = answer_on_cache(model, processor, inputs, protocol)
                        hits.append(int(normalize_answer(text) == normalize_answer(it["answer"])))
                        held.append(nbytes(cache))
                        peaks.append(peak)
            finally:
                if sess is not None:
                    sess.restore()
            results[label, protocol] = hits, held, peaks
            base_hits = results["unpatched", protocol][0]
            logger.info("%s / %s: %.1f %% retained", label, protocol, 100.0 * sum(hits) / max(1, sum(base_hits)))
    speeds = {label: [] for label, _, _ in chosen}
    for _ in range(repeats):  # interleaved
        for label, budget, press in chosen:
            sess = _session(model, budget, press)
            try:
                speeds[label].append(_decode_speed(model, processor, items[0]))
            finally:
                if sess is not None:
                    sess.restore()
    base_speed = statistics.median(speeds["unpatched"])
    rows = []
    for protocol in PROTOCOLS:
        full_hits, full_held, full_peaks = results["unpatched", protocol]
        dense, dense_peak = statistics.mean(full_held), statistics.mean(full_peaks)
        for label, budget, press in chosen:
            hits, held, peaks = results[label, protocol]
            acc = sum(hits) / len(hits)
            row = {
                "protocol": protocol,
                "config": label,
                "press": _press_name(press) if budget is not None and (budget.kv != 1.0 or budget.kv_bits < 16) else "",
                "accuracy": round(acc, 4),
                "retained_pct": round(100.0 * sum(hits) / max(1, sum(full_hits)), 1),
                "kv_bytes": round(statistics.mean(held)),
                "kv_bytes_pct": round(100.0 * statistics.mean(held) / dense, 1),
                "peak_kv_bytes": round(statistics.mean(peaks)),
                "peak_kv_pct": round(100.0 * statistics.mean(peaks) / dense_peak, 1),
                "decode_tok_s": round(statistics.median(speeds[label]), 1),
                "decode_speed_ratio": round(statistics.median(speeds[label]) / base_speed, 3),
            }
            for t in sorted({i["type"] for i in items}):
                sel = [h for h, i in zip(hits, items, strict=True) if i["type"] == t]
                row[f"acc_{t}"] = round(sum(sel) / len(sel), 3)
            rows.append(row)
    meta = {
        "command": " ".join(["python -m vlm_accel.bench.kv", *sys.argv[1:]]),
        "env": environment("cpu"),
        "n": n,
        "seed": seed,
        "repeats": repeats,
        "protocol": __doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0],
    }
    path = write_results(out_dir, name, meta, rows)
    _plot(rows, path.with_suffix(".png"))
    cols = ["protocol", "config", "retained_pct", "kv_bytes_pct", "peak_kv_pct", "decode_tok_s", "decode_speed_ratio"]
    print(format_table(rows, cols))  # noqa: T201
    return rows


def _plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PROTOCOLS), figsize=(12, 4.5), sharey=True)
    for ax, protocol in zip(axes, PROTOCOLS, strict=True):
        for r in (r for r in rows if r["protocol"] == protocol):
            ax.scatter(r["kv_bytes_pct"], r["retained_pct"])
            ax.annotate(r["config"], (r["kv_bytes_pct"], r["retained_pct"]), fontsize=6)
        ax.set_xlabel("KV bytes held (% of the unpatched cache)")
        ax.set_title(protocol)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% of full accuracy")
    fig.suptitle("KV compression on the embedded default")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def main(argv=None) -> int:
    return run_main(__doc__, add_arguments, cli, argv)


if __name__ == "__main__":
    main()
