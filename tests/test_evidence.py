"""Importance evidence: the recomputed CLS attention equals the eager attention weights, and visionzip keeps the
tokens it ranks highest."""

import pytest
import torch

import vlm_accel
from vlm_accel.adapters.base import cls_attention, encoder_layers

import tiny


@pytest.mark.parametrize("tower", ["clip_vision_model", "dinov2"])
def test_cls_attention_matches_eager(tower):
    import transformers as tf

    kw = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=7
    )
    cfg = tf.AutoConfig.for_model(tower, **kw)
    cfg._attn_implementation = "eager"
    model = tf.AutoModel.from_config(cfg).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = model(pixel_values=x, output_attentions=True, output_hidden_states=True)
        for i, layer in enumerate(encoder_layers(model)):
            ours = cls_attention(layer, out.hidden_states[i])
            ref = out.attentions[i].mean(1)[:, 0, 1:]
            torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_visionzip_keeps_top_cls_attention_tokens(models):
    model = models("llava")
    inputs = tiny.make_inputs(model, "llava", batch=2)
    tower = model.model.vision_tower
    with torch.no_grad():
        hs = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        layer_idx = len(encoder_layers(tower)) - 2  # vision_feature_layer=-2 is the output of this layer
        att = cls_attention(encoder_layers(tower)[layer_idx], hs[layer_idx])  # [2, 64]
        with vlm_accel.accelerate(model, budget=16, method="visionzip") as sess:
            model(**inputs)
    ids = inputs["input_ids"]
    for row in range(2):
        start = int((ids[row] == tiny.IMAGE_ID).nonzero()[0])
        kept = sess.trace.index[row][sess.trace.valid[row]] - start
        top = set(att[row].topk(round(16 * 54 / 64)).indices.tolist())
        assert top <= set(kept.tolist())
