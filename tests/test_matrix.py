"""Every registered method x every family x batch {1, 2} x generate. New methods join by registering."""

import pytest
import torch

import vlm_accel
from vlm_accel.control.budget import Budget
from vlm_accel.methods import get

import tiny


def expected_kept(model, family: str, kind: str, inputs: dict, budget, clip: bool) -> int:
    """Visual tokens the budget allows, from the unpatched features (independent of the adapters). Videos: a quota
    per frame, or one for the whole clip when the method works on clips."""
    b = Budget.of(budget)
    if kind == "video":
        if family.startswith("qwen"):
            m = model.config.vision_config.spatial_merge_size
            clips = [(t, h * w // m**2) for t, h, w in inputs["video_grid_thw"].tolist()]
        else:
            pv = inputs["pixel_values_videos"]
            clips = [(pv.shape[1], 16)] * pv.shape[0]
        if clip:
            return sum(b.visual_quota(t * hw, units=t) for t, hw in clips)
        return sum(t * b.visual_quota(hw) for t, hw in clips)
    with torch.no_grad():
        if family.startswith("qwen"):
            m = model.config.vision_config.spatial_merge_size
            sizes = [int(t * h * w) // m**2 for t, h, w in inputs["image_grid_thw"].tolist()]
            return sum(b.visual_quota(n) for n in sizes)
        if family == "llava":
            return inputs["pixel_values"].shape[0] * b.visual_quota(64)
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output
    total = 0
    for f in feats:  # base view (64 tokens) + hi-res crops without their newline tokens
        newline = (f == model.model.image_newline.to(f.dtype)).all(-1)
        hires = int((~newline[64:]).sum())
        total += b.visual_quota(64) + (b.visual_quota(hires, max(1, round(hires / 64))) if hires else 0)
    return total


@pytest.mark.parametrize("batch,budget", [(1, 0.25), (2, 0.25), (1, 8), (2, 8)])
@pytest.mark.parametrize("family,kind", tiny.CASES)
@pytest.mark.parametrize("method", vlm_accel.methods())
def test_matrix(models, method, family, kind, batch, budget):
    model = models(family)
    tiny.skip_unsupported(model, method, kind)
    inputs = tiny.inputs_for(model, family, kind, batch=batch, seed=batch)
    with torch.no_grad():
        ref = model(**inputs).logits
    with vlm_accel.accelerate(model, budget=budget, method=method) as sess, torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        stats = sess.stats
        out = model(**inputs).logits
    assert gen.shape == (batch, inputs["input_ids"].shape[1] + 3)
    placeholder = tiny.VIDEO_ID if kind == "video" else tiny.IMAGE_ID
    assert stats.visual_tokens_in == int((inputs["input_ids"] == placeholder).sum())
    spec = get(method)
    expected = expected_kept(model, family, kind, inputs, budget, clip="clip" in spec.needs)
    if spec.exact:
        assert stats.visual_tokens_kept == expected
    else:
        assert 0 < stats.visual_tokens_kept <= expected
    assert out.shape[1] < ref.shape[1] and torch.isfinite(out).all()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)  # restored exactly
