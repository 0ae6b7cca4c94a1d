"""Budget controller evidence: latency targets met, memory targets met, information-aware vs uniform allocation.

``vlm-accel bench controller latency``: the unpatched prefill (median of ``--repeats``), then
``Budget(latency_ms=f * unpatched)`` for ``f`` in 0.25 / 0.5 / 0.75: the achieved prefill (median), its ratio to the
target, and (embedded default) accuracy retained on held-out questions at each target. Models: the embedded default
and the LLaVA-1.5-shaped config (CLIP ViT-L/14-336 widths, random weights). A target the model cannot reach is
reported with the controller's nearest reachable value.

``... memory``: ``Budget(memory_gb=)`` at 0.25 / 0.5 / 0.75 of the unpatched request's KV + activations on the
embedded default: largest ``stats.kv_bytes`` seen vs the target, accuracy retained.

``... allocation``: two images per prompt (a held-out scene and a near-empty distractor, in random order, the question
about the scene) at equal total visual tokens: ``Budget(tokens=T)`` (split by information) vs ``Budget(visual=T//2)``
(an even split). ``... allocation-clips --model DIR``: the same on held-out synthetic clips (8 frames) through a video
model's video input: ``Budget(tokens=T)`` over the clip's frames vs ``Budget(visual=T//8)`` per frame.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

import vlm_accel

from ..control.budget import Budget
from .common import environment, format_table, run_main, write_results

logger = logging.getLogger(__name__)

FRACTIONS = (0.25, 0.5, 0.75)


def _command() -> str:
    args = sys.argv[1:]
    return "vlm-accel " + " ".join(args) if "bench" in args else "vlm-accel bench controller " + " ".join(args)


@torch.no_grad()
def _prefill_ms(model, inputs, repeats: int) -> float:
    """Median time to first token: a cached forward computing the last position's logits only, as ``generate``'s
    prefill does (the full-sequence logits would add a vocabulary-wide matmul per token that no answer needs)."""
    model(**inputs, use_cache=True, logits_to_keep=1)  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**inputs, use_cache=True, logits_to_keep=1)
        runs.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(runs)


def _default_inputs(processor, item, images=None) -> dict:
    from ..zoo.evaluate import build_prompt

    return processor(
        images=images or [item["image"]], text=[build_prompt(processor, item["question"])], return_tensors="pt"
    )


def _accelerated(model, budget, method):
    """``with`` block: the model accelerated at ``budget`` (restored on leaving), or as it is when ``budget`` is None
    (the full-budget reference); yields the session or None."""
    return vlm_accel.accelerate(model, budget, method=method) if budget is not None else contextlib.nullcontext()


def _score(model, processor, items, budget, method, after=None) -> list[int | None]:
    """1 / 0 per item, ``None`` where the target was unreachable for that request (the controller raised).
    ``after(session)`` runs after every answered item (to read its stats / plan)."""
    from ..zoo import normalize_answer
    from ..zoo.evaluate import answer_batch

    hits = []
    with _accelerated(model, budget, method) as sess:
        for it in items:  # one request at a time: a latency target is per request
            try:
                pred = answer_batch(model, processor, [it["image"]], [it["question"]])[0]
            except ValueError as e:
                logger.info("unreachable: %s", e)
                hits.append(None)
                continue
            hits.append(int(normalize_answer(pred) == normalize_answer(it["answer"])))
            if after is not None:
                after(sess)
    return hits


def _retained(hits: list[int | None], full_hits: list[int]) -> dict:
    """``reached_pct`` (requests the target was reachable for), ``accuracy`` and ``retained_pct`` (vs the full budget
    on the same reached requests) from per-request hits (``None``: unreachable)."""
    done = [(h, f) for h, f in zip(hits, full_hits, strict=True) if h is not None]
    return {
        "reached_pct": 100.0 * len(done) / len(hits),
        "accuracy": sum(h for h, _ in done) / max(len(done), 1),
        "retained_pct": 100.0 * sum(h for h, _ in done) / max(sum(f for _, f in done), 1),
    }


def latency(which: str, n: int, repeats: int, method: str, fractions=FRACTIONS) -> list[dict]:
    """Rows: per target fraction, target / achieved prefill ms, ratio, kept tokens, accuracy retained (default)."""
    from ..control.calibration import calibrate

    if which == "default":
        from ..zoo import heldout, load_default

        model, processor = load_default()
        items = list(heldout(n, 7))
        inputs = _default_inputs(processor, items[0])
    else:
        from .speed import llava15_shaped, make_inputs

        model, processor, items = llava15_shaped(vision_layers=4, llm_layers=4), None, []
        inputs = make_inputs(model)
    cost = calibrate(model, model.model.language_model)
    full_ms = _prefill_ms(model, inputs, repeats)
    full_hits = _score(model, processor, items, None, method) if items else []
    rows = []
    for f in fractions:
        target = f * full_ms
        row = {"model": which, "fraction": f, "target_ms": target, "full_ms": full_ms, "method": method}
        sess = vlm_accel.accelerate(model, Budget(latency_ms=target), method=method)
        try:
            row["achieved_ms"] = _prefill_ms(model, inputs, repeats)
            row["ratio"] = row["achieved_ms"] / target
            row["within_15pct"] = abs(row["ratio"] - 1) <= 0.15
            row["visual_kept"], row["visual_in"] = sess.stats.visual_tokens_kept, sess.stats.visual_tokens_in
            row["predicted_ms"] = sess.plan.predicted_ms
            row["reachable"] = True
        except ValueError as e:
            row.update(reachable=False, note=str(e))
        finally:
            sess.restore()
        if items and row["reachable"]:
            row.update(_retained(_score(model, processor, items, Budget(latency_ms=target), method), full_hits))
        rows.append(row)
        logger.info("latency %s %.2f: %s", which, f, row)
    if items:
        rows.insert(0, {"model": which, "fraction": 1.0, "full_ms": full_ms, "accuracy": sum(full_hits) / len(items)})
    for r in rows:
        r["calibration"] = cost.describe()
    return rows


def memory(n: int, method: str, fractions=FRACTIONS) -> list[dict]:
    """Rows: per fraction of the unpatched request's KV + activations, the target, the largest ``stats.kv_bytes``
    seen, the KV limit the controller set, accuracy retained."""
    from ..control.controller import activation_bytes, kv_bytes_per_entry
    from ..zoo import heldout, load_default

    model, processor = load_default()
    items = list(heldout(n, 7))
    lm = model.model.language_model
    n_prompt = int(_default_inputs(processor, items[0])["input_ids"].shape[1])
    full_bytes = kv_bytes_per_entry(lm) * (n_prompt + 4) + activation_bytes(lm, 1, n_prompt)
    full_hits = _score(model, processor, items, None, method)
    rows = [{"fraction": 1.0, "target_mb": full_bytes / 1e6, "accuracy": sum(full_hits) / n, "retained_pct": 100.0}]
    for f in fractions:
        target = f * full_bytes
        seen = []  # per question: (stats.kv_bytes, the plan's KV limit, visual tokens kept)

        def record(sess, seen=seen):
            seen.append((sess.stats.kv_bytes, sess.plan.kv_bytes_limit, sess.stats.visual_tokens_kept))

        hits = _score(model, processor, items, Budget(memory_gb=target / 1e9), method, after=record)
        kv, limits, kept = zip(*seen, strict=True)
        peak, limit = max(kv), max(limits)
        rows.append(
            {
                "fraction": f,
                "target_mb": target / 1e6,
                "kv_limit_mb": limit / 1e6,
                "max_kv_mb": peak / 1e6,
                "met": peak <= target,
                "visual_kept_mean": sum(kept) / len(kept),
                **_retained(hits, full_hits),
            }
        )
        logger.info("memory %.2f: %s", f, rows[-1])
    return rows


def allocation(n: int, totals, method: str) -> list[dict]:
    """Two images per prompt, one question about the scene: tokens split by information vs evenly."""
    import random

    from PIL import Image

    from ..zoo import heldout, load_default, normalize_answer
    from ..zoo.evaluate import build_prompt

    model, processor = load_default()
    items = list(heldout(n, 11))
    rng = random.Random(0)
    cases = []
    for it in items:
        blank = Image.new("RGB", it["image"].size, tuple(rng.randint(225, 245) for _ in range(3)))
        imgs = [blank, it["image"]] if rng.random() < 0.5 else [it["image"], blank]
        q = build_prompt(processor, it["question"]).replace("<image>", "<image><image>", 1)
        cases.append((processor(images=imgs, text=[q], return_tensors="pt"), it["answer"]))

    def score(budget) -> float:
        hits = 0
        with _accelerated(model, budget, method), torch.no_grad():
            for inputs, answer in cases:
                out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
                pred = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                hits += normalize_answer(pred) == normalize_answer(answer)
        return hits / len(cases)

    return _split_rows(totals, score, parts=2, what="allocation")


def allocation_clips(n: int, totals, method: str, model_dir: str | None, frames: int = 8, loaded=None) -> list[dict]:
    """Held-out synthetic clip questions through the model's video input: ``Budget(tokens=T)`` (the clip's total
    split over its frames by information: frames where something changes get more) vs ``Budget(visual=T //
    frames)`` (the same count every frame), at equal total visual tokens per clip. ``loaded``: ``(model, processor)``
    instead of loading ``model_dir``."""
    from ..loading import load_model
    from ..zoo import has_video_input
    from ..zoo.clips import heldout_clips
    from .videoqa import score

    model, processor = loaded if loaded is not None else load_model(model_dir)
    if not has_video_input(model, processor):
        raise ValueError("allocation-clips needs a model with a video input (--model DIR of a video model)")
    from PIL import Image

    items = [
        dict(it, frames=[Image.fromarray(f) for f in it["frames"]]) for it in heldout_clips(n, seed=5, frames=frames)
    ]

    def accuracy(budget) -> float:
        with _accelerated(model, budget, method):
            hits = score(model, processor, items, "full" if budget is None else f"tokens={budget.tokens or '-'}")
        return sum(hits) / len(hits)

    return _split_rows(totals, accuracy, parts=frames, what="allocation-clips")


def _split_rows(totals, accuracy, parts: int, what: str) -> list[dict]:
    """Rows of an allocation comparison: ``accuracy(budget)`` at full budget (``None``), then per total ``T``
    ``Budget(tokens=T)`` (split by information) vs ``Budget(visual=T // parts)`` (the same count for each of the
    ``parts`` inputs)."""
    full = accuracy(None)
    rows = [{"total_tokens": "all", "split": "none", "accuracy": full, "retained_pct": 100.0}]
    for t in totals:
        for split, budget in (("information", Budget(tokens=t)), ("uniform", Budget(visual=max(1, t // parts)))):
            acc = accuracy(budget)
            retained = 100.0 * acc / full if full else None
            rows.append({"total_tokens": t, "split": split, "accuracy": acc, "retained_pct": retained})
            logger.info("%s %s %s: %.3f", what, t, split, acc)
    return rows


def _plot(rows: list[dict], path: Path, what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if what == "latency":  # models differ in scale by 100x: achieved / target against the target's fraction
        for model in sorted({r["model"] for r in rows}):
            sel = [r for r in rows if r["model"] == model and r.get("achieved_ms")]
            ax.plot([r["fraction"] for r in sel], [r["ratio"] for r in sel], "o-", label=model)
            for r in rows:
                if r["model"] == model and r.get("reachable") is False:
                    ax.annotate(f"{model}: refused", (r["fraction"], 1.0), ha="center", va="bottom", fontsize=8)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhspan(0.85, 1.15, color="gray", alpha=0.2, label="±15 %")
        ax.set_xlabel("latency target (fraction of the unpatched prefill)")
        ax.set_ylabel("achieved / target (median)")
    elif what == "memory":
        sel = [r for r in rows if r["fraction"] < 1]
        ax.plot([r["target_mb"] for r in sel], [r["max_kv_mb"] for r in sel], "o-", label="largest stats.kv_bytes")
        ax.plot([r["target_mb"] for r in sel], [r["target_mb"] for r in sel], "k--", label="target")
        ax.set_xlabel("memory target (MB)")
        ax.set_ylabel("MB")
    else:
        for split in ("information", "uniform"):
            sel = [r for r in rows if r["split"] == split]
            ax.plot([r["total_tokens"] for r in sel], [r["retained_pct"] for r in sel], "o-", label=split)
        ax.set_xlabel(
            "visual tokens per clip (8 frames)"
            if what == "allocation-clips"
            else "visual tokens per prompt (two images)"
        )
        ax.set_ylabel("% of full accuracy")
    ax.legend()
    ax.set_title(f"budget controller: {what}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["latency", "memory", "allocation", "allocation-clips"])
    p.add_argument("--model", default=None, help="allocation-clips: a video model directory (default: the embedded)")
    p.add_argument("--models", nargs="+", default=["default", "llava15"], help="latency: default and/or llava15")
    p.add_argument("--n", type=int, default=100, help="held-out questions for accuracy")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--method", default="auto")
    p.add_argument("--totals", type=int, nargs="+", default=[16, 32, 64], help="allocation: tokens per prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="eval/results")
    p.add_argument("--name", default=None)


def cli(a: argparse.Namespace) -> int:
    torch.set_num_threads(a.threads)
    if a.what == "latency":
        rows = [r for m in a.models for r in latency(m, a.n, a.repeats, a.method)]
    elif a.what == "memory":
        rows = memory(a.n, a.method)
    elif a.what == "allocation":
        rows = allocation(a.n, a.totals, a.method)
    else:
        rows = allocation_clips(a.n, a.totals, a.method, a.model)
    name = a.name or f"controller_{a.what.replace('-', '_')}"
    meta = {"benchmark": f"controller {a.what}", "env": environment("cpu"), "command": _command()}
    write_results(a.out, name, meta, rows)
    _plot(rows, Path(a.out) / f"{name}.png", a.what)
    print(format_table(rows, [k for k in rows[-1] if k not in ("note", "calibration")]))  # noqa: T201
    return 0


def main(argv=None) -> int:
    return run_main(__doc__, add_arguments, cli, argv)


if __name__ == "__main__":
    main()
