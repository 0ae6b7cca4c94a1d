"""KV eviction (Budget(kv=...), kv_max) on every family: counts, sdpa = eager choices, and decoding against a
readable reference: the unpatched language model (eager) on prompt + generated tokens, uncached, where every
generated token may attend, per layer and KV head, only to the prompt entries that layer's cache kept."""

import pytest
import torch

import vlm_accel
import vlm_accel.kv.quant
from vlm_accel import Budget
from vlm_accel.api import KV_GROUP, KV_RESIDUAL
from vlm_accel.kv.presses import PRESSES, quota

import oracle
import tiny


def _mask(prompt: int, total: int, kept_heads: list[torch.Tensor], heads: int, dtype) -> torch.Tensor:
    """``[1, H, T, T]`` additive: causal; generated rows see only the kept prompt entries of their KV head."""
    allowed = torch.ones(total, total, dtype=torch.bool).tril()
    out = allowed[None].repeat(heads, 1, 1)
    group = heads // len(kept_heads)
    for h in range(heads):
        row_ok = torch.zeros(prompt, dtype=torch.bool)
        row_ok[kept_heads[h // group]] = True
        out[h, prompt:, :prompt] &= row_ok
    return torch.zeros(1, heads, total, total, dtype=dtype).masked_fill(~out[None], torch.finfo(dtype).min)


@torch.no_grad()
def reference_logits(model, kw: dict, row: int, prompt_valid: torch.Tensor, kept: dict) -> torch.Tensor:
    """Logits of one row over its real tokens (prompt + generated), the generated ones limited to the kept entries."""
    lm = model.model.language_model
    valid = kw["attention_mask"][row].bool()
    real = valid.nonzero()[:, 0]
    n_prompt_real = int(prompt_valid[row].sum())
    prompt_slots = prompt_valid[row].nonzero()[:, 0]  # cache slot -> position
    pos = kw.get("position_ids")
    if pos is None:
        pos = torch.arange(valid.numel())[None].expand(kw["inputs_embeds"].shape[0], -1)
    if pos.dim() == 3 and pos.shape[0] == 4:
        pos = pos[1:]
    h = kw["inputs_embeds"][row : row + 1, real]
    cos, sin = lm.rotary_emb(h, pos[..., row : row + 1, real])
    heads = lm.config.num_attention_heads
    for i, layer in enumerate(lm.layers):
        index = kept[i][row]  # [H_kv, K] cache slots kept
        heads_kept = []
        for hk in range(index.shape[0]):
            slots = index[hk][torch.isin(index[hk], prompt_slots)]
            positions = slots  # slot == position in the LM input (no pre-LLM reduction here)
            heads_kept.append(torch.searchsorted(real, positions))
        mask = _mask(n_prompt_real, real.numel(), heads_kept, heads, h.dtype)
        h = layer(h, attention_mask=mask, position_embeddings=(cos, sin))
        vpm = kw.get("visual_pos_masks")
        if kw.get("deepstack_visual_embeds") and i < len(kw["deepstack_visual_embeds"]):
            e = kw["deepstack_visual_embeds"][i]
            full = e.new_zeros(*vpm.shape, e.shape[-1])
            full[vpm] = e
            vis = vpm[row, real]
            h = h.clone()
            h[0, vis] = h[0, vis] + full[row, real][vis]
    return model.lm_head(lm.norm(h))[0]


@pytest.mark.parametrize("press", sorted(PRESSES))
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_decode_equals_reference(models, family, press):
    model = models(family, "eager")
    inputs = tiny.inputs_for(model, family, "image", batch=2, seed=4)
    prompt = inputs["input_ids"].shape[1]
    with vlm_accel.accelerate(model, budget=Budget(kv=0.3), kv_press=press) as sess, torch.no_grad():
        gen = model.generate(
            **inputs,
            max_new_tokens=3,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            suppress_tokens=[tiny.IMAGE_ID, tiny.VIDEO_ID],
        )
        kept = dict(sess.kv.compressor.kept)
        entries = [v.shape[1] for v in sess.kv.compressor.valid.values()]  # prompt entries kept per layer
    valid = inputs["attention_mask"].bool()
    want = quota(valid.sum(1), 0.3)
    assert entries == [int(want.max())] * len(entries)  # the promised count per layer and head group
    ids = gen.sequences[:, : prompt + 2]
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 2, dtype=torch.long)], 1)
    kw = dict(oracle.lm_inputs(model, inputs))
    new = model.model.language_model.embed_tokens(ids[:, prompt:])
    kw["inputs_embeds"] = torch.cat([kw["inputs_embeds"], new], 1)
    kw["attention_mask"] = mask
    kw["position_ids"] = oracle.full_positions(model, family, ids, mask, inputs)
    if family == "qwen3_vl":
        kw["visual_pos_masks"] = torch.cat([kw["visual_pos_masks"], torch.zeros(2, 2, dtype=torch.bool)], 1)
    for b in range(2):
        ref = reference_logits(model, kw, b, valid, kept)
        for step in range(3):
            got = gen.scores[step][b]
            ok = torch.isfinite(got)  # suppressed placeholder ids are -inf
            torch.testing.assert_close(got[ok], ref[step - 3][ok], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
def test_sdpa_keeps_what_eager_keeps(models, family):
    chosen = {}
    for attn in ("eager", "sdpa"):
        model = models(family, attn)
        inputs = tiny.inputs_for(model, family, "image", batch=2, seed=6)
        with vlm_accel.accelerate(model, budget=Budget(kv=0.25), kv_press="snapkv") as sess, torch.no_grad():
            model(**inputs)
            chosen[attn] = dict(sess.kv.compressor.kept)
    for i in chosen["eager"]:
        assert torch.equal(chosen["eager"][i], chosen["sdpa"][i])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_kv_max_bounds_long_generation(models, family):
    model = models(family)
    inputs = tiny.inputs_for(model, family, "image", batch=2, seed=1)
    sizes = []
    with vlm_accel.accelerate(model, budget=Budget(visual=0.5, kv_max=24), method="divprune") as sess:
        hook = model.model.language_model.layers[-1].register_forward_hook(
            lambda m, a, o: sizes.append(
                model._vlm_accel_session.kv.compressor.valid.get(0, torch.zeros(1, 0)).shape[1]
            )
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=40, min_new_tokens=40, do_sample=False)
        hook.remove()
        assert out.shape[1] == inputs["input_ids"].shape[1] + 40
        assert sess.decoding.current.delta > 0
    assert max(sizes) <= 24


def test_full_kv_is_identity_and_bad_budgets(models):
    model = models("qwen2_vl")
    inputs = tiny.inputs_for(model, "qwen2_vl", "image", batch=2)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vlm_accel.accelerate(model, budget=Budget(kv=1.0, kv_bits=16)) as sess:
            assert sess.kv is None and torch.equal(model(**inputs).logits, ref)
    for bad in (dict(kv=0.0), dict(kv_bits=3), dict(kv_max=0), dict(kv=-1)):
        with pytest.raises(ValueError):
            Budget(**bad)
    with pytest.raises(ValueError, match="unknown KV press"):
        vlm_accel.accelerate(model, budget=Budget(kv=0.5), kv_press="nope")
    with pytest.raises(ValueError, match="static"):
        with vlm_accel.accelerate(model, budget=Budget(kv=0.5)), torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_onevision"])
def test_quantized_and_mixed_caches_with_visual_budget(models, family):
    """kv_bits (alone, with eviction, mixed precision, with a visual budget): batch 2 left-padded, greedy and beams;
    bytes held after decoding well below the unpatched cache; logits near full precision."""
    model = models(family)
    inputs = tiny.inputs_for(model, family, "image", batch=2, seed=3)
    with torch.no_grad():
        ref = model(**inputs).logits
        full = model.generate(
            **inputs, max_new_tokens=40, min_new_tokens=40, do_sample=False, return_dict_in_generate=True
        )
    dense = vlm_accel.kv.quant.nbytes(full.past_key_values)
    budgets = [
        Budget(kv_bits=4),
        Budget(kv_bits=2),
        Budget(kv=0.5, kv_bits=2, kv_important=0.25),
        Budget(visual=0.5, kv=0.5, kv_bits=4),
    ]
    for b in budgets:
        with vlm_accel.accelerate(model, budget=b, method="divprune") as sess, torch.no_grad():
            logits = model(**inputs).logits
            model.generate(**inputs, max_new_tokens=40, min_new_tokens=40, do_sample=False)
            held = sess.stats.kv_bytes
            kept = sum(sess.stats.kv_entries_per_layer) / sum(vlm_accel.kv.quant.entries(full.past_key_values))
            beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2)
        assert beams.shape[0] == 4
        if b.visual == 1.0:  # the prefill itself is exact: quantization starts with decoding
            torch.testing.assert_close(logits, ref)
        # tiny heads (head_dim 16) and a 32-entry exact window leave more overhead than real models (see bench kv)
        assert kept < 1.0 or b.kv == 1.0
        # KIVI keeps the last 32..63 entries exact: only longer caches shrink
        long = max(sess.stats.kv_entries_per_layer) >= KV_RESIDUAL + KV_GROUP + 16
        assert held <= (0.7 if long else 1.0) * dense * kept, (b, held / dense / kept)


