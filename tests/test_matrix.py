"""Every registered method x every family x batch {1, 2} x generate. New methods join by registering."""

import pytest
import torch

import vlm_accel
from vlm_accel.budget import Budget

import tiny


def expected_kept(model, family: str, inputs: dict, budget) -> int:
    """Visual tokens the budget allows, from the unpatched image features (independent of the adapters)."""
    b = Budget.of(budget)
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


@pytest.mark.parametrize("budget", [0.25, 8])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("method", vlm_accel.methods())
def test_matrix(models, method, family, batch, budget):
    model = models(family)
    inputs = tiny.make_inputs(model, family, batch=batch, seed=batch)
    with torch.no_grad():
        ref = model(**inputs).logits
    with vlm_accel.accelerate(model, budget=budget, method=method) as sess, torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        stats = sess.stats
        out = model(**inputs).logits
    assert gen.shape == (batch, inputs["input_ids"].shape[1] + 3)
    assert stats.visual_tokens_in == int((inputs["input_ids"] == tiny.IMAGE_ID).sum())
    assert stats.visual_tokens_kept == expected_kept(model, family, inputs, budget)
    assert out.shape[1] < ref.shape[1] and torch.isfinite(out).all()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)  # restored exactly
