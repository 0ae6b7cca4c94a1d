"""ToMe-style bipartite soft matching, size-weighted, repeated until the quota is met."""

from __future__ import annotations

import torch

from .. import kernels
from .base import Context, Reduction, register


def tome_groups(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The merging schedule of :func:`tome` on ``B`` segments at once.

    Args:
        x: ``[B, N, D]`` tokens (equal-size segments merge in lock step: the rounds depend on ``N`` and ``k`` only).
        k: tokens left per segment (``1 <= k < N``).
    Returns:
        ``(keep [B, k], group [B, N])``: the original index representing each merged token (ascending) and, for every
        original token, the row of ``keep`` it was merged into.

    Merged tokens are carried as running sums and sizes (``O(M D)`` per round), never as a membership matrix. The
    merges equal those of the previous membership-matrix form (``members @ x`` per round) on inputs without exact
    ties; with exactly duplicated tokens (flat image regions) the merged means round differently, so equally scored
    pairs may be taken in another order: an equally valid merge, not the same one.
    """
    bsz, n, d = x.shape
    dev = x.device
    sums = x.float().clone()  # [B, M, D] sum of each current token's members
    size = torch.ones(bsz, n, device=dev)  # [B, M] members per current token
    rep = torch.arange(n, device=dev).expand(bsz, n).contiguous()  # original index representing each current token
    group = rep.clone()  # [B, N] current token holding each original token
    rows = torch.arange(bsz, device=dev)[:, None]
    m = n
    while m > k:
        n_a = (m + 1) // 2
        r = min(m - k, max(1, n_a // 2))
        feats = sums / size[..., None]
        score, match = kernels.sim_argmax(feats[:, 0::2], feats[:, 1::2])  # [B, |A|]: best B partner per A token
        src_a = score.argsort(dim=1, descending=True)[:, :r]
        src, dst = 2 * src_a, 2 * match.gather(1, src_a) + 1  # positions among the current tokens
        sums.index_put_((rows, dst), sums[rows, src], accumulate=True)
        size.index_put_((rows, dst), size[rows, src], accumulate=True)
        alive = torch.ones(bsz, m, dtype=torch.bool, device=dev)
        alive[rows, src] = False
        into = torch.arange(m, device=dev).expand(bsz, m).clone()
        into[rows, src] = dst  # where each current token goes
        new_pos = alive.long().cumsum(1) - 1  # its index among the survivors
        group = new_pos.gather(1, into.gather(1, group))
        m -= r
        sums, size, rep = sums[alive].view(bsz, m, d), size[alive].view(bsz, m), rep[alive].view(bsz, m)
    keep, order = rep.sort(1)
    rank = order.argsort(1)  # sorted row of every current token
    return keep, rank.gather(1, group)


def group_weights(group: torch.Tensor, k: int) -> torch.Tensor:
    """``group`` ``[N]`` (row of every token) -> ``[k, N]`` weights: the mean of each row's members."""
    n = group.numel()
    w = torch.zeros(k, n, device=group.device)
    w[group, torch.arange(n, device=group.device)] = 1.0
    return w / w.sum(1, keepdim=True)


def tome_batch(x: torch.Tensor, k: int, ctxs: list[Context]) -> list[Reduction]:
    """:func:`tome` on ``B`` segments of equal size at once: ``x`` ``[B, N, D]`` -> ``B`` reductions of ``k``."""
    keep, group = tome_groups(x, k)
    return [Reduction(keep[s], group_weights(group[s], k)) for s in range(x.shape[0])]


@register("tome", description="size-weighted bipartite token merging (ToMe)")
def tome(x: torch.Tensor, k: int, ctx: Context) -> Reduction:
    """Merge ``x`` ``[N, D]`` down to ``k`` tokens.

    Each round splits the current tokens alternately into sets A and B, links every A token to its most similar B
    token, and merges the ``r`` best-linked A tokens into their B partners, ``r`` at most half of A — so a round
    never forces the worst-matched tokens (a small object next to background) to merge just to halve the count, as
    ToMe's gradual per-layer merging never does. A merged token is the size-weighted mean of its members and keeps
    the position of its B representative.
    """
    return tome_batch(x[None], k, [ctx])[0]
