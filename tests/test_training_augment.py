"""The trainer's method-agnostic reduced layouts (issue #32): the plugin's layout, at the budget, without any
evaluated method."""

import random

import pytest
import torch

from training.train_video import AUGMENT, FRAMES, augment_clip, draw_budget, parse_budgets, reduce_clip


@pytest.mark.parametrize("mode", AUGMENT)
@pytest.mark.parametrize("scope", ["frame", "clip"])
def test_layouts_keep_the_budget_and_average_their_groups(mode, scope):
    for budget in (0.5, 0.25, 0.1, 0.06):
        keep, w = augment_clip(FRAMES, 64, budget, scope, mode, seed=3)
        n = FRAMES * 64
        assert keep.shape[0] == w.shape[0] and w.shape[1] == n
        assert torch.equal(keep, keep.sort().values) and keep.unique().numel() == keep.numel()  # slots, in order
        assert torch.allclose(w.sum(1), torch.ones(len(keep)))  # each slot holds a mean of its members
        assert (w[torch.arange(len(keep)), keep] > 0).all()  # ... including the token at that slot
        k_per = round(budget * 64) if scope == "frame" else round(budget * n)
        assert keep.numel() == (FRAMES * max(1, k_per) if scope == "frame" else max(1, k_per))
        if scope == "frame":  # a frame's slots stand for that frame's tokens only
            f_slot, f_member = keep[:, None] // 64, torch.arange(n)[None] // 64
            assert (w[(f_slot != f_member).expand_as(w)] == 0).all()
        if mode == "subset":
            assert ((w > 0).sum(1) == 1).all()
        else:  # merges cover every token once
            assert torch.allclose((w > 0).float().sum(0), torch.ones(n))


def test_layouts_vary_with_the_seed_and_ignore_the_values():
    a = augment_clip(FRAMES, 64, 0.25, "clip", "merge", seed=0)
    b = augment_clip(FRAMES, 64, 0.25, "clip", "merge", seed=1)
    assert not torch.equal(a[0], b[0])
    tokens = torch.randn(FRAMES * 64, 8)
    k1, w1 = reduce_clip(tokens, "local", 0.25, "frame", seed=5)
    k2, w2 = reduce_clip(torch.randn(FRAMES * 64, 8), "local", 0.25, "frame", seed=5)
    assert torch.equal(k1, k2) and torch.equal(w1, w2)  # nothing depends on the features


def test_budgets_parse_as_choices_or_a_log_uniform_range():
    assert parse_budgets("0.5,0.25,0.1") == [0.5, 0.25, 0.1]
    rng = random.Random(0)
    xs = [draw_budget(rng, parse_budgets("0.06:0.6")) for _ in range(200)]
    assert min(xs) >= 0.06 and max(xs) <= 0.6 and min(xs) < 0.1 and max(xs) > 0.4


def test_the_default_uses_no_evaluated_method():
    import training.train_video as tv

    src = open(tv.__file__).read()
    assert 'default=",".join(AUGMENT)' in src  # --reduce-methods
    assert set(AUGMENT).isdisjoint({"temporal", "tome", "random", "divprune", "visionzip", "pool"})


def test_varied_clips_play_backwards_exactly():
    from training.train_video import reverse_track
    from vlm_accel.zoo.clips import render_clip

    profiles = set()
    for seed in range(12):
        c = render_clip(seed, "train", kind="move", index=[0], vary=True)
        T = c.num_frames
        for t in c.tracks:
            r = reverse_track(t, T)
            for f in range(T):
                assert r.pos(T - 1 - f) == pytest.approx(t.pos(f), abs=1e-9)
                assert r.present(T - 1 - f) == t.present(f)
            profiles.add(t.ease)
    assert len(profiles) >= 3