def test_stream_of_500_frames_holds_at_most_kv_max():
    model, processor = tiny.build_default_like()
    bound = 48
    with vlm_accel.stream(model, processor, budget=Budget(visual=4, kv_max=bound), max_tokens=64) as s:
        for i in range(500):
            s.add_frame(_frame(i // 5), t=i / 10)
            if i in (50, 499):
                s.ask("what color is the circle?", max_new_tokens=6)
                assert max(s.session.stats.kv_entries_per_layer) <= bound


def _frame(seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (60, 80, 3), dtype=np.uint8))


def test_standalone_press_on_a_text_decoder():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**{k: v for k, v in tiny._LLAMA.items()})
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 100, (1, 40))
    with torch.no_grad():
        ref = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        with vlm_accel.kv.KVPress(model, "snapkv", kv=1.0):
            assert torch.equal(model.generate(input_ids=ids, max_new_tokens=5, do_sample=False), ref)
        with vlm_accel.kv.KVPress(model, "streaming", kv_max=16) as press:
            out = model.generate(input_ids=ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
            assert out.shape[1] == 60
            assert all(v.shape[1] <= 16 for v in press.compressor.valid.values())
        with vlm_accel.kv.KVPress(model, "snapkv", kv=0.25) as press:
            model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
            assert [v.shape[1] for v in press.compressor.valid.values()] == [10, 10]
        assert "forward" not in vars(model.model)  # restored
        padded = torch.ones(2, 40, dtype=torch.long)
        padded[0, :3] = 0
        with vlm_accel.kv.KVPress(model, "snapkv", kv=0.5), pytest.raises(ValueError, match="padded"):
            model.generate(input_ids=ids.repeat(2, 1), attention_mask=padded, max_new_tokens=2)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family,kind", tiny.CASES)
@pytest.mark.parametrize("press", sorted(PRESSES))
def test_press_matrix(models, press, family, kind, batch):
    """Every registered press x every family and input kind x batch {1, 2} x generate. New presses join by
    registering in ``PRESSES``."""
    model = models(family)
    inputs = tiny.inputs_for(model, family, kind, batch=batch, seed=batch)
    with torch.no_grad():
        ref = model(**inputs).logits
    budget = Budget(visual=0.5, kv=0.25, kv_max=40)
    with vlm_accel.accelerate(model, budget=budget, method="divprune", kv_press=press) as sess, torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        kept = {i: v.shape[1] for i, v in sess.kv.compressor.valid.items()}
    assert gen.shape == (batch, inputs["input_ids"].shape[1] + 4)
    assert max(kept.values()) <= 40 and len(kept) == len(model.model.language_model.layers)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)  # restored exactly


