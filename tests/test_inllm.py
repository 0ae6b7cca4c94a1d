"""In-LLM pruning (fastv, pdrop) against a readable reference: the unpatched language model, one row at a time, with
eager attention weights at layer K-1, the top visual tokens of each image kept, layers K.. re-run on the kept tokens
at their original positions."""

import pytest
import torch

import vlm_accel
from vlm_accel.adapters import adapter_for
from vlm_accel.control.budget import Budget
from vlm_accel.methods.inllm import stage_layers, stage_quota

import oracle
import tiny

FAMILIES = tiny.FAMILIES


def image_segments(model, family, inputs) -> list[list[torch.Tensor]]:
    """Per row, the sequence positions of each budgeted segment (image; LLaVA-NeXT / OneVision: base view and crops,
    without newline tokens)."""
    ids = inputs["input_ids"]
    rows = [(ids[b] == tiny.IMAGE_ID).nonzero()[:, 0] for b in range(ids.shape[0])]
    if family not in ("llava_next", "llava_onevision"):
        return [[r] for r in rows]
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output
    infos = adapter_for(model).describe(list(feats), {"image_sizes": inputs["image_sizes"]}, None)
    return [[r[s.idx] for s in info.segments] for r, info in zip(rows, infos, strict=True)]


def _layer_mask(n: int, dtype) -> torch.Tensor:
    """Additive causal mask ``[1, 1, n, n]`` (positions are in original order, no padding)."""
    m = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return m[None, None]


@torch.no_grad()
def manual_lm(model, kw: dict, row: int, starts, choose):
    """The language model of ``model`` (eager attention) on one row, by hand.

    ``kw``: the unpatched model's language-model inputs for the whole batch; ``starts``: stage layers; ``choose(stage,
    weights [H, n, n], cur [n])`` -> positions kept for the layers from that stage on. Returns logits ``[n_last, V]``
    and the kept positions of the last stage."""
    lm = model.model.language_model
    valid = kw["attention_mask"][row].bool()
    cur = valid.nonzero()[:, 0]
    h = kw["inputs_embeds"][row : row + 1, cur]
    pos = kw.get("position_ids")
    if pos is None:
        pos = torch.arange(valid.numel())[None].expand(kw["inputs_embeds"].shape[0], -1)
    if pos.dim() == 3 and pos.shape[0] == 4:
        pos = pos[1:]
    pos_row = pos[..., row : row + 1, :]
    vpm = kw.get("visual_pos_masks")
    deep = kw.get("deepstack_visual_embeds") or []
    if deep:
        full_deep = []
        for e in deep:
            f = e.new_zeros(*vpm.shape, e.shape[-1])
            f[vpm] = e
            full_deep.append(f[row])
    weights = {}
    hook = None
    for i, layer in enumerate(lm.layers):
        if i in starts:
            cur_new = choose(starts.index(i) + 1, weights[i - 1], cur)
            keep_slots = torch.tensor([int((cur == p).nonzero()) for p in cur_new.tolist()])
            h, cur = h[:, keep_slots], cur_new
        if i + 1 in starts:
            hook = layer.self_attn.register_forward_hook(lambda m, a, o, i=i: weights.__setitem__(i, o[1][0]))
        cos, sin = lm.rotary_emb(h, pos_row[..., cur])
        h = layer(h, attention_mask=_layer_mask(cur.numel(), h.dtype), position_embeddings=(cos, sin))
        if hook is not None:
            hook.remove()
            hook = None
        if i < len(deep):
            vis = vpm[row, cur]
            h = h.clone()
            h[0, vis] = h[0, vis] + full_deep[i][cur][vis]
    return model.lm_head(lm.norm(h))[0], cur


