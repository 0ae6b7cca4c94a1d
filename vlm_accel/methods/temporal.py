"""Temporal merging for video (FrameFusion / HoliTom style): a token that stays the same across consecutive frames
is one token, not many."""

from __future__ import annotations

import torch

from .base import Context, Reduction, register
from .merge import tome

STATIC_SIMILARITY = 0.9  # cosine above which a token continues the previous frame's token at the same position


def temporal_runs(x: torch.Tensor, frames: int, tau: float = STATIC_SIMILARITY) -> torch.Tensor:
    """Run id of every token of a clip ``x`` ``[frames * P, D]`` (frame-major).

    A run is a maximal chain of tokens at one spatial position whose consecutive cosine similarity exceeds ``tau``.
    Returns ``[frames * P]`` run ids, numbered in order of the run's first token.
    """
    p = x.shape[0] // frames
    xs = torch.nn.functional.normalize(x.float().view(frames, p, -1), dim=-1)
    starts = torch.ones(frames, p, dtype=torch.bool, device=x.device)
    starts[1:] = (xs[1:] * xs[:-1]).sum(-1) <= tau
    run_first = torch.arange(frames * p, device=x.device).view(frames, p)
    for t in range(1, frames):  # carry each run's first index forward while it continues
        run_first[t] = torch.where(starts[t], run_first[t], run_first[t - 1])
    first = run_first.view(-1)
    _, run_id = torch.unique(first, sorted=True, return_inverse=True)
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
    survivor is where the content appeared). If more runs than ``k`` remain, runs are merged further with ToMe.
    Single images fall back to ToMe.
    """
    n = x.shape[0]
    if ctx.frames < 2 or n % ctx.frames:
        return tome(x, k, ctx)
    run_id = temporal_runs(x, ctx.frames)
    runs = int(run_id.max()) + 1
    members = torch.zeros(runs, n, device=x.device)
    members[run_id, torch.arange(n, device=x.device)] = 1.0
    first = members.argmax(1)  # first member of each run (runs are numbered by first token, ascending)
    run_w = members / members.sum(1, keepdim=True)  # [R, N]
    if runs <= k:
        return Reduction(first, run_w)
    sub = tome(run_w @ x.float(), k, Context())  # merge run means down to k; weights over runs
    weights = sub.weights @ members  # back to original tokens, size-weighted over members
    return Reduction(first[sub.keep], weights / weights.sum(1, keepdim=True))
