"""Temporal merging for video (FrameFusion / HoliTom style): a token that stays the same across consecutive frames
is one token, not many."""

from __future__ import annotations

import torch

from .. import kernels
from .base import Context, Reduction, register
from .merge import group_weights, tome, tome_groups

STATIC_SIMILARITY = 0.9  # cosine above which a token continues the previous frame's token at the same position


def temporal_runs(x: torch.Tensor, frames: int, tau: float = STATIC_SIMILARITY, runs: int = 0) -> torch.Tensor:
    """Run id of every token of a clip ``x`` ``[frames * P, D]`` (frame-major).

    A run is a chain of tokens at one spatial position, linked frame to frame. A link whose cosine similarity is at
    most ``tau`` is cut (the content changed); with ``runs`` > 0, further links are cut, least similar first, until
    there are ``runs`` runs, so a budget that allows more tokens than the clip has changes spends them where the
    content changes most (on DINOv2-like features a colour change can stay above ``tau``).
    Returns ``[frames * P]`` run ids, numbered in order of the run's first token.
    """
    p = x.shape[0] // frames
    xs = x.reshape(frames, p, -1)
    starts = torch.ones(frames, p, dtype=torch.bool, device=x.device)
    sim = kernels.patch_similarity(xs[1:], xs[:-1]).float()  # [frames - 1, P] frame difference
    cut = sim <= tau
    spare = runs - p - int(cut.sum())
    if spare > 0:  # the least similar links still standing (stable: ties cut in frame order)
        order = torch.argsort(sim.masked_fill(cut, float("inf")).view(-1), stable=True)[:spare]
        cut.view(-1)[order] = True
    starts[1:] = cut
    index = torch.arange(frames * p, device=x.device).view(frames, p)
    # each token's run starts at the latest start at or before it (indices grow with the frame): a running max
    run_first = torch.where(starts, index, -1).cummax(0).values
    _, run_id = torch.unique(run_first.view(-1), sorted=True, return_inverse=True)
    return run_id


@register(
    "temporal",
    needs=("clip", "full_grid"),
    description="merge tokens static across frames (least changing first), then ToMe-merge to the quota (video)",
)
def temporal(x: torch.Tensor, k: int, ctx: Context) -> Reduction:
    """``x`` ``[frames * h * w, D]`` -> ``k`` tokens.

    A token continues the previous frame's token at its position while the two stay alike; the quota decides how
    alike: the links between consecutive frames are kept most similar first, and every link at most
    :data:`STATIC_SIMILARITY` similar is cut (:func:`temporal_runs`). Each run is averaged and kept at its first
    frame (so Qwen's temporal position of the survivor is where the content appeared). If the cut links alone leave
    more runs than ``k``, the run means are merged further with ToMe (each run counting as one token in its
    matching); a merged token is the mean of all its original tokens. Single images fall back to ToMe.
    """
    n = x.shape[0]
    if ctx.frames < 2 or n % ctx.frames:
        return tome(x, k, ctx)
    run_id = temporal_runs(x, ctx.frames, runs=k)
    runs = int(run_id.max()) + 1
    token = torch.arange(n, device=x.device)
    first = torch.full((runs,), n, dtype=torch.long, device=x.device).scatter_reduce(0, run_id, token, "amin")
    if runs <= k:
        return Reduction(first, group_weights(run_id, runs))
    count = torch.zeros(runs, device=x.device).index_add_(0, run_id, torch.ones(n, device=x.device))
    means = torch.zeros(runs, x.shape[1], device=x.device).index_add_(0, run_id, x.float()) / count[:, None]
    keep, group = tome_groups(means[None], k)  # merge run means down to k
    return Reduction(first[keep[0]], group_weights(group[0][run_id], k))
