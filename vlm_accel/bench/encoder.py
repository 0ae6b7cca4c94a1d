"""Merging inside the vision tower (``tome_vit``) vs after it: end-to-end prefill / generate speed, the vision
tower's share of the prefill, and accuracy retained.

Two models: the embedded default (DINOv2 ViT-S/14 tower, 256 patch tokens, a small LLM: the tower is most of a
forward) on one held-out scene and, for accuracy, its held-out split; and the LLaVA-1.5-shaped random model of
:mod:`vlm_accel.bench.speed` (CLIP ViT-L/14-336 widths, 576 tokens, Vicuna-7B widths, reduced depths). Every
configuration is measured in the same process, interleaved, ``repeats`` times; ratios are of medians.

Every speed-up sits beside its token-count ideal: the time a part takes scaled by the tokens it runs on. With, from
the unpatched model in the same run, ``s = vit_ms / prefill_ms`` (the tower's share of the prefill), ``T`` the
tokens per view entering the tower's layers and ``N`` the prompt tokens the LLM gets; for a configuration, ``t`` the
tokens per view averaged over the tower layers that ran (from the merge's record of the forward,
:attr:`~vlm_accel.tower.merge.TowerMerge.last`; ``T`` when the tower is untouched) and ``n`` the prompt tokens
the LLM gets (text + visual tokens kept)::

    ideal_vit_speedup = T / t
    ideal_speedup     = 1 / (s * t / T + (1 - s) * n / N)           # prefill
    ideal_e2e_speedup = e2e / (prefill / ideal_speedup + e2e - prefill)

(the non-tower part of the prefill — patch embedding excluded, it counts with the tower — scales with the LLM's
tokens; a generate is its prefill plus decode steps whose cost the prompt's token count does not change, taken from
the unpatched ``e2e_ms - prefill_ms``). ``*_vs_ideal`` is measured / ideal.

    vlm-accel bench encoder                                   # default model: speed + 100 questions
    vlm-accel bench encoder --model llava15 --n 0             # LLaVA-1.5-shaped: speed only
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import vlm_accel

from ..adapters.base import encoder_layers
from ..methods import get as _get_method
from .common import SpanTimer, environment, format_table, run_main, write_results

logger = logging.getLogger(__name__)

METHODS = ["visionzip", "tome_vit", "tome_vit+visionzip"]
DEFAULT_SCHEDULE = _get_method("tome_vit").options["schedule"].default
BUDGETS = [0.33, 0.11]


def default_inputs(model, processor, seed: int = 0) -> dict:
    """One held-out scene and its question, as the processor makes it (one image, ~270 tokens)."""
    from ..zoo import build_prompt, heldout

    item = next(iter(heldout(1, seed)))
    inputs = processor(images=item["image"], text=build_prompt(processor, item["question"]), return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return dict(inputs)


def budget_of(method: str, budget: float, encoder: float):
    """The budget of a configuration: a tower method with a pre-LLM method merges in the tower to ``encoder`` and
    the pre-LLM method keeps ``budget`` of the whole (``budget / encoder`` of what leaves the tower)."""
    if "tome_vit" in method and "+" in method:
        return vlm_accel.Budget(visual=min(1.0, budget / encoder), encoder=encoder)
    return budget


@torch.no_grad()
def measure(model, inputs: dict, new_tokens: int) -> dict:
    """Prefill (one forward with the last position's logits, as generate's first step), the vision tower's time
    inside it, and a greedy generate of ``new_tokens``."""
    tower = model.model.vision_tower
    timer = SpanTimer(tower, tower)
    try:
        t0 = time.perf_counter()
        model(**inputs, use_cache=True, logits_to_keep=1)  # as generate's first step
        prefill_ms = (time.perf_counter() - t0) * 1e3
        vit_ms = timer.ms
    finally:
        timer.close()
    t0 = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return {"prefill_ms": prefill_ms, "vit_ms": vit_ms, "e2e_ms": (time.perf_counter() - t0) * 1e3}


def options_of(method: str, schedule: str | None) -> dict | None:
    """``method_options`` of a configuration: the tower schedule for ``tome_vit`` alone (composites use defaults)."""
    return {"schedule": schedule} if schedule and method == "tome_vit" else None


def speed(model, inputs, configs, repeats: int, new_tokens: int, schedule: str | None = None) -> list[dict]:
    """Medians per configuration ``(method, budget)``; ``("none", 1.0)`` is the unpatched model."""
    n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_prompt = int(inputs["input_ids"].numel())
    samples: dict[tuple, list[dict]] = {c: [] for c in configs}
    seen = {}  # tokens per view entering the tower's first layer (no merge has happened there yet)

    def first_layer(mod, args, kwargs):
        seen.setdefault("T", (args[0] if args else kwargs["hidden_states"]).shape[1])

    hook = encoder_layers(model.model.vision_tower)[0].register_forward_pre_hook(first_layer, with_kwargs=True)
    try:
        measure(model, inputs, new_tokens)  # warm-up
    finally:
        hook.remove()
    full_tokens = seen["T"]
    for rep in range(repeats):
        for method, budget in configs:
            if method == "none":
                samples[(method, budget)].append(measure(model, inputs, new_tokens))
                continue
            opts = options_of(method, schedule)
            with vlm_accel.accelerate(model, budget=budget, method=method, method_options=opts) as sess:
                m = measure(model, inputs, new_tokens)
                m["kept"] = sess.stats.visual_tokens_kept
                last = sess.tower.last if sess.tower is not None else None
                m["tower_tokens"] = last.mean_layer_tokens if last is not None else full_tokens
            samples[(method, budget)].append(m)
        logger.info("repeat %d/%d done", rep + 1, repeats)

    def med(c, key):
        return statistics.median(s[key] for s in samples[c])

    base = configs[0]
    share = med(base, "vit_ms") / med(base, "prefill_ms")
    rows = []
    for c in configs:
        method, budget = c
        kept = samples[c][0].get("kept", n_vis)
        tower_tokens = samples[c][0].get("tower_tokens", full_tokens)
        llm_tokens = n_prompt - n_vis + kept
        # the same formula, written so that nothing saved gives exactly 1.0 whatever the measured share
        ideal = 1.0 / (1.0 - share * (1 - tower_tokens / full_tokens) - (1 - share) * (1 - llm_tokens / n_prompt))
        decode = max(0.0, med(base, "e2e_ms") - med(base, "prefill_ms"))  # < 0 only by noise
        ideal_e2e = med(base, "e2e_ms") / (med(base, "prefill_ms") / ideal + decode)
        rows.append(
            {
                "method": method,
                "schedule": (schedule or DEFAULT_SCHEDULE) if method == "tome_vit" else None,
                "budget": budget if not isinstance(budget, vlm_accel.Budget) else budget.visual * budget.encoder,
                "encoder": budget.encoder if isinstance(budget, vlm_accel.Budget) else None,
                "visual_tokens": n_vis,
                "visual_kept": kept,
                "tower_tokens": tower_tokens,
                "tower_tokens_full": full_tokens,
                "llm_tokens": llm_tokens,
                "vit_ms": med(c, "vit_ms"),
                "prefill_ms": med(c, "prefill_ms"),
                "vit_share": med(c, "vit_ms") / med(c, "prefill_ms"),
                "e2e_ms": med(c, "e2e_ms"),
                "vit_speedup": med(base, "vit_ms") / med(c, "vit_ms"),
                "ideal_vit_speedup": full_tokens / tower_tokens,
                "prefill_speedup": med(base, "prefill_ms") / med(c, "prefill_ms"),
                "ideal_speedup": ideal,
                "e2e_speedup": med(base, "e2e_ms") / med(c, "e2e_ms"),
                "ideal_e2e_speedup": ideal_e2e,
            }
        )
        row = rows[-1]
        for key, ref in [("vit", "ideal_vit_speedup"), ("prefill", "ideal_speedup"), ("e2e", "ideal_e2e_speedup")]:
            row[f"{key}_vs_ideal"] = row[f"{key}_speedup"] / row[ref]
    return rows


def accuracy(model, processor, items, configs, batch: int, schedule: str | None = None) -> dict[tuple, dict]:
    """Accuracy retained per configuration on ``items`` (see :mod:`vlm_accel.bench.vqa`)."""
    from .vqa import score, summarize

    full = score(model, processor, items, batch, "full budget")
    out = {}
    for method, budget in configs:
        if method == "none":
            out[(method, budget)] = summarize(items, full, full, method, 1.0)
            continue
        with vlm_accel.accelerate(model, budget=budget, method=method, method_options=options_of(method, schedule)):
            hits = score(model, processor, items, batch, f"{method}@{budget}")
        out[(method, budget)] = summarize(items, hits, full, method, budget)
        logger.info("%s @ %s: %.1f %% retained", method, budget, out[(method, budget)]["retained_pct"])
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", choices=["default", "llava15"])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    p.add_argument("--schedule", default=None, help="tome_vit's schedule when alone (default: its default)")
    p.add_argument("--encoder", type=float, default=0.5, help="tower share of tome_vit+X composites (default 0.5)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--n", type=int, default=100, help="held-out questions for accuracy (default model; 0: none)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vision-layers", type=int, default=8, help="llava15: vision tower layers (feature layer -2)")
    p.add_argument("--llm-layers", type=int, default=2, help="llava15: LLM layers")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--speed-threads", type=int, default=0, help="threads while timing (0: as --threads)")
    p.add_argument("--out", default="eval/results")
    p.add_argument("--name", default=None, help="results name (default encoder_<model>)")
    p.add_argument("--no-plot", action="store_true")


def cli(a: argparse.Namespace) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    configs = [("none", 1.0)] + [(m, budget_of(m, b, a.encoder)) for m in a.methods for b in a.budgets]
    processor = None
    if a.model == "default":
        model, processor = vlm_accel.load_default()
        inputs = default_inputs(model, processor)
        desc = "embedded default (DINOv2 ViT-S/14 tower, 256 patch tokens; LLaVA-style LLM)"
    else:
        from .speed import llava15_shaped, make_inputs

        model = llava15_shaped(a.vision_layers, a.llm_layers)
        inputs = make_inputs(model)
        desc = (
            f"llava-1.5-shaped random (CLIP ViT-L/14-336 widths, {a.vision_layers} vision layers, feature layer -2; "
            f"LLM {a.llm_layers} layers @4096)"
        )
    acc = None
    if a.n and processor is not None:
        from .vqa import load_items

        acc = accuracy(model, processor, load_items(None, a.n, 0), configs, a.batch, a.schedule)
    if a.speed_threads:
        torch.set_num_threads(a.speed_threads)
    load_before = os.getloadavg()
    rows = speed(model, inputs, configs, a.repeats, a.new_tokens, a.schedule)
    load_after = os.getloadavg()
    if acc is not None:
        for row, c in zip(rows, configs, strict=True):
            row["accuracy"] = acc[c]["accuracy"]
            row["retained_pct"] = acc[c]["retained_pct"]
    meta = {
        "benchmark": "encoder",
        "model": desc,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "repeats": a.repeats,
        "new_tokens": a.new_tokens,
        "accuracy_data": f"default held-out split (n={a.n}, seed=0)" if a.n and processor is not None else None,
        "env": environment("cpu"),
        "speed_threads": torch.get_num_threads(),
        "load_average_before": [round(v, 2) for v in load_before],  # 1 / 5 / 15 min, as `uptime` shows
        "load_average_after": [round(v, 2) for v in load_after],
        "command": "vlm-accel bench encoder " + " ".join(_args_after("encoder")),
    }
    name = a.name or f"encoder_{a.model}"
    write_results(a.out, name, meta, rows)
    if not a.no_plot:
        _plot(rows, Path(a.out) / f"{name}.png", desc)
    cols = ["method", "budget", "encoder", "visual_kept", "tower_tokens", "vit_ms", "vit_share", "prefill_ms"]
    cols += ["prefill_speedup", "ideal_speedup", "e2e_speedup", "ideal_e2e_speedup"]
    cols += ["retained_pct"] if "retained_pct" in rows[0] else []
    print(format_table(rows, cols))  # noqa: T201  (CLI output)
    return 0


def _plot(rows: list[dict], path: Path, title: str) -> None:
    """Prefill and generate speed-up per configuration (bars) beside the token-count ideal (outlined bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["method"] != "none"]
    labels = [
        r["method"].replace("+", "+\n")
        + f"\n@{r['budget']:.2g}"
        + (f"\nacc {r['retained_pct']:.1f} %" if "retained_pct" in r else "")
        for r in rows
    ]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(rows) + 2), 4.6), sharey=True)
    xs = range(len(rows))
    for ax, key, ideal, name in [
        (axes[0], "prefill_speedup", "ideal_speedup", "prefill"),
        (axes[1], "e2e_speedup", "ideal_e2e_speedup", "generate"),
    ]:
        ax.bar([x - 0.2 for x in xs], [r[key] for r in rows], 0.4, label="measured")
        ax.bar([x + 0.2 for x in xs], [r[ideal] for r in rows], 0.4, fill=False, hatch="//", label="token-count ideal")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_title(f"{name} speed-up vs unpatched")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _args_after(word: str) -> list[str]:
    """The command-line arguments after ``word`` (``vlm-accel [-v] bench encoder ARGS``)."""
    return sys.argv[sys.argv.index(word) + 1 :] if word in sys.argv else sys.argv[1:]


def main(argv=None) -> int:
    return run_main(__doc__, add_arguments, cli, argv)


if __name__ == "__main__":
    sys.exit(main())
