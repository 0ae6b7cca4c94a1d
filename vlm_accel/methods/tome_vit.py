"""ToMe inside the vision tower (Bolya et al. 2023), the math: ``tome_vit``'s merge schedule, one bipartite
soft-matching round on a batch of views, and proportional attention. Pure functions of tensors; the hooks that run
them between the tower's layers live in :mod:`vlm_accel.tower.merge`.
"""

from __future__ import annotations

import torch

from .. import kernels
from .base import Option, Reduction, register

SCHEDULES = ("constant", "decreasing", "steep", "cubic", "front")
_POWER = {"decreasing": 1, "steep": 2, "cubic": 3}


def merge_schedule(n: int, k: int, points: int, kind: str = "cubic") -> list[int]:
    """Tokens to remove at each of ``points`` merge points to go from ``n`` mergeable tokens to ``k``.

    ``constant``: the same ``r`` everywhere (ToMe's default); ``decreasing``: ``r`` falling linearly to about 0 at
    the last point (ToMe's decreasing schedule: most merging early, where it saves most compute); ``steep``: ``r``
    falling quadratically (more merging still in the first layers); ``cubic``: cubically (more still; on the
    embedded default it keeps 99.0 % of full accuracy at 0.33 on 500 held-out questions, ``steep`` 99.2 %, and
    runs its tower on ~6 % fewer tokens); ``front``: as
    many as one bipartite round allows (half the tokens) at every point until ``k`` is reached. A point may ask
    for more than half its tokens (few points, small ``k``): it then runs several rounds."""
    total = max(0, n - k)
    if points < 1 or total == 0:
        return [0] * max(points, 0)
    if kind == "constant":
        return [total // points + (i < total % points) for i in range(points)]
    if kind in _POWER:
        weights = [(points - i) ** _POWER[kind] for i in range(points)]
        cum = [round(total * sum(weights[: i + 1]) / sum(weights)) for i in range(points)]
        return [c - p for c, p in zip(cum, [0, *cum[:-1]], strict=True)]
    if kind == "front":
        out, m = [], n
        for _ in range(points):
            r = min(m // 2, m - k)
            out.append(r)
            m -= r
        out[-1] += m - k  # more than one round at the last point when halving every point is not enough
        return out
    raise ValueError(f"tome_vit: schedule must be one of {SCHEDULES}, got {kind!r}")


def bipartite_round(
    x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int, prefix: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe round on ``B`` views at once.

    Args:
        x: ``[B, M, C]`` current tokens (the first ``prefix`` never merge; the rest in their representatives' order).
        metric: ``[B, M, E]`` what similarity is measured on (keys averaged over heads).
        size: ``[B, M]`` patches each token stands for.
        r: tokens to remove, at most half of the mergeable ones.
    Returns:
        ``(x [B, M - r, C], metric [B, M - r, E], size [B, M - r], alive [B, M], into [B, M])``: the merged tokens
        (size-weighted means), which current tokens survive, and the current index each token was merged into
        (itself for survivors).

    The mergeable tokens alternate between sets A (even) and B (odd); every A token finds its most similar B token
    (cosine), and the ``r`` A tokens with the best matches are folded into their partners. Tokens and metric travel
    as one ``[B, M, C + E + 1]`` block (the last column the size), so a round is one gather, one scatter-add and
    one scatter; only the merged groups' rows are recomputed (every other token keeps its bits)."""
    bsz, m, c = x.shape
    score, match = kernels.sim_argmax(metric[:, prefix::2], metric[:, prefix + 1 :: 2])  # [B, |A|]
    best = score.argsort(dim=1, descending=True, stable=True)[:, :r]
    src = best * 2 + prefix
    dst = match.gather(1, best) * 2 + (prefix + 1)
    alive = torch.ones(bsz, m, dtype=torch.bool, device=x.device).scatter_(1, src, False)
    into = torch.arange(m, device=x.device).expand(bsz, m).scatter(1, src, dst)
    # rows of the flattened [B * M, W] block [x | metric | size]: whole-row gathers and adds, no per-element index
    offset = torch.arange(0, bsz * m, m, device=x.device)[:, None]
    src, dst = (src + offset).view(-1), (dst + offset).view(-1)
    w = size.float().view(-1, 1)
    block = torch.cat([x.float().reshape(bsz * m, -1), metric.float().reshape(bsz * m, -1), w], -1)
    sums = block * w
    sums[:, -1:] = w
    sums.index_add_(0, dst, sums.index_select(0, src))
    merged = sums.index_select(0, dst)  # a group's row once per member it took (equal values)
    merged[:, :-1] /= merged[:, -1:]
    keep = alive.view(-1).nonzero().view(-1)  # (a boolean row mask would index element by element)
    out = block.index_copy_(0, dst, merged).index_select(0, keep).view(bsz, m - r, -1)
    return (
        out[..., :c].to(x.dtype).contiguous(),
        out[..., c:-1].to(metric.dtype),
        out[..., -1].to(size.dtype),
        alive,
        into,
    )


def proportional_bias(size: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``[B, M]`` sizes -> the ``[B, 1, 1, M]`` additive attention bias ``log(size)``."""
    return size.float().log().to(dtype)[:, None, None, :]


# --- the registry entry -------------------------------------------------------------------------------------------
def _never(x, k, ctx) -> Reduction:
    raise RuntimeError("tome_vit acts inside the vision tower; it is not a pre-LLM reducer")


def _schedule_ok(v) -> bool:
    return v in SCHEDULES


def _start_ok(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


register(
    "tome_vit",
    description="inside the vision tower: ToMe merging between layers, proportional attention (LLaVA-family towers)",
    exact=False,
    stage="tower",
    options={
        "schedule": Option("cubic", f"tokens merged per layer: one of {SCHEDULES}", _schedule_ok),
        "start": Option(0, "first layer after which tokens merge (default 0)", _start_ok),
    },
)(_never)
