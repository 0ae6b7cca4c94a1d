"""Issue #12 items in the session: nested ``with`` blocks, copies and pickles of an accelerated model, and
``get_image_features(return_dict=False)``."""

import copy
import pickle

import pytest
import torch

import vlm_accel

import tiny


def test_nested_with_blocks_restore_the_outer_session(models):
    model = models("llava")
    inputs = tiny.inputs_for(model, "llava", "image", batch=2)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vlm_accel.accelerate(model, budget=0.25, method="divprune") as outer:
            first = model(**inputs).logits
            with vlm_accel.accelerate(model, budget=0.5, method="pool") as inner:
                assert model(**inputs).logits.shape[1] > first.shape[1]
                assert inner.active and not outer.active
            assert outer.active  # the rest of the outer block is accelerated again
            assert torch.equal(model(**inputs).logits, first)
        assert not outer.active
        assert torch.equal(model(**inputs).logits, ref)


def test_deepcopy_is_clean_and_pickle_refuses(models):
    model = models("qwen2_vl")
    inputs = tiny.inputs_for(model, "qwen2_vl", "image", batch=2)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vlm_accel.accelerate(model, budget=0.25) as sess:
            reduced = model(**inputs).logits
            twin = copy.deepcopy(model)
            assert torch.equal(twin(**inputs).logits, ref)  # an unaccelerated, independent copy
            assert not hasattr(twin, "_vlm_accel_session")
            assert torch.equal(model(**inputs).logits, reduced)  # the original stays accelerated
            with vlm_accel.accelerate(twin, budget=0.25) as twin_sess:
                assert torch.equal(twin(**inputs).logits, reduced)
            assert twin_sess is not sess
            with pytest.raises(TypeError, match="restore"):
                pickle.dumps(model)
        pickle.dumps(model)  # fine once restored


def test_get_image_features_tuple_output(models):
    model = models("llava")
    inputs = tiny.inputs_for(model, "llava", "image")
    with torch.no_grad():
        ref = model.model.get_image_features(inputs["pixel_values"], return_dict=False)
        with vlm_accel.accelerate(model, budget=1.0):
            out = model.model.get_image_features(inputs["pixel_values"], return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(ref)
    assert torch.equal(out[0], ref[0])
