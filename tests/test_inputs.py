"""Bad inputs give clear errors; unusual-but-valid inputs behave sensibly."""

import math

import numpy as np
import pytest
import torch

import vlm_accel
from vlm_accel import Budget
from vlm_accel.loading import load_image

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


def test_kv_budget_combines_with_visual(models):
    model = models("llava")
    with vlm_accel.accelerate(model, budget=Budget(visual=0.5, kv=0.5)) as sess:
        assert sess.kv is not None
    assert not hasattr(model, "_vlm_accel_session")
    with pytest.raises(ValueError, match="kv_bits"):
        Budget(kv_bits=3)


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


@pytest.mark.parametrize(
    "value,expected",
    [
        (np.float32(0.5), 0.5),
        (np.float64(0.25), 0.25),
        (np.int64(16), 16),
        (np.int32(1), 1),
        (torch.tensor(0.5), 0.5),
        (torch.tensor(16), 16),
        (np.array(0.25), 0.25),
    ],
)
def test_numeric_scalar_budgets_are_accepted_as_what_they_hold(models, value, expected):
    b = Budget.of(value)
    assert b.visual == expected and type(b.visual) is type(expected)  # a float stays a fraction, an int a count
    assert type(Budget(visual=value, kv=value if isinstance(expected, float) else 1.0).visual) is type(expected)
    model = models("llava")
    inputs = tiny.make_inputs(model, "llava", batch=1)
    with torch.no_grad(), vlm_accel.accelerate(model, budget=value, method="divprune") as sess:
        model(**inputs)
    assert sess.stats.visual_tokens_kept == (16 if expected == 16 else Budget(expected).visual_quota(64))


@pytest.mark.parametrize("bad", [np.bool_(True), torch.tensor(True), torch.tensor([0.5]), np.array([16])])
def test_bool_and_non_scalar_budgets_are_refused(bad):
    with pytest.raises(TypeError, match="budget"):
        Budget.of(bad)


@pytest.mark.parametrize("bad", [np.float32("nan"), np.float32(1.5), np.int64(0), torch.tensor(-1)])
def test_numeric_scalar_budgets_are_range_checked(bad):
    with pytest.raises(ValueError, match="budget"):
        Budget.of(bad)


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.random.default_rng(0).random((32, 32, 3)), "uint8"),  # float in [0, 1]
        (np.random.default_rng(0).random((32, 32, 3)).astype(np.float32) * 255, "uint8"),
        (np.zeros((3, 32, 32), np.uint8), "channel-first"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), "channel-first"),
        (torch.rand(32, 32, 3), "uint8"),
        (np.zeros((32, 32, 5), np.uint8), "shape"),
        (np.zeros((0, 32, 3), np.uint8), "empty"),
        (12, "PIL image, a file path"),
    ],
)
def test_image_arrays_that_are_not_uint8_hwc_are_a_value_error(bad, match):
    """Float / channel-first arrays and tensors given as images: a ValueError saying what to pass (PIL used to raise
    ``TypeError: Cannot handle this data type``)."""
    with pytest.raises(ValueError, match=match):
        load_image(bad)


def test_uint8_hwc_arrays_and_tensors_are_images():
    a = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(a)), a)
    assert np.array_equal(np.asarray(load_image(torch.from_numpy(a))), a)
    gray = load_image(a[..., 0])
    assert gray.mode == "RGB" and gray.size == (30, 20)
