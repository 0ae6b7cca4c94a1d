"""Many segments in one call: equal-size segments of a prompt (anyres crops, video frames, images) go through a
method's batched form together instead of one Python call each.

``reduce_segments(method, xs, ks, ctxs)`` returns what ``[method(x, k, ctx) for ...]`` returns (same kept sets,
same checks); methods without a batched form, and segments that match no other, take the per-segment path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import Context, Method, Reduction
from .baselines import pool, pool_batch
from .diversity import divprune, divprune_batch
from .importance import visionzip, visionzip_batch
from .merge import tome, tome_batch
from .relevance import relevance, relevance_batch

BatchFn = Callable[[torch.Tensor, int, list[Context]], list[Reduction]]

#: Per method name: the registered single-segment function and its batched form ``fn(x [B, N, D], k, ctxs) -> B
#: reductions``. ``random`` stays per segment (its generator's sequence must not depend on grouping); clip methods
#: (``temporal``) see one segment per clip anyway.
BATCHED: dict[str, tuple[Callable, BatchFn]] = {
    "divprune": (divprune, divprune_batch),
    "visionzip": (visionzip, visionzip_batch),
    "tome": (tome, tome_batch),
    "pool": (pool, pool_batch),
    "relevance": (relevance, relevance_batch),
}


def _key(x: torch.Tensor, k: int, ctx: Context) -> tuple:
    """Segments with equal keys can share one batched call."""
    query = None if ctx.query is None else id(ctx.query)
    return (tuple(x.shape), x.dtype, x.device, k, ctx.grid, ctx.frames, ctx.importance is None, query)


def reduce_segments(method: Method, xs: list[torch.Tensor], ks: list[int], ctxs: list[Context]) -> list[Reduction]:
    """``method`` on every segment: ``xs[i]`` ``[N_i, D]`` with quota ``ks[i]`` and evidence ``ctxs[i]``.

    Returns one :class:`Reduction` per segment, in order, equal to ``method(xs[i], ks[i], ctxs[i])``."""
    if not len(xs) == len(ks) == len(ctxs):
        raise ValueError(f"reduce_segments: {len(xs)} segments, {len(ks)} quotas and {len(ctxs)} contexts")
    out: list[Reduction | None] = [None] * len(xs)
    single, batch_fn = BATCHED.get(method.name, (None, None))
    if single is not method.fn:  # a name registered to another function has no batched form
        batch_fn = None
    groups: dict[tuple, list[int]] = {}
    for i, (x, k, ctx) in enumerate(zip(xs, ks, ctxs, strict=True)):
        if batch_fn is None or k >= x.shape[0]:
            out[i] = method(x, k, ctx)  # the per-segment path (also: nothing to reduce)
        else:
            groups.setdefault(_key(x, k, ctx), []).append(i)
    for idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = method(xs[idx[0]], ks[idx[0]], ctxs[idx[0]])
            continue
        k = ks[idx[0]]
        reds = batch_fn(torch.stack([xs[i] for i in idx]), k, [ctxs[i] for i in idx])
        for i, red in zip(idx, reds, strict=True):
            got = red.keep.numel()
            if got > k or (method.exact and got != k) or got == 0:
                raise RuntimeError(f"method {method.name!r} returned {got} tokens for a quota of {k}")
            out[i] = red
    return out
