"""DivPrune-style selection: the max-min diverse subset of tokens (greedy k-center on cosine distance)."""

from __future__ import annotations

import torch

from .. import kernels
from .base import Context, Reduction, register


def max_min_diverse(x: torch.Tensor, k: int, init: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy farthest-point selection. ``x`` ``[N, D]`` -> ``[k]`` indices (in selection order).

    Starts from ``init`` (indices already chosen, not counted in ``k``) or else from the token with the largest mean
    cosine distance, then repeatedly adds the token whose distance to its nearest chosen token is largest.

    Deviation from DivPrune's code (same objective): its first pick is the token whose nearest neighbour is
    farthest; ours is the token of largest mean distance, the one least like the image as a whole, which does not
    hinge on a single nearest neighbour (two near-duplicate outliers would hide each other). Starting from their
    first pick (``init``) reproduces their selection order exactly. Chosen tokens are excluded (``-inf``), so
    duplicate tokens never give a repeated index, which DivPrune's can; and the running minimum distance is updated
    incrementally, ``O(kN)`` per selection instead of ``O(k^2 N)``.

    :func:`vlm_accel.kernels.max_min_select` does the work: on CUDA without an ``N x N`` matrix (the mean distance is
    ``1 - x_i . mean(x)`` on unit rows, each pick one fused matrix-vector kernel for every segment); on CPU with one
    distance matrix per segment when it fits (a matrix product, then each pick reads a row).
    """
    mask = None
    if init is not None and init.numel():
        mask = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        mask[init.to(x.device)] = True
    return kernels.max_min_select(x, k, init=mask)


def divprune_batch(x: torch.Tensor, k: int, ctxs: list[Context]) -> list[Reduction]:
    """:func:`divprune` on ``B`` segments of equal size at once: ``x`` ``[B, N, D]`` -> ``B`` reductions of ``k``.

    Every pick is one batched matrix-vector product (one fused kernel launch on CUDA) for all segments, instead of
    one per segment."""
    chosen = kernels.max_min_select(x, k)  # [B, k]
    return [Reduction(c.sort().values) for c in chosen]


@register("divprune", description="max-min diversity subset (DivPrune)")
def divprune(x: torch.Tensor, k: int, ctx: Context) -> Reduction:
    """``x`` ``[N, D]`` -> the ``k`` most mutually diverse tokens."""
    return divprune_batch(x[None], k, [ctx])[0]
