"""In-LLM pruning (FastV, PyramidDrop): visual tokens ranked by the attention the LLM itself pays them.

The reducer is the same pure function as every other method: ``ctx.importance`` ``[N]`` is the attention each
visual token of the segment receives from the scoring rows (the last prompt tokens) at the layer before a stage,
head-averaged; the top ``k`` stay. Where the stages are and how many tokens each keeps is a pure schedule
(:func:`stage_layers`, :func:`stage_quota`); the hooks that run it live in :mod:`vlm_accel.llm.stages`.

Budget: like a pre-LLM method, the budget is what the LLM keeps of each image / crop / frame *after the last
stage* (so ``visual_tokens_kept`` is comparable); the layers before it see more. ``Stats.visual_tokens_per_layer``
and ``visual_tokens_mean`` give the FLOP-comparable average.
"""

from __future__ import annotations

import math

import torch

from .base import Context, Option, Reduction, register


def _layer_ok(v) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)


def _rows_ok(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _layers_ok(v) -> bool:
    return v is None or (
        isinstance(v, (list, tuple))
        and len(v) > 0
        and all(_layer_ok(x) and x is not None for x in v)
        and list(v) == sorted(set(v))
    )


def _schedule_ok(v) -> bool:
    if v is None:
        return True
    try:
        pairs = [(int(a), float(b)) for a, b in v]
    except (TypeError, ValueError):
        return False
    layers = [a for a, _ in pairs]
    ratios = [b for _, b in pairs]
    return (
        len(pairs) > 0
        and layers == sorted(set(layers))
        and layers[0] >= 1
        and all(0 < r <= 1 for r in ratios)
        and ratios == sorted(ratios, reverse=True)
    )


ROWS = Option(1, "scoring rows: how many of the last prompt tokens score the visual tokens (int >= 1)", _rows_ok)


def top_attended(x: torch.Tensor, k: int, ctx: Context) -> Reduction:
    """``x`` ``[N, D]`` -> the ``k`` tokens with the highest ``ctx.importance`` ``[N]`` (LLM attention received)."""
    if ctx.importance is None:
        raise RuntimeError("in-LLM methods are run by the session with the LLM's attention as importance")
    keep = ctx.importance.float().topk(k).indices.sort().values
    return Reduction(keep)


register(
    "fastv",
    needs=("llm_attention",),
    stage="llm",
    description="inside the LLM: after layer K keep the visual tokens the last prompt token attends to most (FastV)",
    options={
        "layer": Option(None, "K: layers 0..K-1 see every token (default 2, FastV's; at most #layers - 1)", _layer_ok),
        "rows": ROWS,
    },
)(top_attended)

register(
    "pdrop",
    needs=("llm_attention",),
    stage="llm",
    description="inside the LLM: drop visual tokens in stages, geometrically to the budget (PyramidDrop)",
    options={
        "layers": Option(None, "stage layers, increasing (default: 1/4, 1/2, 3/4 of the depth)", _layers_ok),
        "schedule": Option(
            None, "explicit [(layer, keep fraction), ...], decreasing fractions; replaces the budget", _schedule_ok
        ),
        "rows": ROWS,
    },
)(top_attended)


def stage_layers(name: str, options: dict, n_layers: int, scorable: list[int] | None = None) -> list[int]:
    """The layers before which each stage prunes (``1 <= layer < n_layers``).

    ``scorable``: the layers whose attention can score (full attention; ``None``: all). A stage at layer ``s`` is
    scored by layer ``s - 1``, so on a hybrid decoder a default stage moves to the next layer after a full-attention
    one. ``ValueError`` when an explicit layer does not fit the model."""
    if n_layers < 2:
        raise ValueError(f"{name}: the language model has {n_layers} layer(s); in-LLM pruning needs at least 2")
    ok = [s for s in range(1, n_layers) if scorable is None or s - 1 in scorable]
    if not ok:
        raise ValueError(f"{name}: no layer of this language model can score (no full-attention layer but the last)")
    explicit = None
    if name == "fastv" and options.get("layer") is not None:
        explicit = [options["layer"]]
    elif options.get("schedule") is not None:
        explicit = [int(a) for a, _ in options["schedule"]]
    elif options.get("layers") is not None:
        explicit = list(options["layers"])
    if explicit is None:
        wanted = [2] if name == "fastv" else [round(n_layers * f) for f in (0.25, 0.5, 0.75)]
        return sorted({next((s for s in ok if s >= min(max(1, w), n_layers - 1)), ok[-1]) for w in wanted})
    if explicit[-1] >= n_layers:
        raise ValueError(
            f"{name}: stage layer {explicit[-1]} does not fit a language model of {n_layers} layers "
            f"(valid: 1..{n_layers - 1})"
        )
    bad = [s for s in explicit if s not in ok]
    if bad:
        raise ValueError(
            f"{name}: stage layer(s) {bad} follow a layer without attention to score with (linear attention); "
            f"valid stage layers: {ok}"
        )
    return explicit


def stage_quota(n: int, final: int, stage: int, stages: int, ratios: list[float] | None = None) -> int:
    """Tokens a segment of ``n`` keeps after stage ``stage`` (1-based) of ``stages``.

    Geometric from ``n`` to ``final`` (PyramidDrop's constant ratio per stage: at budget 0.125 over three stages,
    50 / 25 / 12.5 %); ``ratios``: an explicit schedule's keep fractions instead."""
    if ratios is not None:
        return min(n, max(1, round(ratios[stage - 1] * n)))
    if stage >= stages or final >= n:
        return min(n, final)
    return min(n, max(final, round(n * (final / n) ** (stage / stages))))


def mean_tokens(per_layer: list[int]) -> float:
    """Mean over the LLM's layers (the FLOP-comparable token count)."""
    return sum(per_layer) / len(per_layer) if per_layer else math.nan
