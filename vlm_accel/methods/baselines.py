"""Baselines that every method must beat: uniform random selection and spatial average pooling."""

from __future__ import annotations

import functools
import math

import torch

from .base import Context, Reduction, register


@register("random", description="uniformly random subset (seeded)")
def random_select(x: torch.Tensor, k: int, ctx: Context) -> Reduction:
    """``x`` ``[N, D]`` -> ``k`` tokens chosen uniformly at random."""
    perm = torch.randperm(x.shape[0], generator=ctx.generator)
    return Reduction(perm[:k].sort().values.to(x.device))


def pool_cells(h: int, w: int, k: int) -> list[tuple[int, int, int, int]]:
    """Partition an ``h x w`` grid into exactly ``k`` near-square rectangular cells ``(r0, r1, c0, c1)``.

    Rows of cells are chosen to match the aspect ratio; the ``k`` cells are spread over those rows so every cell is
    non-empty (requires ``k <= h * w``).
    """
    rows = max(1, min(h, k, round(math.sqrt(k * h / w))))
    while math.ceil(k / rows) > w:  # too few cell rows to fit k cells of width >= 1
        rows += 1
    per_row = [k // rows + (1 if i < k % rows else 0) for i in range(rows)]
    r_edges = [round(i * h / rows) for i in range(rows + 1)]
    cells = []
    for i, m in enumerate(per_row):
        c_edges = [round(j * w / m) for j in range(m + 1)]
        cells += [(r_edges[i], r_edges[i + 1], c_edges[j], c_edges[j + 1]) for j in range(m)]
    return cells


@functools.lru_cache(maxsize=256)
def pool_assignment(h: int, w: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell of every token ``[h * w]`` and the centre token of every cell ``[k]`` (ascending), for :func:`pool`."""
    cell = torch.empty(h, w, dtype=torch.long)
    centre = torch.empty(k, dtype=torch.long)
    for j, (r0, r1, c0, c1) in enumerate(pool_cells(h, w, k)):
        cell[r0:r1, c0:c1] = j
        centre[j] = ((r0 + r1 - 1) // 2) * w + (c0 + c1 - 1) // 2
    centre, order = centre.sort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k)
    return rank[cell.view(-1)], centre


@register("pool", needs=("full_grid",), description="spatial average pooling to the quota")
def pool(x: torch.Tensor, k: int, ctx: Context) -> Reduction:
    """Average-pool the token grid into ``k`` cells; each cell is represented at its centre token's position.

    ``x`` ``[N, D]`` in raster order of ``ctx.grid`` (a square grid is assumed when no grid is given; without a
    square, tokens are pooled in 1-D runs). A clip of ``ctx.frames`` frames is pooled as its frames stacked
    vertically, so a cell may span consecutive frames.
    """
    return pool_batch(x[None], k, [ctx])[0]


def pool_batch(x: torch.Tensor, k: int, ctxs: list[Context]) -> list[Reduction]:
    """:func:`pool` on ``B`` segments of one grid: ``x`` ``[B, N, D]`` -> ``B`` reductions sharing one set of
    weights (the cells depend on the grid only)."""
    n, ctx = x.shape[1], ctxs[0]
    h, w = ctx.grid if ctx.grid is not None else _square_or_line(n)
    h *= ctx.frames if ctx.grid is not None else 1
    if h * w != n:
        raise ValueError(f"pool: grid {h}x{w} does not match {n} tokens")
    cell, centre = pool_assignment(h, w, k)
    weights = torch.nn.functional.one_hot(cell.to(x.device), k).T.float()  # [k, N]
    red = Reduction(centre.to(x.device), weights / weights.sum(1, keepdim=True))
    return [Reduction(red.keep, red.weights) for _ in range(x.shape[0])]


def _square_or_line(n: int) -> tuple[int, int]:
    s = math.isqrt(n)
    return (s, s) if s * s == n else (1, n)
