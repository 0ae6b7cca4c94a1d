"""DivPrune-style selection: the max-min diverse subset of tokens (greedy k-center on cosine distance)."""

from __future__ import annotations

import torch

from .base import Context, Reduction, cosine_sim, register


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
    """
    dist = 1.0 - cosine_sim(x)  # [N, N]
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    if init is not None and init.numel():
        min_d = dist[init].min(0).values
        min_d[init] = -torch.inf
        start = 0
    else:
        chosen[0] = dist.mean(1).argmax()
        min_d = dist[chosen[0]].clone()
        min_d[chosen[0]] = -torch.inf  # chosen tokens stay at -inf: min() never lifts them
        start = 1
    for i in range(start, k):
        chosen[i] = min_d.argmax()
        min_d = torch.minimum(min_d, dist[chosen[i]])
        min_d[chosen[i]] = -torch.inf
    return chosen


@register("divprune", description="max-min diversity subset (DivPrune)")
def divprune(x: torch.Tensor, k: int, ctx: Context) -> Reduction:
    """``x`` ``[N, D]`` -> the ``k`` most mutually diverse tokens."""
    return Reduction(max_min_diverse(x, k).sort().values)
