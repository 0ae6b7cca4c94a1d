"""Question-relevance selection: keep the visual tokens closest to the question's words, then cover the rest of the
image diversely (so questions that name nothing specific, e.g. counting, still see every object)."""

from __future__ import annotations

import math

import torch

from .base import Context, Reduction, register
from .diversity import divprune, max_min_diverse

RELEVANT_SHARE = 0.5  # of the quota chosen by relevance; the rest by max-min diversity around them


def question_relevance(x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, D]`` visual tokens, ``query`` ``[T, D]`` text-token embeddings (same space) -> ``[N]``: each
    token's best cosine similarity to any text token."""
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    qn = torch.nn.functional.normalize(query.float().to(x.device), dim=-1)
    return (xn @ qn.T).max(1).values


@register("relevance", needs=("query",), description="tokens nearest the question's words + diverse coverage")
def relevance(x: torch.Tensor, k: int, ctx: Context) -> Reduction:
    """``x`` ``[N, D]`` -> ``k`` tokens: ``ceil(k * RELEVANT_SHARE)`` by :func:`question_relevance` to the prompt's
    text tokens (``ctx.query``), the rest max-min diverse given those. Without a query: all by diversity."""
    if ctx.query is None or ctx.query.numel() == 0:
        return divprune(x, k, ctx)
    k_rel = min(k, math.ceil(k * RELEVANT_SHARE))
    rel = question_relevance(x, ctx.query).topk(k_rel).indices
    if k_rel == k:
        return Reduction(rel.sort().values)
    rest = max_min_diverse(x, k - k_rel, init=rel)
    return Reduction(torch.cat([rel, rest]).sort().values)