def topk_choice(segments_row, image_pos, budget, n_stages, rows=1):
    """FastV / PyramidDrop selection from eager weights: per segment, the top tokens by the attention of the last
    ``rows`` query rows (mean over heads and rows); image tokens outside every segment (newlines) are dropped."""

    def choose(stage, w, cur):
        score = w[:, -rows:].float().mean((0, 1))  # [n] attention received
        keep = ~torch.isin(cur, image_pos) | torch.isin(cur, torch.cat(segments_row))
        for seg in segments_row:
            here = torch.isin(cur, seg)
            n_now = int(here.sum())
            k = stage_quota(seg.numel(), budget.visual_quota(seg.numel()), stage, n_stages)
            if k >= n_now:
                continue
            slots = here.nonzero()[:, 0]
            top = score[slots].topk(k).indices
            keep[slots] = False
            keep[slots[top]] = True
        return cur[keep]

    return choose


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
@pytest.mark.parametrize("family", FAMILIES)
def test_equals_eager_reference(models, family, method):
    eager = models(family, "eager")
    inputs = tiny.inputs_for(eager, family, "image", batch=2, seed=5)
    kw = oracle.lm_inputs(eager, inputs)
    segs = image_segments(eager, family, inputs)
    budget = Budget(visual=0.3)
    starts = stage_layers(method, {}, len(eager.model.language_model.layers))
    outs = {}
    for attn in ("eager", "sdpa"):
        model = models(family, attn)
        with vlm_accel.accelerate(model, budget=0.3, method=method) as sess, torch.no_grad():
            outs[attn] = (model(**inputs).logits, sess.trace, sess.stats)
    logits, tr, stats = outs["sdpa"]
    assert [s[0] for s in tr.stages] == starts
    for b in range(2):
        ref, kept = manual_lm(
            eager,
            kw,
            b,
            starts,
            topk_choice(segs[b], (inputs["input_ids"][b] == tiny.IMAGE_ID).nonzero()[:, 0], budget, len(starts)),
        )
        got_pos = tr.output_index[b][tr.output_valid[b]]
        assert torch.equal(got_pos, kept)  # the same tokens survive, at their original positions
        n = kept.numel()
        for lg, _, _ in outs.values():
            torch.testing.assert_close(lg[b, -n:], ref, atol=2e-5, rtol=1e-4)
    # sdpa and eager keep the same set
    assert all(torch.equal(a[1][a[2]], c[1][c[2]]) for a, c in zip(outs["eager"][1].stages, tr.stages, strict=True))
    expected = sum(budget.visual_quota(s.numel()) for row in segs for s in row)
    assert stats.visual_tokens_kept == expected
    assert stats.visual_tokens_per_layer[0] == int((inputs["input_ids"] == tiny.IMAGE_ID).sum())
    assert stats.visual_tokens_mean == pytest.approx(
        sum(stats.visual_tokens_per_layer) / len(stats.visual_tokens_per_layer)
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_steps_equal_uncached_reference(models, family):
    """Every greedy step = the reference re-run on prompt + generated tokens, stages fixed by the prompt."""
    model = models(family, "eager")
    inputs = tiny.inputs_for(model, family, "image", batch=2, seed=7)
    segs = image_segments(model, family, inputs)
    starts = stage_layers("pdrop", {}, len(model.model.language_model.layers))
    with vlm_accel.accelerate(model, budget=0.3, method="pdrop") as sess, torch.no_grad():
        gen = model.generate(
            **inputs, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        stages = sess.trace.stages
    prompt = inputs["input_ids"].shape[1]
    kw0 = oracle.lm_inputs(model, inputs)
    for step in range(3):
        ids = gen.sequences[:, : prompt + step]
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, step, dtype=torch.long)], 1)
        kw = dict(kw0, attention_mask=mask)
        new = model.model.language_model.embed_tokens(ids[:, prompt:])
        kw["inputs_embeds"] = torch.cat([kw0["inputs_embeds"], new], 1)
        kw["position_ids"] = oracle.full_positions(model, family, ids, mask, inputs)
        if family == "qwen3_vl":
            kw["position_ids"] = torch.cat([kw["position_ids"][:1], kw["position_ids"]], 0)
            kw["visual_pos_masks"] = torch.cat([kw0["visual_pos_masks"], torch.zeros(2, step, dtype=torch.bool)], 1)
        for b in range(2):
            fixed = [s[1][b][s[2][b]] for s in stages]

            def choose(stage, w, cur, fixed=fixed, step=step):
                return torch.cat([fixed[stage - 1], torch.arange(prompt, prompt + step)])

            ref, _ = manual_lm(model, kw, b, starts, choose)
            torch.testing.assert_close(gen.scores[step][b], ref[-1], atol=2e-5, rtol=1e-4)
    assert segs  # the prompt had images


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_generate_variants_and_composition(models, family):
    model = models(family)
    inputs = tiny.inputs_for(model, family, "image", batch=2, seed=2)
    no_placeholders = dict(suppress_tokens=[tiny.IMAGE_ID, tiny.VIDEO_ID])  # a re-run must not meet new images
    with vlm_accel.accelerate(model, budget=0.3, method="fastv", method_options={"layer": 1}), torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=4, do_sample=False, **no_placeholders)
        static = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, cache_implementation="static", **no_placeholders
        )
        nocache = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False, **no_placeholders)
        beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2)
        sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=5)
    assert torch.equal(static, greedy)
    assert torch.equal(nocache, greedy)
    assert beams.shape[0] == 4 and sampled.shape[0] == 2
    b = Budget(visual=0.5, llm=0.5)
    pre = "visionzip" if family == "llava" else "divprune"
    with vlm_accel.accelerate(model, budget=b, method=f"{pre}+fastv") as sess, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    n_vis = int((inputs["input_ids"] == tiny.IMAGE_ID).sum())
    per_layer = sess.stats.visual_tokens_per_layer
    assert per_layer[0] < n_vis and per_layer[-1] < per_layer[0]


def test_full_budget_is_identity(models):
    for family in FAMILIES:
        model = models(family)
        inputs = tiny.inputs_for(model, family, "image", batch=2)
        with torch.no_grad():
            ref = model(**inputs).logits
            with vlm_accel.accelerate(model, budget=1.0, method="pdrop"):
                assert torch.equal(model(**inputs).logits, ref)


def test_bad_options(models):
    model = models("qwen2_vl")
    with pytest.raises(ValueError, match="valid options: layer"):
        vlm_accel.accelerate(model, method="fastv", method_options={"K": 2})
    with pytest.raises(ValueError, match="does not fit"):
        vlm_accel.accelerate(model, method="fastv", method_options={"layer": 3})
    with pytest.raises(ValueError, match="bad value"):
        vlm_accel.accelerate(model, method="pdrop", method_options={"schedule": [(1, 0.2), (2, 0.5)]})
    with pytest.raises(ValueError, match="one pre-LLM method and one in-LLM"):
        vlm_accel.accelerate(model, method="divprune+random")
    with pytest.raises(ValueError, match="composite"):
        vlm_accel.accelerate(model, budget=vlm_accel.Budget(visual=0.5, llm=0.5), method="divprune")
    assert not hasattr(model, "_vlm_accel_session")
