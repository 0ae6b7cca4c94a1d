"""Identity, oracle, restore and generate correctness of accelerate() on every family (tiny random models)."""

import inspect

import pytest
import torch

import vlm_accel

import oracle
import tiny

SELECTION = ["random", "divprune"]  # pure-selection methods: kept embeddings are the original ones


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family,kind", tiny.CASES)
def test_full_budget_is_bit_identical(models, family, kind, attn):
    model = models(family, attn)
    inputs = tiny.inputs_for(model, family, kind, batch=2)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vlm_accel.accelerate(model, budget=1.0) as sess:
            out = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2)
            static = model.generate(**inputs, max_new_tokens=3, do_sample=False, cache_implementation="static")
        ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        ref_beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2)
    assert torch.equal(ref, out)
    assert torch.equal(gen, ref_gen)
    assert torch.equal(beams, ref_beams)
    assert torch.equal(static, ref_gen[:, :-1])
    assert sess.stats.visual_tokens_kept == sess.stats.visual_tokens_in > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", SELECTION + ["tome", "pool", "temporal"])
@pytest.mark.parametrize("family,kind", tiny.CASES)
def test_oracle_prefill(models, family, kind, method, dtype):
    """Patched forward == unpatched language model on the kept embeddings at their original positions."""
    model = models(family, "sdpa", dtype)
    inputs = tiny.inputs_for(model, family, kind, batch=2, dtype=dtype)
    full = oracle.lm_inputs(model, inputs)
    with vlm_accel.accelerate(model, budget=0.3, method=method) as sess, torch.no_grad():
        logits = model(**inputs).logits
    tr = sess.trace
    bsz, seq = inputs["input_ids"].shape
    pos = full.get("position_ids")
    if pos is None:
        pos = torch.arange(seq).expand(bsz, seq)
    pos = oracle.take(pos, tr.index)
    attn = oracle.take(inputs["attention_mask"], tr.index) * tr.valid
    if method in SELECTION:
        assert torch.equal(tr.inputs_embeds, oracle.take(full["inputs_embeds"], tr.index))
        assert torch.equal(tr.position_ids, pos)
    assert torch.equal(tr.attention_mask, attn)
    given = None if method in SELECTION else tr.extra  # merged deepstack features are the method's own
    ref = oracle.run_lm(model, tr.inputs_embeds, pos, attn, full, tr.index, tr.valid, given)
    v = tr.valid
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(logits[v], ref[v], **tol)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family,kind", tiny.CASES)
def test_oracle_generate(models, family, kind, cache):
    """Every greedy decode step equals the unpatched LM run without cache on kept prompt + generated tokens (also
    with a static cache, whose masks ``generate`` prepares as 4-D tensors)."""
    model = models(family)
    inputs = tiny.inputs_for(model, family, kind, batch=2)
    full = oracle.lm_inputs(model, inputs)
    steps = 4
    with vlm_accel.accelerate(model, budget=0.25, method="divprune") as sess, torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=steps,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            cache_implementation=cache,
        )
    tr = sess.trace
    seq = inputs["input_ids"].shape[1]
    ids = out.sequences
    attn_full = torch.cat([inputs["attention_mask"], torch.ones(2, steps, dtype=torch.long)], 1)
    pos_full = oracle.full_positions(model, family, ids, attn_full, inputs)
    emb_gen = model.get_input_embeddings()(ids[:, seq:])
    for t in range(len(out.scores)):
        embeds = torch.cat([tr.inputs_embeds, emb_gen[:, :t]], 1)
        pos = torch.cat([oracle.take(pos_full[..., :seq], tr.index), pos_full[..., seq : seq + t]], -1)
        attn = torch.cat([tr.attention_mask, torch.ones(2, t, dtype=torch.long)], 1)
        ref = oracle.run_lm(model, embeds, pos, attn, full, tr.index, tr.valid)[:, -1]
        torch.testing.assert_close(out.scores[t], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family,kind", tiny.CASES)
def test_labels_loss_oracle(models, family, kind):
    """``labels`` follow the kept tokens: the loss is next-token CE of the unpatched LM over the kept sequence (and
    bit-identical to the unpatched loss at full budget)."""
    model = models(family)
    inputs = tiny.inputs_for(model, family, kind, batch=2)
    ids = inputs["input_ids"]
    labels = ids.masked_fill((ids == tiny.IMAGE_ID) | (ids == tiny.VIDEO_ID) | (inputs["attention_mask"] == 0), -100)
    full = oracle.lm_inputs(model, inputs)
    with torch.no_grad():
        ref_full = model(**inputs, labels=labels).loss
        with vlm_accel.accelerate(model, budget=1.0):
            same = model(**inputs, labels=labels).loss
        with vlm_accel.accelerate(model, budget=0.3, method="divprune") as sess:
            loss = model(**inputs, labels=labels).loss
    assert torch.equal(same, ref_full)
    tr = sess.trace
    bsz, seq = ids.shape
    pos = full.get("position_ids")
    pos = oracle.take(torch.arange(seq).expand(bsz, seq) if pos is None else pos, tr.index)
    logits = oracle.run_lm(model, tr.inputs_embeds, pos, tr.attention_mask, full, tr.index, tr.valid)
    kept = oracle.take(labels, tr.index).masked_fill(~tr.valid, -100)
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), kept[:, 1:].flatten(), ignore_index=-100
    )
    assert tr.index.shape[1] < seq
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


