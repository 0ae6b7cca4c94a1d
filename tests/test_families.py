"""The 2026 families (issue #27) — Qwen3.5 (hybrid linear + full attention decoder), Gemma 3 (bidirectional image
block, sliding windows), InternVL (tiles) — x every registered method x batch {1, 2}: identity at budget 1.0, the
budgeted token count, the oracle, ``generate``, exact restore; what a family cannot do yet is refused with a
``ValueError`` naming why. New methods join by registering."""

import pytest
import torch

import vlm_accel
from vlm_accel.adapters import adapter_for
from vlm_accel.control.budget import Budget
from vlm_accel.methods import get

import oracle
import tiny

_MODELS = {}


def model_of(family):
    if family not in _MODELS:
        _MODELS[family] = tiny.build_new(family)
    return _MODELS[family]


def _refused(family, method) -> bool:
    """A merge inside the vision tower: only the LLaVA-family towers (tests/test_encoder_merge.py)."""
    spec = get(method)
    return spec.stage == "tower"


@pytest.mark.parametrize("family", tiny.NEW_FAMILIES)
def test_identity_at_full_budget(family):
    model = model_of(family)
    inputs = tiny.new_inputs(model, family, batch=2, seed=1)
    with torch.no_grad():
        ref = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with vlm_accel.accelerate(model, budget=1.0):
            assert torch.equal(model(**inputs).logits, ref)
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), gen)
        assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", tiny.NEW_FAMILIES)
@pytest.mark.parametrize("method", vlm_accel.methods())
def test_matrix(family, method, batch):
    model = model_of(family)
    inputs = tiny.new_inputs(model, family, batch=batch, seed=batch)
    if _refused(family, method):
        with pytest.raises(ValueError, match="not supported|cannot merge|not available|tome_vit merges"):
            with vlm_accel.accelerate(model, budget=0.25, method=method), torch.no_grad():
                model(**inputs)
        return
    with torch.no_grad():
        ref = model(**inputs).logits
    n_vis = int((inputs["input_ids"] == tiny.IMAGE_ID).sum())
    with vlm_accel.accelerate(model, budget=0.25, method=method) as sess, torch.no_grad():
        out = model(**inputs).logits
        stats = sess.stats
        gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape == (batch, inputs["input_ids"].shape[1] + 3)
    assert stats.visual_tokens_in == n_vis
    per_input = 4 if family != "qwen3_5" else None  # 16 tokens per image / tile at 0.25
    if per_input is not None and get(method).exact:
        assert stats.visual_tokens_kept == n_vis // 16 * per_input
    assert 0 < stats.visual_tokens_kept < n_vis and out.shape[1] < ref.shape[1] and torch.isfinite(out).all()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)  # restored exactly


