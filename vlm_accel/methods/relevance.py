"""Question-relevance selection: keep the visual tokens closest to the question's words, then cover the rest of the
image diversely (so questions that name nothing specific, e.g. counting, still see every object)."""

from __future__ import annotations

import math

import torch

from .. import kernels
from .base import Context, Reduction, register
from .diversity import divprune_batch

RELEVANT_SHARE = 0.5  # of the quota chosen by relevance; the rest by max-min diversity around them


def question_relevance(x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, D]`` visual tokens, ``query`` ``[T, D]`` text-token embeddings (same space) -> ``[N]``: each
    token's best cosine similarity to any text token."""
    return kernels.sim_argmax(x, query.to(x.device))[0]


@register("relevance", needs=("query",), description="tokens nearest the question's words + diverse coverage")
def relevance(x: torch.Tensor, k: int, ctx: Context) -> Reduction:
    """``x`` ``[N, D]`` -> ``k`` tokens: ``ceil(k * RELEVANT_SHARE)`` by :func:`question_relevance` to the prompt's
    text tokens (``ctx.query``), the rest max-min diverse given those. Without a query: all by diversity."""
    return relevance_batch(x[None], k, [ctx])[0]


def relevance_batch(x: torch.Tensor, k: int, ctxs: list[Context]) -> list[Reduction]:
    """:func:`relevance` on ``B`` segments of equal size and one query (``ctxs[0].query``, segments of one prompt)
    at once: ``x`` ``[B, N, D]`` -> ``B`` reductions of ``k``."""
    query = ctxs[0].query
    if query is None or query.numel() == 0:
        return divprune_batch(x, k, ctxs)
    k_rel = min(k, math.ceil(k * RELEVANT_SHARE))
    bsz, n, _ = x.shape
    score = kernels.sim_argmax(x, query.to(x.device).expand(bsz, *query.shape))[0]  # [B, N]
    rel = score.topk(k_rel, dim=1).indices  # [B, k_rel]
    if k_rel == k:
        return [Reduction(t.sort().values) for t in rel]
    init = torch.zeros(bsz, n, dtype=torch.bool, device=x.device)
    init.scatter_(1, rel, True)
    rest = kernels.max_min_select(x, k - k_rel, init=init)  # [B, k - k_rel]: max-min diverse given rel
    return [Reduction(torch.cat([rel[s], rest[s]]).sort().values) for s in range(bsz)]
