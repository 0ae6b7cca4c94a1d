"""Temporal merging for video (FrameFusion / HoliTom style): a token that stays the same across consecutive frames
is one token, not many."""

from __future__ import annotations

import torch

from .. import kernels
from .base import Context, Reduction, register
from .merge import group_weights, tome, tome_groups

STATIC_SIMILARITY = 0.9  # cosine above which a token continues the previous frame's token at the same position


def temporal_runs(x: torch.Tensor, frames: int, tau: float = STATIC_SIMILARITY) -> torch.Tensor:
    """Run id of every token of a clip ``x`` ``[frames * P, D]`` (frame-major).

    A run is a maximal chain of tokens at one spatial position whose consecutive cosine similarity exceeds ``tau``.
    Returns ``[frames * P]`` run ids, numbered in order of the run's first token.
    """
    p = x.shape[0] // frames
    xs = x.reshape(frames, p, -1)
    starts = torch.ones(frames, p, dtype=torch.bool, device=x.device)
    starts[1:] = kernels.patch_similarity(xs[1:], xs[:-1]) <= tau  # [frames - 1, P] frame difference
    index = torch.arange(frames * p, device=x.device).view(frames, p)
    # each token's run starts at the latest start at or before it (indices grow with the frame): a running max
    run_first = torch.where(starts, index, -1).cummax(0).values
    _, run_id = torch.unique(run_first.view(-1), sorted=True, return_inverse=True)
    return run_id


@register(
    "temporal",
    needs=("clip",),
    exact=False,
    description="merge tokens static across frames, then ToMe-merge to the quota (video)",
)
def temporal(x: torch.Tensor, k: int, ctx: Context) -> Reduction:
    """``x`` ``[frames * h * w, D]`` -> at most ``k`` tokens.

    Static tokens are averaged along their run and kept at the run's first frame (so Qwen's temporal position of the
    survivor is where the content appeared). If more runs than ``k`` remain, the run means are merged further with
    ToMe (each run counting as one token in its matching); a merged token is the mean of all its original tokens.
    Single images fall back to ToMe.
    """
    n = x.shape[0]
    if ctx.frames < 2 or n % ctx.frames:
        return tome(x, k, ctx)
    run_id = temporal_runs(x, ctx.frames)
    runs = int(run_id.max()) + 1
    token = torch.arange(n, device=x.device)
    first = torch.full((runs,), n, dtype=torch.long, device=x.device).scatter_reduce(0, run_id, token, "amin")
    if runs <= k:
        return Reduction(first, group_weights(run_id, runs))
    count = torch.zeros(runs, device=x.device).index_add_(0, run_id, torch.ones(n, device=x.device))
    means = torch.zeros(runs, x.shape[1], device=x.device).index_add_(0, run_id, x.float()) / count[:, None]
    keep, group = tome_groups(means[None], k)  # merge run means down to k
    return Reduction(first[keep[0]], group_weights(group[0][run_id], k))
