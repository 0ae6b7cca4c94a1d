"""Bad inputs give clear errors; unusual-but-valid inputs behave sensibly."""

import math

import pytest
import torch

import vlm_accel
from vlm_accel import Budget

import tiny


def test_unsupported_model_names_the_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(TypeError, match="Qwen2VLForConditionalGeneration"):
        vlm_accel.accelerate(llm, budget=0.5)
    with pytest.raises(TypeError, match="model instance"):
        vlm_accel.accelerate("llava-hf/llava-1.5-7b-hf", budget=0.5)


@pytest.mark.parametrize("bad", [0, -1, 0.0, -0.5, 1.5, math.nan, math.inf, 2.0])
def test_bad_budgets(models, bad):
    with pytest.raises(ValueError, match="budget"):
        vlm_accel.accelerate(models("llava"), budget=bad)
    assert not hasattr(models("llava"), "_vlm_accel_session")


@pytest.mark.parametrize("bad", ["half", None, True, [0.5]])
def test_budget_wrong_type(models, bad):
    with pytest.raises(TypeError, match="budget"):
        vlm_accel.accelerate(models("llava"), budget=bad)


def test_unknown_method_lists_registered(models):
    with pytest.raises(ValueError, match="divprune"):
        vlm_accel.accelerate(models("llava"), budget=0.5, method="fastest")


def test_kv_budget_not_yet_available(models):
    with pytest.raises(NotImplementedError, match="kv"):
        vlm_accel.accelerate(models("llava"), budget=Budget(visual=0.5, kv=0.5))


def test_budget_object_and_large_int(models):
    model = models("llava")
    inputs = tiny.make_inputs(model, "llava", batch=1)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vlm_accel.accelerate(model, budget=10_000) as sess:  # more than there is: keep all
            assert torch.equal(model(**inputs).logits, ref)
        assert sess.stats.visual_tokens_kept == 64
        with vlm_accel.accelerate(model, budget=Budget(visual=16)) as sess:
            model(**inputs)
        assert sess.stats.visual_tokens_kept == 16


def test_budget_quota_rules():
    assert Budget(0.25).visual_quota(576) == 144
    assert Budget(0.001).visual_quota(576) == 1  # never zero tokens
    assert Budget(64).visual_quota(576) == 64
    assert Budget(64).visual_quota(576 * 4, units=4) == 256
    assert Budget(1000).visual_quota(576) == 576
