"""Video through the accelerated models: frame cache exactness and savings, temporal merging of static tokens."""

import pytest
import torch

import vlm_accel
from vlm_accel.methods import Context, get
from vlm_accel.methods.temporal import temporal_runs

import tiny


@pytest.mark.parametrize("family", tiny.VIDEO_FAMILIES)
def test_frame_cache_exact_and_saves_on_static_clip(models, family):
    model = models(family)
    static = tiny.make_video_inputs(model, family, batch=2, static=True)
    moving = tiny.make_video_inputs(model, family, batch=2)
    with torch.no_grad():
        ref_static, ref_moving = model(**static).logits, model(**moving).logits
        with vlm_accel.accelerate(model, budget=1.0, frame_cache=0.0) as sess:
            out_static = model(**static).logits
            s_static = (sess.stats.frames_in, sess.stats.frames_encoded)
            reused = sess.frame_cache.stats.reused  # per video: which units took the cached features
            out_moving = model(**moving).logits
            s_moving = (sess.stats.frames_in, sess.stats.frames_encoded)
    assert torch.equal(out_static, ref_static) and torch.equal(out_moving, ref_moving)  # bit-identical features
    assert s_static == (8, 2)  # one frame encoded per static clip
    assert reused == [[False, True, True, True], [False, True, True, True]]
    assert s_moving == (8, 8)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_frame_cache_threshold(models, family):
    model = models(family)
    inputs = tiny.make_video_inputs(model, family, batch=1, static=True)
    key = "pixel_values_videos"
    noisy = dict(inputs, **{key: inputs[key] + 1e-3 * torch.randn_like(inputs[key])})
    with torch.no_grad():
        with vlm_accel.accelerate(model, budget=0.5, frame_cache=0.0) as sess:
            model(**noisy)
        assert sess.stats.frames_encoded == 4  # not exact repeats: all encoded
        with vlm_accel.accelerate(model, budget=0.5, frame_cache=0.01) as sess:
            model.generate(**noisy, max_new_tokens=2)
        assert sess.stats.frames_encoded == 1 and sess.stats.visual_tokens_kept < sess.stats.visual_tokens_in


def test_frame_cache_needs_a_video_family(models):
    with pytest.raises(ValueError, match="video"):
        vlm_accel.accelerate(models("llava"), budget=0.5, frame_cache=0.0)
    with pytest.raises(ValueError, match="threshold"):
        vlm_accel.accelerate(models("qwen2_vl"), budget=0.5, frame_cache=-1.0)
    assert not hasattr(models("qwen2_vl"), "_vlm_accel_session")


def test_temporal_runs_follow_static_positions():
    x = torch.randn(3, 4, 8)
    x[1, :2] = x[0, :2]  # positions 0, 1 static over frames 0-1
    x[2, 0] = x[1, 0]  # position 0 static over all three
    run = temporal_runs(x.view(12, 8), frames=3).view(3, 4)
    assert run[0, 0] == run[1, 0] == run[2, 0]
    assert run[0, 1] == run[1, 1] != run[2, 1]
    assert len(set(run.view(-1).tolist())) == 12 - 3


def test_temporal_keeps_each_static_token_once_at_first_frame():
    frame = torch.randn(16, 8)
    clip = torch.cat([frame, frame, frame, frame])  # 4 identical frames
    red = get("temporal")(clip, 16, Context(grid=(4, 4), frames=4))
    assert red.keep.tolist() == list(range(16))  # survivors sit in the first frame
    torch.testing.assert_close(red.apply(clip), frame)


def test_temporal_spends_its_quota_on_the_most_changing_tokens():
    """Links above the static threshold are cut least similar first until the quota is spent: a cell whose content
    drifts (cosine 0.95, above the threshold) gets its own token before any identical one does."""
    g = torch.Generator().manual_seed(0)
    frame = torch.randn(16, 8, generator=g)
    later = frame.clone()
    side = torch.randn(8, generator=g)
    side -= (side @ frame[5]) / (frame[5] @ frame[5]) * frame[5]  # orthogonal to the cell: cosine 1 / sqrt(1 + s^2)
    later[5] = frame[5] + 0.33 * frame[5].norm() * torch.nn.functional.normalize(side, dim=0)
    assert 0.9 < torch.cosine_similarity(later[5], frame[5], dim=0) < 0.99
    clip = torch.cat([frame, frame, later, later])  # cell 5 drifts at frame 2
    for k, extra in ((16, []), (17, [2 * 16 + 5])):
        red = get("temporal")(clip, k, Context(grid=(4, 4), frames=4))
        assert red.keep.tolist() == list(range(16)) + extra
    red = get("temporal")(clip, 40, Context(grid=(4, 4), frames=4))
    assert red.keep.numel() == 40 and 2 * 16 + 5 in red.keep.tolist()  # the budget is spent, the drift kept


@pytest.mark.parametrize("method", vlm_accel.methods())
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_clip_budget(models, family, method):
    """Budget(video="clip"): an int is the token count of the whole clip, for every method."""
    model = models(family)
    tiny.skip_unsupported(model, method, "video")
    inputs = tiny.make_video_inputs(model, family, batch=2)
    with vlm_accel.accelerate(model, budget=vlm_accel.Budget(visual=20, video="clip"), method=method) as sess:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2)
    kept = sess.stats.visual_tokens_kept
    assert kept == 40 if get(method).exact else 0 < kept <= 40


def test_budget_video_scope_validated():
    with pytest.raises(ValueError, match="frame"):
        vlm_accel.Budget(visual=0.5, video="scene")
