"""Reducers as pure functions: exact quotas, valid indices, weights that mix only the segment's tokens."""

import pytest
import torch

import vlm_accel
from vlm_accel.methods import Context, get
from vlm_accel.methods.baselines import pool_cells


@pytest.mark.parametrize("grid", [(24, 24), (7, 13), (1, 9)])
@pytest.mark.parametrize("k", [1, 5, 9, 64])
@pytest.mark.parametrize("name", vlm_accel.methods())
def test_method_contract(name, k, grid):
    if get(name).stage == "tower":
        pytest.skip("acts inside the vision tower, not on features (tests/test_encoder_merge.py)")
    n = grid[0] * grid[1]
    k = min(k, n - 1)
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(k))
    ctx = Context(
        grid=grid, importance=torch.rand(n), query=torch.randn(5, 16), generator=torch.Generator().manual_seed(0)
    )
    red = get(name)(x, k, ctx)
    assert red.keep.shape == (k,) and red.keep.dtype == torch.long
    assert bool((red.keep.diff() > 0).all()) and 0 <= int(red.keep.min()) and int(red.keep.max()) < n
    if red.weights is not None:
        assert red.weights.shape == (k, n)
        torch.testing.assert_close(red.weights.sum(1), torch.ones(k))
        assert bool((red.weights >= 0).all())
    assert red.apply(x).shape == (k, 16)


def test_pool_cells_partition_exactly():
    for h, w, k in [(24, 24, 64), (24, 24, 63), (5, 7, 35), (3, 40, 17), (10, 10, 1)]:
        cells = pool_cells(h, w, k)
        assert len(cells) == k
        cover = torch.zeros(h, w, dtype=torch.int)
        for r0, r1, c0, c1 in cells:
            assert r1 > r0 and c1 > c0
            cover[r0:r1, c0:c1] += 1
        assert bool((cover == 1).all())


def test_pool_averages_cells():
    x = torch.arange(16.0).view(16, 1)
    red = get("pool")(x, 4, Context(grid=(4, 4)))
    assert sorted(red.apply(x).view(-1).tolist()) == [2.5, 4.5, 10.5, 12.5]


def test_divprune_picks_distinct_clusters():
    centers = torch.eye(4) * 10
    x = centers.repeat_interleave(5, 0) + 0.01 * torch.randn(20, 4)
    red = get("divprune")(x, 4, Context())
    assert sorted((red.keep // 5).tolist()) == [0, 1, 2, 3]


def test_relevance_keeps_question_tokens_then_covers_the_rest():
    """Tokens matching the question's words come first; the rest of the quota covers the other clusters."""
    centers = torch.eye(6) * 10
    x = centers.repeat_interleave(5, 0) + 0.01 * torch.randn(30, 6)  # 6 clusters of 5 tokens
    query = torch.stack([centers[4], torch.randn(6) * 0.01])  # the question names cluster 4
    red = get("relevance")(x, 6, Context(query=query))
    clusters = (red.keep // 5).tolist()
    assert clusters.count(4) == 3  # half the quota: the relevant cluster
    assert len(set(clusters) - {4}) == 3  # the other half: three different clusters
    without = get("relevance")(x, 6, Context())  # no question: pure diversity
    assert sorted((without.keep // 5).tolist()) == [0, 1, 2, 3, 4, 5]


def test_max_min_diverse_from_a_seed_set():
    from vlm_accel.methods.diversity import max_min_diverse

    x = torch.eye(4).repeat_interleave(3, 0) + 0.01 * torch.randn(12, 4)
    init = torch.tensor([0, 1, 2])  # cluster 0 already chosen
    extra = max_min_diverse(x, 3, init=init)
    assert not set(extra.tolist()) & {0, 1, 2} and sorted((extra // 3).tolist()) == [1, 2, 3]


def test_tome_merges_duplicates_size_weighted():
    x = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0], [0, 1.0], [1.0, 1.0]])
    red = get("tome")(x, 3, Context())
    w = red.weights
    assert bool(((w > 0).sum(0) == 1).all())  # every token lands in exactly one merged token
    merged = {tuple(row.tolist()) for row in red.apply(x)}
    assert merged == {(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)}  # identical tokens merged, the odd one kept
    sizes = sorted((w > 0).sum(1).tolist())
    assert sizes == [1, 2, 3]


def test_visionzip_keeps_most_important():
    x = torch.randn(100, 8)
    imp = torch.zeros(100)
    imp[[3, 50, 97]] = 1.0
    red = get("visionzip")(x, 10, Context(importance=imp))
    assert {3, 50, 97} <= set(red.keep.tolist())


def test_random_is_seeded():
    x = torch.randn(50, 4)
    a = get("random")(x, 5, Context(generator=torch.Generator().manual_seed(1))).keep
    b = get("random")(x, 5, Context(generator=torch.Generator().manual_seed(1))).keep
    assert torch.equal(a, b)