@pytest.mark.parametrize("family", tiny.NEW_FAMILIES)
def test_oracle(family):
    """The pruned prefill equals the unpatched language model fed only the kept embeddings, at their original
    positions, with the model's own attention pattern among them (Gemma's bidirectional image block included)."""
    model = model_of(family)
    inputs = tiny.new_inputs(model, family, batch=2, seed=5)
    lm = adapter_for(model).language_model
    full = {}
    hook = lm.register_forward_pre_hook(lambda mod, a, kw: full.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    with vlm_accel.accelerate(model, budget=0.25, method="divprune") as sess, torch.no_grad():
        out = model(**inputs).logits
        tr = sess.trace
    idx, valid = tr.index, tr.valid
    embeds = oracle.take(full["inputs_embeds"], idx)
    pos = full.get("position_ids")
    if pos is None:
        pos = torch.arange(inputs["input_ids"].shape[1]).expand_as(inputs["input_ids"])
    pos = oracle.take(pos.expand(*pos.shape[:-2], *idx.shape[:1], pos.shape[-1]), idx)
    mask = full["attention_mask"]
    if isinstance(mask, dict):  # the model's own 4-D masks, read at the kept rows and columns
        b = torch.arange(idx.shape[0])[:, None, None]
        mask = {
            k: torch.where(
                (valid[:, :, None] & valid[:, None, :])[:, None],
                m[b, 0, idx[:, :, None], idx[:, None, :]][:, None],
                torch.eye(idx.shape[1], dtype=torch.bool)[None, None] if m.dtype == torch.bool else 0.0,
            )
            if m is not None
            else None
            for k, m in mask.items()
        }
    else:
        mask = oracle.take(inputs["attention_mask"], idx) * valid
    with torch.no_grad():
        ref = model.lm_head(lm(inputs_embeds=embeds, position_ids=pos, attention_mask=mask).last_hidden_state)
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", tiny.NEW_FAMILIES)
def test_kv_budget(family):
    """KV quantization everywhere (a hybrid decoder's linear layers keep their recurrent state, counted in
    ``kv_bytes``); eviction where every layer is full attention, a clear refusal where it is not."""
    model = model_of(family)
    inputs = tiny.new_inputs(model, family, batch=2, seed=2)
    for budget in (Budget(visual=0.5, kv=0.5), Budget(kv_bits=4)):
        types = set(adapter_for(model).layer_types)
        blocked = budget.kv != 1.0 and bool(types & {"linear_attention", "sliding_attention"})
        if blocked:
            with pytest.raises(ValueError, match="not supported on"):
                vlm_accel.accelerate(model, budget=budget)
            continue
        with vlm_accel.accelerate(model, budget=budget) as sess, torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert gen.shape[1] == inputs["input_ids"].shape[1] + 3 and sess.stats.kv_bytes > 0
        if budget.kv_bits < 16 and "linear_attention" in types:
            with torch.no_grad():
                out = model(**inputs, use_cache=True)
            layers = out.past_key_values.layers
            linear = [i for i, t in enumerate(adapter_for(model).layer_types) if t == "linear_attention"]
            assert all(type(layers[i]).__name__ == "LinearAttentionLayer" for i in linear)


def test_generic_adapter_and_what_it_needs(caplog):
    """A standard-interface VLM without an adapter of its own gets the generic one, with a one-time notice; a model
    that needs more gets a TypeError naming what is missing."""
    import transformers as tf

    from vlm_accel.adapters import GenericAdapter, adapter_for

    cfg = tf.Mistral3Config(
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=56, patch_size=7, head_dim=8),
        text_config=dict(model_type="mistral", **tiny._LLAMA),
        image_token_index=tiny.IMAGE_ID,
        spatial_merge_size=2,
    )  # fmt: skip
    model = tf.Mistral3ForConditionalGeneration(cfg).eval()
    with caplog.at_level("WARNING"):
        adapter = adapter_for(model)
        adapter_for(model)
    assert type(adapter) is GenericAdapter and adapter.family == "mistral3"
    assert sum("untested" in r.message for r in caplog.records) == 1

    class Inner(torch.nn.Module):
        def get_image_features(self, pixel_values):
            raise NotImplementedError

    class NoMask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

    with pytest.raises(TypeError, match="needs model.model.get_placeholder_mask; .*language_model.layers"):
        adapter_for(NoMask())


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_in_llm_stages_on_a_hybrid_decoder(method):
    """Qwen3.5: stages are scored at full-attention layers (a stage at layer s is scored by layer s - 1); the pruned
    prefill equals the stock decoder layers run by hand — every layer on the full row before a stage, the kept
    tokens at their original positions after it (linear-attention layers simply see the shorter sequence)."""
    from vlm_accel.methods.inllm import stage_layers

    model = model_of("qwen3_5")
    lm = model.model.language_model
    types = adapter_for(model).layer_types
    inputs = tiny.new_inputs(model, "qwen3_5", batch=1, seed=4)
    full = {}
    hook = lm.register_forward_pre_hook(lambda mod, a, kw: full.update(kw), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    with vlm_accel.accelerate(model, budget=0.25, method=method) as sess, torch.no_grad():
        out = model(**inputs).logits
        stages = sess.trace.stages
        gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
    starts = [s for s, *_ in stages]
    assert starts == stage_layers(method, {}, len(types), adapter_for(model).scoring_layers)
    assert all(types[s - 1] == "full_attention" for s in starts)
    h, pos = full["inputs_embeds"], full["position_ids"]
    cur = torch.arange(h.shape[1])
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if i in starts:
                kept = stages[starts.index(i)][1][0]
                h = h[:, torch.searchsorted(cur, kept)]
                cur = kept
            p = pos[..., cur]
            cos, sin = lm.rotary_emb(h, p[1:] if p.shape[0] == 4 else p)
            n = cur.numel()
            causal = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
            mask = None if types[i] == "linear_attention" else causal
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=p)
        ref = model.lm_head(lm.norm(h))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
