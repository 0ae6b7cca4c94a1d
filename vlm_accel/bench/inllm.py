"""In-LLM pruning (fastv, pdrop) beside pre-LLM methods at equal mean visual tokens per LLM layer.

``accuracy``: on the embedded default model's held-out split, each in-LLM configuration is run, its mean visual
tokens per layer read from ``Stats.visual_tokens_mean``, and the pre-LLM methods are run at that same mean (a
pre-LLM method processes the same count in every layer), so rows with equal ``mean_frac`` cost equal LLM FLOPs.

``speed``: LLM prefill time on the LLaVA-1.5-shaped config (random weights, 576 visual tokens) with enough layers
for ``K = 2`` to matter, accelerated vs unpatched in one run (median of interleaved repeats), beside the ideal
``sum over layers of tokens_full / sum of tokens_kept`` (attention ignored).

    python -m vlm_accel.bench.inllm accuracy --n 200
    python -m vlm_accel.bench.inllm speed --llm-layers 8 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import torch

import vlm_accel

from .common import environment, format_table, run_main, write_results

logger = logging.getLogger(__name__)

IN_LLM = [("fastv", {"layer": 1}), ("fastv", {"layer": 2}), ("pdrop", {})]
PRE = ["visionzip", "divprune", "random"]


def _label(method: str, options: dict) -> str:
    return method + "".join(f" {k}={v}" for k, v in options.items())


@torch.no_grad()
def accuracy(
    n: int = 200,
    budgets=(0.33, 0.11),
    batch: int = 16,
    seed: int = 0,
    out_dir="eval/results",
    name=None,
    in_llm=None,
    pre=None,
):
    from .vqa import load_items, score

    model, processor = vlm_accel.load_default()
    items = load_items(None, n, seed)
    n_vis = _visual_tokens_per_image(model, processor, items[0])
    meta = {"command": " ".join(sys.argv), "env": environment("cpu"), "n": n, "visual_tokens_per_image": n_vis}
    full = score(model, processor, items, batch, "full")
    full_acc = sum(full) / len(full)
    rows = [
        {
            "method": "none",
            "options": "",
            "budget": 1.0,
            "mean_frac": 1.0,
            "per_layer_frac": [1.0],
            "accuracy": full_acc,
            "retained_pct": 100.0,
        }
    ]

    def row(label, budget, hits, mean_frac, per_layer):
        acc = sum(hits) / len(hits)
        r = {
            "method": label.split(" ")[0],
            "options": label.partition(" ")[2],
            "budget": budget,
            "mean_frac": round(mean_frac, 4),
            "per_layer_frac": [round(x, 3) for x in per_layer],
            "accuracy": acc,
            "retained_pct": 100.0 * acc / full_acc,
        }
        logger.info("%s @ %s: mean %.3f, %.1f %% retained", label, budget, mean_frac, r["retained_pct"])
        rows.append(r)
        write_results(out_dir, name or "inllm_default", meta, rows)  # after every row: a long run can be stopped

    means = set()
    for method, options in IN_LLM:
        if in_llm is not None and _label(method, options) not in in_llm:
            continue
        for b in budgets:
            with vlm_accel.accelerate(model, budget=b, method=method, method_options=options) as sess:
                hits = _score_tracking(model, processor, items, batch, sess, _label(method, options))
            per_layer = [x / n_vis for x in sess.tracked_per_layer]
            mean = sum(per_layer) / len(per_layer)
            means.add(round(mean, 3))
            row(_label(method, options), b, hits, mean, per_layer)
    for mean in sorted(means):
        k = max(1, round(mean * n_vis))  # tokens per image: the same count in every layer
        for method in PRE if pre is None else pre:
            with vlm_accel.accelerate(model, budget=k, method=method):
                hits = score(model, processor, items, batch, f"{method}@{k}")
            row(method, k, hits, k / n_vis, [k / n_vis])
    path = write_results(out_dir, name or "inllm_default", meta, rows)
    _plot(rows, path.with_suffix(".png"))
    print(format_table(rows, ["method", "options", "budget", "mean_frac", "accuracy", "retained_pct"]))
    return rows


@torch.no_grad()
def _visual_tokens_per_image(model, processor, item) -> int:
    """Placeholder tokens of one image as the processor lays them out (the tower may interpolate positions)."""
    from ..zoo import build_prompt

    ids = processor(images=[item["image"]], text=[build_prompt(processor, item["question"])])["input_ids"]
    return int((torch.as_tensor(ids) == model.config.image_token_id).sum())


def _score_tracking(model, processor, items, batch, sess, desc):
    """Score, and average ``sess.stats.visual_tokens_per_layer`` per image over every prefill (one image per row)."""
    from .vqa import score

    totals, rows, seen = None, 0, set()

    def after(mod, args, out):
        nonlocal totals, rows
        st = sess.stats
        if id(st) in seen or not st.visual_tokens_per_layer:
            return
        seen.add(id(st))
        totals = (
            st.visual_tokens_per_layer
            if totals is None
            else [a + b for a, b in zip(totals, st.visual_tokens_per_layer, strict=True)]
        )
        rows += int(sess.trace.index.shape[0])

    handle = model.register_forward_hook(after)
    try:
        hits = score(model, processor, items, batch, desc)
    finally:
        handle.remove()
    sess.tracked_per_layer = [t / rows for t in totals]
    return hits


def _plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = sorted({(r["method"], r["options"]) for r in rows if r["method"] != "none"})
    for method, opts in labels:
        pts = sorted((r["mean_frac"], r["retained_pct"]) for r in rows if (r["method"], r["options"]) == (method, opts))
        style = "--" if method in ("random",) else "-"
        ax.plot(*zip(*pts, strict=True), style, marker="o", label=f"{method} {opts}".strip())
    ax.set_xlabel("mean visual tokens per LLM layer (fraction of 256)")
    ax.set_ylabel("% of full accuracy")
    ax.set_title("In-LLM vs pre-LLM at equal mean tokens (embedded default)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@torch.no_grad()
def speed(
    llm_layers: int = 8,
    budgets=(0.33, 0.11),
    repeats: int = 3,
    n_text: int = 40,
    threads: int = 1,
    out_dir="eval/results",
    name=None,
):
    from .speed import llava15_shaped, make_inputs

    if threads:
        torch.set_num_threads(threads)
    model = llava15_shaped(vision_layers=1, llm_layers=llm_layers)
    inputs = make_inputs(model, n_text=n_text)
    n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
    configs = [("none", {}, 1.0)]
    configs += [(m, o, b) for m, o in [("fastv", {"layer": 2}), ("pdrop", {}), ("visionzip", {})] for b in budgets]
    lm = model.model.language_model
    times: dict = {i: [] for i in range(len(configs))}
    per_layer: dict = {}
    for _ in range(repeats):
        for i, (m, o, b) in enumerate(configs):
            sess = None if m == "none" else vlm_accel.accelerate(model, budget=b, method=m, method_options=o or None)
            t = {}
            h1 = lm.layers[0].register_forward_pre_hook(lambda *a, t=t: t.__setitem__("s", time.perf_counter()))
            h2 = lm.norm.register_forward_hook(lambda *a, t=t: t.__setitem__("e", time.perf_counter()))
            try:
                model(**inputs, use_cache=True)
            finally:
                h1.remove()
                h2.remove()
            times[i].append((t["e"] - t["s"]) * 1e3)
            per_layer[i] = sess.stats.visual_tokens_per_layer if sess else [n_vis] * llm_layers
            if sess:
                sess.restore()
    base = statistics.median(times[0])
    rows = []
    for i, (m, o, b) in enumerate(configs):
        ms = statistics.median(times[i])
        tokens = [n_text + v for v in per_layer[i]]
        ideal = (n_text + n_vis) * llm_layers / sum(tokens)
        rows.append(
            {
                "method": _label(m, o),
                "budget": b,
                "llm_prefill_ms": round(ms, 1),
                "speedup": round(base / ms, 3),
                "ideal": round(ideal, 3),
                "mean_visual": round(sum(per_layer[i]) / llm_layers, 1),
            }
        )
    meta = {
        "command": " ".join(sys.argv),
        "env": environment("cpu"),
        "llm_layers": llm_layers,
        "repeats": repeats,
    }
    write_results(out_dir, name or f"speed_inllm_cpu_{llm_layers}l", meta, rows)
    print(format_table(rows, list(rows[0])))
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["accuracy", "speed"])
    p.add_argument("--n", type=int, default=200, help="accuracy: held-out questions")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.33, 0.11])
    p.add_argument("--llm-layers", type=int, default=8, help="speed: LLM depth of the LLaVA-1.5-shaped model")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="eval/results")
    p.add_argument("--name", default=None)
    p.add_argument("--in-llm", nargs="+", default=None, help="accuracy: in-LLM configs to run, e.g. 'fastv layer=1'")
    p.add_argument("--pre", nargs="+", default=None, help="accuracy: pre-LLM methods at the same means")


def cli(a: argparse.Namespace) -> int:
    if a.what == "accuracy":
        accuracy(a.n, tuple(a.budgets), a.batch, out_dir=a.out, name=a.name, in_llm=a.in_llm, pre=a.pre)
    else:
        speed(a.llm_layers, tuple(a.budgets), repeats=a.repeats, threads=a.threads, out_dir=a.out, name=a.name)
    return 0


def main(argv=None) -> int:
    return run_main(__doc__, add_arguments, cli, argv)


if __name__ == "__main__":
    main()
