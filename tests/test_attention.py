"""The shared attention-evidence helper: recomputed query rows equal eager attention weights, every family."""

import pytest
import torch

from vlm_accel.adapters import adapter_for
from vlm_accel.llm.attention import row_attention

import tiny


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_row_attention_equals_eager(models, family):
    model = models(family, attn="eager")
    inputs = tiny.inputs_for(model, family, "image", batch=2, seed=3)
    layers = adapter_for(model).language_model.layers
    seen = {}

    def grab(i):
        def hook(mod, args, kwargs):
            seen[i] = (kwargs["hidden_states"], kwargs["position_embeddings"])

        return hook

    handles = [layer.self_attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    mask = inputs["attention_mask"]
    length = mask.shape[1]
    rows = torch.tensor([[length - 3, length - 1]] * 2)
    for i, layer in enumerate(layers):
        hidden, pe = seen[i]
        ours = row_attention(layer.self_attn, hidden, pe, rows, key_valid=mask.bool())
        ref = out.attentions[i][:, :, [length - 3, length - 1]]
        torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=1e-4)
