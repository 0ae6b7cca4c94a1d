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


@pytest.mark.parametrize("budget", [0.5, vlm_accel.Budget(kv=0.5)])
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_generate_continues_from_a_returned_cache(models, family, budget):
    """Multi-turn: generate, then generate again from the returned (reduced) cache = one uninterrupted generate."""
    model = models(family)
    inputs = tiny.inputs_for(model, family, "image", batch=2, seed=1)
    kw = dict(do_sample=False, suppress_tokens=[tiny.IMAGE_ID, tiny.VIDEO_ID])
    with vlm_accel.accelerate(model, budget=budget, method="divprune"), torch.no_grad():
        full = model.generate(**inputs, max_new_tokens=6, **kw)
        first = model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True, **kw)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 3, dtype=torch.long)], 1)
        rest = {}
        if "mm_token_type_ids" in inputs:
            rest["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(2, 3, dtype=torch.long)], 1)
        cont = model.generate(
            input_ids=first.sequences, attention_mask=mask, cache=first.past_key_values, max_new_tokens=3, **rest, **kw
        )
    assert torch.equal(cont, full)
