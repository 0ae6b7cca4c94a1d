"""A request that fails anywhere leaves the session as a fresh one for the next request (issue #28, item 1): the
next request's logits, generated tokens and stats equal a fresh session's, for every family."""

import dataclasses

import pytest
import torch

import vlm_accel

import tiny


class Boom(RuntimeError):
    pass


def _raise(*args, **kwargs):
    raise Boom("failed on purpose")


def _fail_in_tower(model, sess, inputs):
    """transformers raises between the tower and the LLM: pixels with a prompt whose placeholders were removed."""
    ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == tiny.IMAGE_ID, 5)
    bad = dict(inputs, input_ids=ids)
    for types in ("mm_token_type_ids", "token_type_ids"):
        if types in bad:
            bad[types] = torch.zeros_like(ids)
    model(**bad)


def _fail_in_selection(model, sess, inputs, monkeypatch):
    monkeypatch.setattr(sess.selection, "reduce", _raise)
    model(**inputs)


def _fail_in_llm(model, sess, inputs, monkeypatch):
    handle = sess.adapter.language_model.layers[-1].register_forward_pre_hook(_raise)
    try:
        model(**inputs)
    finally:
        handle.remove()


def _fail_in_decode(model, sess, inputs, monkeypatch):
    calls = []

    def second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise Boom("failed on purpose")

    handle = sess.adapter.language_model.layers[0].register_forward_pre_hook(second_step)
    try:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()


FAILURES = {
    "tower": lambda m, s, i, mp: _fail_in_tower(m, s, i),
    "selection": _fail_in_selection,
    "llm": _fail_in_llm,
    "decode": _fail_in_decode,
}


def _request(model, inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    return logits, tokens


_NEW, _FRESH = {}, {}


@pytest.mark.parametrize("where", list(FAILURES))
@pytest.mark.parametrize("family", tiny.FAMILIES + tiny.NEW_FAMILIES)
def test_a_failed_request_leaves_nothing_behind(models, family, where, monkeypatch):
    if family in tiny.NEW_FAMILIES:
        if family not in _NEW:
            _NEW[family] = tiny.build_new(family)
        model = _NEW[family]
        inputs = tiny.new_inputs(model, family, batch=2, seed=3)
    else:
        model = models(family)
        inputs = tiny.make_inputs(model, family, batch=2, seed=3)
    types = set(vlm_accel.adapters.adapter_for(model).layer_types)
    evicts = not types & {"linear_attention", "sliding_attention"}  # eviction is refused on those decoders
    budget = vlm_accel.Budget(visual=0.25, kv=0.5 if evicts else 1.0)
    if family not in _FRESH:  # the fresh session's request, once per family
        with vlm_accel.accelerate(model, budget=budget, method="divprune") as fresh:
            logits, tokens = _request(model, inputs)
            _FRESH[family] = (logits, tokens, dataclasses.asdict(fresh.stats))
    want_logits, want_tokens, want_stats = _FRESH[family]
    want_stats = dict(want_stats)
    with vlm_accel.accelerate(model, budget=budget, method="divprune") as sess:
        with monkeypatch.context() as mp, pytest.raises((Boom, ValueError, RuntimeError)), torch.no_grad():
            FAILURES[where](model, sess, inputs, mp)
        got_logits, got_tokens = _request(model, inputs)
        got_stats = dataclasses.asdict(sess.stats)
    assert torch.equal(got_logits, want_logits)
    assert torch.equal(got_tokens, want_tokens)
    got_stats.pop("selection_ms"), want_stats.pop("selection_ms")
    assert got_stats == want_stats


def test_a_failed_request_on_the_embedded_default():
    """The held-out check of issue #28: fail a request mid-way, then the next equals a fresh session's."""
    from vlm_accel import zoo

    model, processor = zoo.load_default()
    item = zoo.samples("image")[0]
    inputs = processor(
        images=zoo.load_image(item["path"]), text=zoo.build_prompt(processor, item["question"]), return_tensors="pt"
    )
    with vlm_accel.accelerate(model, budget=0.25) as fresh:
        want_logits, want_tokens = _request(model, inputs)
        want = (fresh.stats.visual_tokens_in, fresh.stats.visual_tokens_kept, fresh.stats.seq_len_kept)
    bad = dict(inputs, input_ids=inputs["input_ids"][:, -8:], attention_mask=inputs["attention_mask"][:, -8:])
    with vlm_accel.accelerate(model, budget=0.25) as sess:
        with pytest.raises(ValueError), torch.no_grad():
            model(**bad)  # image features, no placeholders left
        got_logits, got_tokens = _request(model, inputs)
        got = (sess.stats.visual_tokens_in, sess.stats.visual_tokens_kept, sess.stats.seq_len_kept)
    assert torch.equal(got_logits, want_logits) and torch.equal(got_tokens, want_tokens)
    assert got == want
