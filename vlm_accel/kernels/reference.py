"""Plain torch references of the kernel ops: the definition each Triton kernel is tested against, and the path every
op takes on CPU (or without triton).

All ops are batched over segments: a leading ``B`` axis, padded rows masked by a per-segment length. Every op works in
fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch

ROW_ELEMENTS = 1 << 24  # attention_scores materialises at most this many logits at once
CACHE_ELEMENTS = 1 << 22  # max_min_select's matrix form handles at most this many token features at once (16 MB)
GRAM_ELEMENTS = 1 << 26  # max_min_select computes the full distance matrix up to this size (256 MB in fp32)
EPS = 1e-12  # torch.nn.functional.normalize's eps: x / max(||x||, EPS)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``[..., D]`` scaled to unit length, in fp32."""
    return torch.nn.functional.normalize(x.float(), dim=-1, eps=EPS)


def valid_mask(lengths: torch.Tensor | None, b: int, n: int, device) -> torch.Tensor:
    """``[B, N]`` bool, True for the first ``lengths[b]`` rows of segment ``b`` (all True when ``lengths`` is None)."""
    if lengths is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    return torch.arange(n, device=device)[None, :] < lengths.to(device)[:, None]


def sim_argmax(
    a: torch.Tensor, b: torch.Tensor, b_len: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine match in ``b`` of every row of ``a``.

    Args:
        a: ``[B, M, D]`` query rows.
        b: ``[B, P, D]`` candidate rows.
        b_len: ``[B]`` valid candidates per segment (rows ``>= b_len[s]`` never match), or ``None``.
    Returns:
        ``(values [B, M] fp32, index [B, M] long)``: the largest cosine similarity and the first candidate reaching
        it (``-inf`` / 0 when a segment has no valid candidate).
    """
    sim = normalize(a) @ normalize(b).transpose(1, 2)  # [B, M, P]
    if b_len is not None:
        sim = sim.masked_fill(~valid_mask(b_len, b.shape[0], b.shape[1], b.device)[:, None, :], float("-inf"))
    return sim.max(-1)


def max_min_select(
    x: torch.Tensor,
    k: int,
    lengths: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    gram: bool | None = None,
) -> torch.Tensor:
    """Greedy max-min (farthest-point) selection on cosine distance, batched over segments.

    Args:
        x: ``[B, N, D]`` tokens.
        k: picks per segment (``k <= lengths[s] - |init[s]|``; a segment needing fewer uses a prefix, the greedy order
            being prefix-consistent).
        lengths: ``[B]`` valid tokens per segment, or ``None`` (all ``N``).
        init: ``[B, N]`` bool, tokens already chosen (not counted in ``k``), or ``None``.
        gram: compute the ``[B, N, N]`` distance matrix once (fast on a CPU: one matrix product, then each pick
            reads a row) or one matrix-vector product per pick (what the kernel does; memory ``O(BN)``). ``None``:
            the matrix when it holds at most ``GRAM_ELEMENTS`` entries.
    Returns:
        ``[B, k]`` indices in selection order. Without ``init`` the first pick is the token of largest mean cosine
        distance to the segment; each next pick is the token whose distance to its nearest chosen token is largest
        (first index on ties).
    """
    bsz, n, d = x.shape
    if gram is None:
        gram = bsz * n * n <= GRAM_ELEMENTS
    per = max(1, CACHE_ELEMENTS // (n * d))
    if gram and bsz > per:  # a few segments at a time, so each one's tokens are still in cache for its matrix

        def part(t, i):
            return None if t is None else t[i : i + per]

        return torch.cat(
            [max_min_select(x[i : i + per], k, part(lengths, i), part(init, i), True) for i in range(0, bsz, per)]
        )
    xn = normalize(x)
    valid = valid_mask(lengths, bsz, n, x.device)
    if gram:
        dist = torch.bmm(xn, xn.transpose(1, 2)).neg_().add_(1.0)  # [B, N, N] 1 - cos, in place (same rounding)
        min_d, first = _gram_state(dist, valid, lengths, init)
    else:
        min_d, first = initial_state(xn, valid, init)
    chosen = torch.empty(bsz, k, dtype=torch.long, device=x.device)
    rows = torch.arange(bsz, device=x.device)
    for i in range(k):
        c = first if i == 0 else min_d.argmax(1)
        chosen[:, i] = c
        if i + 1 < k:
            d = dist[rows, c] if gram else 1.0 - torch.bmm(xn, xn[rows, c].unsqueeze(2)).squeeze(2)  # [B, N]
            min_d = torch.minimum(min_d, d)
            min_d[rows, c] = -torch.inf  # chosen tokens stay at -inf: min() never lifts them
    return chosen


def _gram_state(
    dist: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor | None, init: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`initial_state` from the distance matrix ``dist`` ``[B, N, N]``."""
    neg = torch.tensor(float("-inf"), device=dist.device)
    if init is not None and bool(init.any()):
        init = init.to(dist.device)
        nearest = torch.full(valid.shape, float("inf"), device=dist.device)
        for s in range(dist.shape[0]):
            if init[s].any():
                nearest[s] = dist[s, init[s]].min(0).values
        min_d = torch.where(valid & ~init, nearest, neg)
        return min_d, min_d.argmax(1)
    if lengths is None:
        mean_d = dist.mean(2)
    else:
        mean_d = dist.masked_fill(~valid[:, None, :], 0.0).sum(2) / lengths.to(dist.device)[:, None].float()
    min_d = torch.where(valid, torch.tensor(float("inf"), device=dist.device), neg)
    return min_d, torch.where(valid, mean_d, neg).argmax(1)


def initial_state(
    xn: torch.Tensor, valid: torch.Tensor, init: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min_d [B, N], first pick [B])`` of :func:`max_min_select` on unit rows ``xn`` (shared with the kernel)."""
    neg = torch.tensor(float("-inf"), device=xn.device)
    if init is not None and bool(init.any()):
        init = init.to(xn.device)
        nearest = torch.full(valid.shape, float("-inf"), device=xn.device)
        for s in range(xn.shape[0]):  # a few segments; each one's chosen set has its own size
            if init[s].any():
                nearest[s] = (xn[s] @ xn[s, init[s]].T).max(1).values
        min_d = torch.where(valid & ~init, 1.0 - nearest, neg)
        return min_d, min_d.argmax(1)
    w = valid.float()
    mean = (xn * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)  # [B, D]
    mean_d = torch.where(valid, 1.0 - torch.bmm(xn, mean.unsqueeze(2)).squeeze(2), neg)
    min_d = torch.where(valid, torch.tensor(float("inf"), device=xn.device), neg)
    return min_d, mean_d.argmax(1)


def patch_similarity(a: torch.Tensor, b: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Row-wise similarity of ``a`` and ``b`` ``[M, D]`` -> ``[M]`` fp32.

    ``metric="cosine"``: cosine similarity of unit rows; ``"l1"``: mean absolute difference over ``D`` (frame cache,
    on pixels). Frame difference of a clip ``x`` ``[T, P, D]``: ``patch_similarity(x[1:].flatten(0, 1),
    x[:-1].flatten(0, 1)).view(T - 1, P)``.
    """
    if metric == "cosine":
        return (normalize(a) * normalize(b)).sum(-1)
    if metric == "l1":
        return (a.float() - b.float()).abs().mean(-1)
    raise ValueError(f"patch_similarity: metric must be 'cosine' or 'l1', got {metric!r}")


def attention_scores(
    q: torch.Tensor, k: torch.Tensor, scaling: float, allowed: torch.Tensor | None = None, reduce: str = "mean"
) -> torch.Tensor:
    """Attention each key receives from a few query rows: softmax over keys in fp32, averaged over the rows.

    Args:
        q: ``[B, H, R, hd]`` queries.
        k: ``[B, H_kv, L, hd]`` keys (``H`` a multiple of ``H_kv``; query head ``h`` reads key head
            ``h // (H // H_kv)``).
        scaling: softmax scale.
        allowed: ``[B, R, L]`` bool, False where a row may not attend, or ``None``. A row with no allowed key
            contributes zeros.
        reduce: ``"mean"`` -> ``[B, L]`` mean over heads and rows; ``"head"`` -> ``[B, H, L]`` mean over rows.
    """
    b, h, r, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    qg = q.float().view(b, hkv, h // hkv, r, d)
    chunk = max(1, ROW_ELEMENTS // max(1, b * h * length))  # rows per step: bounded memory when every row queries
    total = torch.zeros(b, h, length, device=q.device)
    for r0 in range(0, r, chunk):
        logits = torch.einsum("bgnrd,bgld->bgnrl", qg[:, :, :, r0 : r0 + chunk], k.float()).flatten(1, 2) * scaling
        if allowed is not None:
            logits = logits.masked_fill(~allowed[:, r0 : r0 + chunk].bool()[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # [B, H, rows, L]
        if allowed is not None:
            probs = torch.nan_to_num(probs, nan=0.0)  # a row with no allowed key: zeros
        total += probs.sum(2)
    per_head = total / r
    if reduce == "head":
        return per_head
    if reduce == "mean":
        return per_head.mean(1)
    raise ValueError(f"attention_scores: reduce must be 'mean' or 'head', got {reduce!r}")