def _reference_vision_keep(keys, relevance, visual, valid, keep, relevant):
    """Readable rule of the vision press, one row and KV head at a time: every text entry (the most relevant ones
    if the text alone exceeds the quota); of the visual quota, the ``relevant`` share with the highest relevance,
    then greedy max-min picks (the first: largest mean cosine distance to the visual keys when nothing is picked yet;
    each next: farthest from its nearest picked visual key)."""
    b, h = keys.shape[:2]
    out = []
    for r in range(b):
        text = [i for i in range(keys.shape[2]) if valid[r, i] and not visual[r, i]]
        vis = [i for i in range(keys.shape[2]) if valid[r, i] and visual[r, i]]
        k_vis = min(max(int(keep[r]) - len(text), 0), len(vis))
        k_rel = round(relevant * k_vis)
        heads = []
        for hk in range(h):
            rel = {i: float(relevance[r, hk, i]) for i in vis}
            picked = sorted(vis, key=lambda i: -rel[i])[:k_rel]
            unit = torch.nn.functional.normalize(keys[r, hk].double(), dim=-1)
            dist = (1.0 - unit @ unit.T).tolist()  # cosine distance between entries i and j: dist[i][j]

            for _ in range(k_vis - k_rel):
                rest = [i for i in vis if i not in picked]
                if picked:
                    picked.append(max(rest, key=lambda i: min(dist[i][j] for j in picked)))
                else:
                    picked.append(max(rest, key=lambda i: sum(dist[i][j] for j in vis) / len(vis)))
            kept_text = sorted(text, key=lambda i: -float(relevance[r, hk, i]))[: int(keep[r])]
            heads.append(set(kept_text) | set(picked))
        out.append(heads)
    return out


