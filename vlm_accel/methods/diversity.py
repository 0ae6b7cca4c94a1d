"""DivPrune-style selection: the max-min diverse subset of tokens (greedy k-center on cosine distance)."""

from __future__ import annotations

import torch

from .base import Context, Reduction, cosine_sim, register


def max_min_diverse(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy farthest-point selection. ``x`` ``[N, D]`` -> ``[k]`` indices (in selection order).

    Starts from the token with the largest mean cosine distance, then repeatedly adds the token whose distance to
    its nearest selected token is largest.
    """
    dist = 1.0 - cosine_sim(x)  # [N, N]
    first = dist.mean(1).argmax()
    chosen = [first]
    min_d = dist[first].clone()
    min_d[first] = -1.0
    for _ in range(k - 1):
        nxt = min_d.argmax()
        chosen.append(nxt)
        min_d = torch.minimum(min_d, dist[nxt])
        min_d[torch.stack(chosen)] = -1.0
    return torch.stack(chosen)


@register("divprune", description="max-min diversity subset (DivPrune)")
def divprune(x: torch.Tensor, k: int, ctx: Context) -> Reduction:
    """``x`` ``[N, D]`` -> the ``k`` most mutually diverse tokens."""
    return Reduction(max_min_diverse(x, k).sort().values)
