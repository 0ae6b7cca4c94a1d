"""Prefill and end-to-end speed of accelerated vs unpatched, on a LLaVA-1.5-shaped model with random weights.

The model has the real widths (CLIP ViT-L/14-336 vision tower, Vicuna-7B LLM: hidden 4096, 32 heads, MLP 11008)
and reduced depth, so the per-token cost of every layer is real while the run fits a CPU. Every configuration is
measured in the same process, interleaved, ``repeats`` times; ratios are of medians and sit beside the token-count
ideal ``(N_text + N_vis) / (N_text + r * N_vis)``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

import vlm_accel

from .common import SpanTimer, build_model, environment, format_table, run_main, write_results

logger = logging.getLogger(__name__)


def llava15_shaped(vision_layers: int = 4, llm_layers: int = 2, dtype=torch.float32, device: str = "cpu"):
    """``LlavaForConditionalGeneration`` at LLaVA-1.5-7B widths with random weights (576 visual tokens)."""
    import transformers as tf

    cfg = tf.LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=vision_layers,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=llm_layers,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=4096,
        ),
        image_token_id=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return build_model(tf.LlavaForConditionalGeneration, cfg, dtype, device)


def make_inputs(
    model, n_text: int = 40, batch: int = 1, images: int = 1, device: str = "cpu", dtype=torch.float32
) -> dict:
    """``batch`` rows of ``n_text`` text tokens around ``images`` consecutive images (576 tokens each)."""
    gen = torch.Generator().manual_seed(0)
    n_vis = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    pre = torch.randint(1, 30000, (batch, n_text // 2), generator=gen)
    post = torch.randint(1, 30000, (batch, n_text - n_text // 2), generator=gen)
    ids = torch.cat([pre, torch.full((batch, n_vis * images), model.config.image_token_id), post], 1)
    side = model.config.vision_config.image_size
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": torch.randn(batch * images, 3, side, side, generator=gen).to(device, dtype),
    }


@torch.no_grad()
def measure(model, inputs, new_tokens: int, sync) -> dict:
    """One prefill forward (LLM time, selection time) and one greedy generate (end-to-end)."""
    lm = model.model.language_model
    timer = SpanTimer(lm.layers[0], lm.norm, sync)  # the decoder stack
    try:
        sync()
        t0 = time.perf_counter()
        model(**inputs, use_cache=True)
        sync()
        prefill_ms = (time.perf_counter() - t0) * 1e3
        llm_ms = timer.ms
        t0 = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        sync()
        e2e_ms = (time.perf_counter() - t0) * 1e3
    finally:
        timer.close()
    return {"llm_prefill_ms": llm_ms, "prefill_ms": prefill_ms, "e2e_ms": e2e_ms}


def run(
    methods: list[str],
    budgets: list[float],
    repeats: int = 5,
    vision_layers: int = 4,
    llm_layers: int = 2,
    n_text: int = 40,
    new_tokens: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
    out_dir: str = "eval/results",
    name: str = "speed_llava15",
    plot: bool = True,
    batch: int = 1,
    images: int = 1,
) -> list[dict]:
    torch_dtype = getattr(torch, dtype)
    model = llava15_shaped(vision_layers, llm_layers, torch_dtype, device)
    inputs = make_inputs(model, n_text, batch, images, device=device, dtype=torch_dtype)
    n_vis = int((inputs["input_ids"][0] == model.config.image_token_id).sum())  # per row
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    configs = [("none", 1.0)] + [(m, b) for m in methods for b in budgets if b != 1.0]
    samples: dict[tuple, list[dict]] = {c: [] for c in configs}
    measure(model, inputs, new_tokens, sync)  # warm-up
    for rep in range(repeats):
        for method, budget in configs:
            if method == "none":
                samples[(method, budget)].append(measure(model, inputs, new_tokens, sync))
                continue
            with vlm_accel.accelerate(model, budget=budget, method=method) as sess:
                m = measure(model, inputs, new_tokens, sync)
                m["selection_ms"] = sess.stats.selection_ms
                m["kept"] = sess.stats.visual_tokens_kept
            samples[(method, budget)].append(m)
        logger.info("repeat %d/%d done", rep + 1, repeats)

    def med(c, key):
        return statistics.median(s[key] for s in samples[c])

    base = ("none", 1.0)
    rows = []
    for c in configs:
        method, budget = c
        kept = samples[c][0].get("kept", n_vis * batch) // batch
        r = kept / n_vis
        rows.append(
            {
                "method": method,
                "budget": budget,
                "batch": batch,
                "visual_tokens": n_vis,
                "visual_kept": kept,
                "text_tokens": n_text,
                "llm_prefill_ms": med(c, "llm_prefill_ms"),
                "prefill_ms": med(c, "prefill_ms"),
                "e2e_ms": med(c, "e2e_ms"),
                "selection_ms": med(c, "selection_ms") if method != "none" else 0.0,
                "llm_prefill_speedup": med(base, "llm_prefill_ms") / med(c, "llm_prefill_ms"),
                "prefill_speedup": med(base, "prefill_ms") / med(c, "prefill_ms"),
                "e2e_speedup": med(base, "e2e_ms") / med(c, "e2e_ms"),
                "ideal_speedup": (n_text + n_vis) / (n_text + r * n_vis),
            }
        )
        rows[-1]["llm_prefill_vs_ideal"] = rows[-1]["llm_prefill_speedup"] / rows[-1]["ideal_speedup"]
    meta = {
        "benchmark": "speed",
        "model": f"llava-1.5-shaped random (vision {vision_layers} layers @1024, "
        f"LLM {llm_layers} layers @4096/32 heads/MLP 11008)",
        "dtype": dtype,
        "repeats": repeats,
        "new_tokens": new_tokens,
        "batch": batch,
        "images_per_row": images,
        "env": environment(device),
        "command": "python eval/bench_speed.py " + " ".join(sys.argv[1:]),
    }
    write_results(out_dir, name, meta, rows)
    cols = [
        "method",
        "budget",
        "visual_kept",
        "llm_prefill_ms",
        "llm_prefill_speedup",
        "ideal_speedup",
        "llm_prefill_vs_ideal",
        "e2e_speedup",
        "selection_ms",
    ]
    print(format_table(rows, cols))  # noqa: T201  (CLI output)
    if plot:
        _plot(rows, Path(out_dir) / f"{name}.png")
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in [(axes[0], "llm_prefill_speedup", "LLM prefill"), (axes[1], "e2e_speedup", "end-to-end")]:
        for method in sorted({r["method"] for r in rows} - {"none"}):
            pts = sorted((r["visual_kept"] / r["visual_tokens"], r[key]) for r in rows if r["method"] == method)
            ax.plot(*zip(*sorted([(1.0, 1.0)] + pts), strict=True), marker="o", label=method)
        ideal = sorted({(r["visual_kept"] / r["visual_tokens"], r["ideal_speedup"]) for r in rows})
        ax.plot(*zip(*ideal, strict=True), "k--", label="token-count ideal")
        ax.set_xlabel("fraction of visual tokens kept")
        ax.set_ylabel("speedup vs unpatched")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", default=vlm_accel.methods())
    p.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.33, 0.11])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--llm-layers", type=int, default=2)
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="eval/results")
    p.add_argument("--name", default="speed_llava15")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--images", type=int, default=1, help="images per prompt (576 tokens each)")


def main(argv=None) -> int:
    return run_main(__doc__, add_arguments, cli, argv)


def cli(a: argparse.Namespace) -> int:
    run_args(a)
    return 0


def run_args(a: argparse.Namespace) -> list[dict]:
    if a.threads:
        torch.set_num_threads(a.threads)
    return run(
        a.methods,
        a.budgets,
        a.repeats,
        a.vision_layers,
        a.llm_layers,
        a.text_tokens,
        a.new_tokens,
        a.dtype,
        a.device,
        a.out,
        a.name,
        batch=a.batch,
        images=a.images,
    )


if __name__ == "__main__":
    main()