def _reference_relevance(attn, hidden, pe, valid, window, kernel):
    """SnapKV's score, spelled out: eager causal attention of the last ``window`` rows, averaged over those rows and
    the query heads of each KV head, smoothed over ``kernel`` neighbours (zero padding at the ends)."""
    from vlm_accel.llm.attention import project_keys, project_queries

    b, n = valid.shape
    q = project_queries(attn, hidden, pe, torch.arange(n).expand(b, n))  # [B, H, L, hd]
    k = project_keys(attn, hidden, pe)  # [B, H_kv, L, hd]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    logits = (q @ k.transpose(-1, -2)) * attn.scaling
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    s = probs[:, :, n - window :].mean(2)  # [B, H, L]
    s = s.view(b, -1, group, n).mean(2)  # [B, H_kv, L]
    padded = torch.nn.functional.pad(s, (kernel // 2, kernel // 2))
    return torch.stack([padded[..., i : i + kernel].mean(-1) for i in range(n)], -1)


@pytest.mark.parametrize("kv", [0.5, 0.25])
@pytest.mark.parametrize("relevant", [0.0, 0.25, 1.0])
def test_vision_press_equals_readable_rule(relevant, kv):
    import transformers as tf

    from vlm_accel.kv.presses import PressInput, VisionAwarePress, select
    from vlm_accel.llm.attention import project_keys

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**tiny._LLAMA)).eval()
    attn = model.model.layers[0].self_attn
    b, n = 3, 48  # three rows, two KV heads
    hidden = torch.randn(b, n, tiny._LLAMA["hidden_size"])
    pe = model.model.rotary_emb(hidden, torch.arange(n)[None].expand(b, n))
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, :5] = False  # left padding
    valid[2, :2] = False
    visual = torch.zeros(b, n, dtype=torch.bool)
    visual[0, 8:40] = True  # [pad] text, 32 visual entries, text (the question)
    visual[1, 10:42] = True
    visual[2, 4:20] = True
    keep = quota(valid.sum(1), kv)  # kv=0.25: row 1 keeps 12 of its 16 text entries, no visual one
    with torch.no_grad():
        keys = project_keys(attn, hidden, pe)
        press = VisionAwarePress(relevant=relevant, window=6, kernel=3)
        scores = press.score(PressInput(attn, hidden, pe, keys, keys, valid, visual, keep=keep))
        index, new_valid = select(scores, valid, keep)
        relevance = _reference_relevance(attn, hidden, pe, valid, 6, 3)
    want = _reference_vision_keep(keys, relevance, visual, valid, keep, relevant)
    for r in range(b):
        for hk in range(keys.shape[1]):
            got = set(index[r, hk][new_valid[r]].tolist())
            assert got == want[r][hk], (r, hk)
