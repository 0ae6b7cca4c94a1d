"""Per-patch frame cache (:class:`vlm_accel.tower.patch_cache.PatchCache`) vs the whole-frame cache vs the full
tower, on held-out synthetic clips (:mod:`vlm_accel.zoo.clips`) through a LLaVA-OneVision video path.

Model: the embedded default as a stock ``LlavaOnevisionForConditionalGeneration``
(:func:`vlm_accel.zoo.onevision.load_video_default`: its pretrained DINOv2 ViT-S/14 tower at 224 px, 256 patches per
frame; answers are compared with the full tower's, not scored). Per cache
and threshold: frames / patches the tower encoded, the tower's time (median of interleaved repeats, one process),
the video features' error against the full tower (relative L2 per frame: mean and max; cosine), and the share of
greedy answers equal to the full tower's.

    python -m vlm_accel.bench.patch_cache                       # 24 clips x 16 frames, thresholds 0 / 0.01 / 0.1
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

import torch

from .common import SpanTimer, environment, format_table, run_main, write_results

logger = logging.getLogger(__name__)


def clips(n: int, frames: int, seed: int = 0) -> list[dict]:
    from ..zoo.clips import heldout_clips

    return list(heldout_clips(n, seed, frames=frames))


def _inputs(processor, item) -> dict:
    from PIL import Image

    from ..zoo import build_prompt

    processor.tokenizer.padding_side = "left"
    video = [Image.fromarray(f) for f in item["frames"]]
    return dict(
        processor(videos=[video], text=[build_prompt(processor, item["question"], "video")], return_tensors="pt")
    )


@torch.no_grad()
def encode(model, pv, cache) -> tuple[torch.Tensor, float, float, object]:
    """``(features, tower ms, get_video_features ms, stats)`` of one clip, with ``cache`` (None: the full tower)."""
    from ..adapters import adapter_for
    from ..tower.frame_cache import FrameCache

    inner = model.model
    timer = SpanTimer(inner.vision_tower, inner.vision_tower)
    try:
        t0 = time.perf_counter()
        if cache is None:
            out = inner.get_video_features(pixel_values_videos=pv).pooler_output
            stats = None
        else:
            kind, threshold, max_changed = cache
            adapter = adapter_for(model)
            c = FrameCache(adapter, threshold) if kind == "frame" else _patch_cls()(adapter, threshold, max_changed)
            out = c.wrap(inner.get_video_features)(pixel_values_videos=pv).pooler_output
            stats = c.stats
        total = (time.perf_counter() - t0) * 1e3
    finally:
        timer.close()
    return out, timer.ms, total, stats


def _patch_cls():
    from ..tower.patch_cache import PatchCache

    return PatchCache


@torch.no_grad()
def answer(model, processor, inputs, cache) -> str:
    if cache is None:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    else:
        kind, threshold, max_changed = cache
        if kind == "patch":
            with _patch_cls().attach(model, threshold, max_changed):
                out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        else:
            import vlm_accel

            with vlm_accel.accelerate(model, budget=1.0, frame_cache=threshold):
                out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


def run(
    n: int, frames: int, thresholds: list[float], max_changed: list[float], repeats: int, answers: bool
) -> tuple[list[dict], dict]:
    from ..zoo.onevision import load_video_default

    model, processor = load_video_default()
    items = clips(n, frames)
    configs = [None] + [("frame", t, None) for t in thresholds]
    configs += [("patch", t, mc) for t in thresholds for mc in (max_changed if t > 0 else max_changed[:1])]
    acc: dict = {
        c: {"vit": [], "total": [], "err": [], "err_max": [], "cos": [], "same": [], "stats": []} for c in configs
    }
    for i, item in enumerate(items):
        inputs = _inputs(processor, item)
        pv = inputs["pixel_values_videos"].to(model.dtype)
        encode(model, pv, None)  # warm
        times = {c: ([], []) for c in configs}
        ref = None
        for _ in range(repeats):
            for c in configs:
                feats, vit, total, stats = encode(model, pv, c)
                times[c][0].append(vit)
                times[c][1].append(total)
                if c is None:
                    ref = feats
                elif len(acc[c]["stats"]) <= i:  # once per clip
                    f = feats[0, :-1].view(frames, -1, feats.shape[-1])
                    r = ref[0, :-1].view(frames, -1, ref.shape[-1])
                    rel = ((f - r).norm(dim=(1, 2)) / r.norm(dim=(1, 2))).tolist()
                    acc[c]["err"].append(statistics.mean(rel))
                    acc[c]["err_max"].append(max(rel))
                    acc[c]["cos"].append(float(torch.nn.functional.cosine_similarity(f, r, dim=-1).mean()))
                    acc[c]["stats"].append(stats)
        for c in configs:
            acc[c]["vit"].append(statistics.median(times[c][0]))
            acc[c]["total"].append(statistics.median(times[c][1]))
        if answers:
            full = answer(model, processor, inputs, None)
            for c in configs[1:]:
                acc[c]["same"].append(answer(model, processor, inputs, c) == full)
        logger.info("clip %d/%d done", i + 1, len(items))
    rows = []
    base_vit = sum(acc[None]["vit"])
    base_total = sum(acc[None]["total"])
    for c in configs:
        a = acc[c]
        st = a["stats"]
        row = {
            "cache": "none" if c is None else c[0],
            "threshold": None if c is None else c[1],
            "max_changed": None if c is None else c[2],
            "clips": len(items),
            "frames_in": len(items) * frames,
            "frames_encoded": len(items) * frames if c is None else sum(s.frames_encoded for s in st),
            "frames_partial": 0 if c is None or c[0] == "frame" else sum(s.frames_partial for s in st),
            "patches_encoded_pct": 100.0
            if c is None
            else 100.0
            * (
                sum(s.patches_encoded for s in st) / sum(s.patches_in for s in st)
                if c[0] == "patch"
                else sum(s.frames_encoded for s in st) / sum(s.frames_in for s in st)
            ),
            "vit_ms_per_clip": sum(a["vit"]) / len(items),
            "vit_time_saved_pct": 100.0 * (1 - sum(a["vit"]) / base_vit),
            "encode_ms_per_clip": sum(a["total"]) / len(items),
            "encode_time_saved_pct": 100.0 * (1 - sum(a["total"]) / base_total),
            "feature_rel_err_mean": statistics.mean(a["err"]) if c is not None else 0.0,
            "feature_rel_err_max": max(a["err_max"]) if c is not None else 0.0,
            "feature_cos_mean": statistics.mean(a["cos"]) if c is not None else 1.0,
        }
        if answers:
            row["answers_same_pct"] = 100.0 if c is None else 100.0 * sum(a["same"]) / len(a["same"])
        rows.append(row)
    meta = {"model": "embedded default as LLaVA-OneVision (DINOv2 ViT-S/14, 224 px, 256 patches / frame)"}
    return rows, meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=24, help="held-out clips")
    p.add_argument("--frames", type=int, default=16, help="frames sampled uniformly per clip")
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.0, 0.01, 0.1])
    p.add_argument("--max-changed", nargs="+", type=float, default=[0.25, 0.05], help="patch cache's max_changed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-answers", action="store_true", help="skip the greedy answers")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="eval/results")
    p.add_argument("--name", default="patch_cache")


def cli(a: argparse.Namespace) -> int:
    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    rows, meta = run(a.n, a.frames, a.thresholds, a.max_changed, a.repeats, not a.no_answers)
    meta = {
        "benchmark": "patch_cache",
        **meta,
        "clips": f"vlm_accel.zoo.clips.heldout_clips(n={a.n}, seed=0, frames={a.frames})",
        "repeats": a.repeats,
        "env": environment("cpu"),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "command": "python -m vlm_accel.bench.patch_cache " + " ".join(sys.argv[1:]),
    }
    write_results(a.out, a.name, meta, rows)
    cols = [
        "cache",
        "threshold",
        "max_changed",
        "frames_encoded",
        "frames_partial",
        "patches_encoded_pct",
        "vit_ms_per_clip",
    ]
    cols += ["vit_time_saved_pct", "encode_time_saved_pct", "feature_rel_err_mean", "feature_rel_err_max"]
    cols += ["answers_same_pct"] if "answers_same_pct" in rows[0] else []
    print(format_table(rows, cols))  # noqa: T201  (CLI output)
    return 0


def main(argv=None) -> int:
    return run_main(__doc__, add_arguments, cli, argv)


if __name__ == "__main__":
    sys.exit(main())
