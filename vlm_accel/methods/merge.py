"""ToMe-style bipartite soft matching, size-weighted, repeated until the quota is met."""

from __future__ import annotations

import torch

from .base import Context, Reduction, register


@register("tome", description="size-weighted bipartite token merging (ToMe)")
def tome(x: torch.Tensor, k: int, ctx: Context) -> Reduction:
    """Merge ``x`` ``[N, D]`` down to ``k`` tokens.

    Each round splits the current tokens alternately into sets A and B, links every A token to its most similar B
    token, and merges the ``r`` best-linked A tokens into their B partners, ``r`` at most half of A — so a round
    never forces the worst-matched tokens (a small object next to background) to merge just to halve the count, as
    ToMe's gradual per-layer merging never does. A merged token is the size-weighted mean of its members and keeps
    the position of its B representative.
    """
    n = x.shape[0]
    members = torch.eye(n, device=x.device)  # [M, N]: which original tokens each current token holds
    rep = torch.arange(n, device=x.device)  # original index representing each current token
    xf = x.float()
    while rep.numel() > k:
        m = rep.numel()
        size = members.sum(1, keepdim=True)
        feats = torch.nn.functional.normalize(members @ xf / size, dim=-1)
        a, b = torch.arange(0, m, 2, device=x.device), torch.arange(1, m, 2, device=x.device)
        r = min(m - k, max(1, a.numel() // 2))
        score, match = (feats[a] @ feats[b].T).max(1)
        order = score.argsort(descending=True)
        src, dst = a[order[:r]], b[match[order[:r]]]
        members = members.index_add(0, dst, members[src])
        alive = torch.ones(m, dtype=torch.bool, device=x.device)
        alive[src] = False
        members, rep = members[alive], rep[alive]
    order = rep.argsort()
    members = members[order]
    return Reduction(rep[order], members / members.sum(1, keepdim=True))