def test_user_loss_function_is_wrapped_and_put_back(models):
    model = models("llava")
    calls = []

    def my_loss(logits, labels, vocab_size, **kwargs):
        calls.append(labels.shape)
        return logits.float().mean()

    model.loss_function = my_loss
    try:
        inputs = tiny.make_inputs(model, "llava", batch=1)
        with vlm_accel.accelerate(model, budget=0.25), torch.no_grad():
            out = model(**inputs, labels=inputs["input_ids"])
        assert calls == [out.logits.shape[:2]]  # the user's loss saw labels gathered to the kept tokens
        assert model.loss_function is my_loss
    finally:
        del model._loss_function


@pytest.mark.parametrize("method", SELECTION)
@pytest.mark.parametrize("family,kind", tiny.CASES)
def test_oracle_beam_search(models, family, kind, method):
    """num_beams=2: generate's two copies of each prompt are reduced once and identically (even by ``random``), and
    each returned beam's score is the unpatched LM's log-probability of its tokens on the kept prompt."""
    model = models(family)
    inputs = tiny.inputs_for(model, family, kind, batch=2)
    full = oracle.lm_inputs(model, inputs)
    with vlm_accel.accelerate(model, budget=0.25, method=method) as sess, torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=3,
            num_beams=2,
            length_penalty=0.0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    tr = sess.trace
    assert sess.stats.visual_tokens_kept < sess.stats.visual_tokens_in
    assert tr.index.shape[0] == 4 and torch.equal(tr.index[0::2], tr.index[1::2])
    assert torch.equal(tr.inputs_embeds[0::2], tr.inputs_embeds[1::2])
    index, valid = tr.index[0::2], tr.valid[0::2]
    seq, kept = inputs["input_ids"].shape[1], tr.inputs_embeds.shape[1]
    ids = out.sequences
    gen = ids[:, seq:]
    attn_full = torch.cat([inputs["attention_mask"], torch.ones_like(gen)], 1)
    pos_full = oracle.full_positions(model, family, ids, attn_full, inputs)
    embeds = torch.cat([tr.inputs_embeds[0::2], model.get_input_embeddings()(gen)], 1)
    pos = torch.cat([oracle.take(pos_full[..., :seq], index), pos_full[..., seq:]], -1)
    attn = torch.cat([tr.attention_mask[0::2], torch.ones_like(gen)], 1)
    logits = oracle.run_lm(model, embeds, pos, attn, full, index, valid)
    logp = logits[:, kept - 1 : -1].float().log_softmax(-1).gather(-1, gen[..., None])[..., 0]  # [B, new]
    eos = gen == model.generation_config.eos_token_id
    alive = (eos.cumsum(1) - eos.long()) == 0  # up to and including the first eos
    torch.testing.assert_close(out.sequences_scores, (logp * alive).sum(1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family,kind", tiny.CASES)
def test_generate_without_cache_matches_cached(models, family, kind):
    """``use_cache=False`` re-runs prompt + generated tokens every step with the images encoded once: every step
    reuses the first step's choice (even ``random``'s), so it equals cached generation."""
    model = models(family)
    inputs = tiny.inputs_for(model, family, kind, batch=2)
    outs = []
    for use_cache in (True, False):
        with vlm_accel.accelerate(model, budget=0.25, method="random") as sess, torch.no_grad():
            outs.append(
                model.generate(
                    **inputs,
                    max_new_tokens=3,
                    do_sample=False,
                    use_cache=use_cache,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            )
        assert sess.stats.visual_tokens_kept < sess.stats.visual_tokens_in  # the last step was reduced too
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    torch.testing.assert_close(torch.stack(outs[1].scores), torch.stack(outs[0].scores), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_manual_decode_loop_without_mask(models, family):
    """A hand-written greedy loop that passes only the new token and the cache equals ``generate``."""
    model = models(family)
    inputs = tiny.make_inputs(model, family, batch=1)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with vlm_accel.accelerate(model, budget=0.25, method="divprune") as sess, torch.no_grad():
        ref = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        out = model(**inputs, use_cache=True)
        scores = []
        for _ in range(4):
            scores.append(out.logits[:, -1])
            token = scores[-1].argmax(-1, keepdim=True)
            out = model(input_ids=token, use_cache=True, **{cache_kw: getattr(out, cache_kw)})
    assert sess.stats.visual_tokens_kept < sess.stats.visual_tokens_in
    torch.testing.assert_close(torch.stack(scores), torch.stack(ref.scores), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_restore_is_exact_and_hook_free(models, family):
    model = models(family)
    inputs = tiny.make_inputs(model, family, batch=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = {id(m): (dict(vars(m)).keys(), len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()}
    with torch.no_grad():
        ref = model(**inputs).logits
        sess = vlm_accel.accelerate(model, budget=0.2, method="visionzip")
        model(**inputs)
        again = vlm_accel.accelerate(model, budget=0.5, method="pool")  # re-configuration, not double patching
        assert not sess.active and again.active
        model(**inputs)
        assert again.stats.visual_tokens_kept < again.stats.visual_tokens_in
        again.restore()
        out = model(**inputs).logits
    assert torch.equal(ref, out)
    after = {id(m): (dict(vars(m)).keys(), len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()}
    assert before == after
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_text_only_passes_through(models):
    model = models("llava")
    ids = torch.randint(1, 90, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with vlm_accel.accelerate(model, budget=0.1) as sess:
            out = model(input_ids=ids).logits
            gen = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        assert torch.equal(gen, model.generate(input_ids=ids, max_new_tokens=3, do_sample=False))
    assert torch.equal(ref, out)
    assert sess.stats.visual_tokens_in == 0
