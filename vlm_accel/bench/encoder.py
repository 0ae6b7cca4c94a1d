"""Merging inside the vision tower (``tome_vit``) vs after it: end-to-end prefill / generate speed, the vision
tower's share of the prefill, and accuracy retained.

Two models: the embedded default (DINOv2 ViT-S/14 tower, 256 patch tokens, a small LLM: the tower is most of a
forward) on one held-out scene and, for accuracy, its held-out split; and the LLaVA-1.5-shaped random model of
:mod:`vlm_accel.bench.speed` (CLIP ViT-L/14-336 widths, 576 tokens, Vicuna-7B widths, reduced depths). Every
configuration is measured in the same process, interleaved, ``repeats`` times; ratios are of medians.

    vlm-accel bench encoder                                   # default model: speed + 100 questions
    vlm-accel bench encoder --model llava15 --n 0             # LLaVA-1.5-shaped: speed only
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import torch

import vlm_accel

from ..encoder_merge import TOME_VIT
from .common import SpanTimer, environment, format_table, run_main, write_results

logger = logging.getLogger(__name__)

METHODS = ["visionzip", "tome_vit", "tome_vit+visionzip"]
DEFAULT_SCHEDULE = TOME_VIT.options["schedule"].default
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
    """Prefill (one forward), the vision tower's time inside it, and a greedy generate of ``new_tokens``."""
    tower = model.model.vision_tower
    timer = SpanTimer(tower, tower)
    try:
        t0 = time.perf_counter()
        model(**inputs, use_cache=True)
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
    samples: dict[tuple, list[dict]] = {c: [] for c in configs}
    measure(model, inputs, new_tokens)  # warm-up
    for rep in range(repeats):
        for method, budget in configs:
            if method == "none":
                samples[(method, budget)].append(measure(model, inputs, new_tokens))
                continue
            opts = options_of(method, schedule)
            with vlm_accel.accelerate(model, budget=budget, method=method, method_options=opts) as sess:
                m = measure(model, inputs, new_tokens)
                m["kept"] = sess.stats.visual_tokens_kept
            samples[(method, budget)].append(m)
        logger.info("repeat %d/%d done", rep + 1, repeats)

    def med(c, key):
        return statistics.median(s[key] for s in samples[c])

    base = configs[0]
    rows = []
    for c in configs:
        method, budget = c
        rows.append(
            {
                "method": method,
                "schedule": (schedule or DEFAULT_SCHEDULE) if method == "tome_vit" else None,
                "budget": budget if not isinstance(budget, vlm_accel.Budget) else budget.visual * budget.encoder,
                "encoder": budget.encoder if isinstance(budget, vlm_accel.Budget) else None,
                "visual_tokens": n_vis,
                "visual_kept": samples[c][0].get("kept", n_vis),
                "vit_ms": med(c, "vit_ms"),
                "prefill_ms": med(c, "prefill_ms"),
                "vit_share": med(c, "vit_ms") / med(c, "prefill_ms"),
                "e2e_ms": med(c, "e2e_ms"),
                "vit_speedup": med(base, "vit_ms") / med(c, "vit_ms"),
                "prefill_speedup": med(base, "prefill_ms") / med(c, "prefill_ms"),
                "e2e_speedup": med(base, "e2e_ms") / med(c, "e2e_ms"),
            }
        )
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
    rows = speed(model, inputs, configs, a.repeats, a.new_tokens, a.schedule)
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
        "command": "vlm-accel bench encoder " + " ".join(_args_after("encoder")),
    }
    write_results(a.out, a.name or f"encoder_{a.model}", meta, rows)
    cols = ["method", "budget", "encoder", "visual_kept", "vit_ms", "vit_share", "prefill_ms", "prefill_speedup"]
    cols += ["e2e_speedup"] + (["retained_pct"] if "retained_pct" in rows[0] else [])
    print(format_table(rows, cols))  # noqa: T201  (CLI output)
    return 0


def _args_after(word: str) -> list[str]:
    """The command-line arguments after ``word`` (``vlm-accel [-v] bench encoder ARGS``)."""
    return sys.argv[sys.argv.index(word) + 1 :] if word in sys.argv else sys.argv[1:]


def main(argv=None) -> int:
    return run_main(__doc__, add_arguments, cli, argv)


if __name__ == "__main__":
    sys.exit(main())
