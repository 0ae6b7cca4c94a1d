"""KIVI-style quantized KV cache and the mixed-precision layer (vlm_accel/kv/quant.py): packing, error bounds,
generate on a tiny Llama and the tiny VLMs, beam search, eviction, byte accounting, argument checks."""

import functools
import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from vlm_accel.kv.quant import (
    MixedPrecisionKVCache,
    MixedPrecisionKVLayer,
    QuantizedKVCache,
    QuantizedKVLayer,
    _expand,
    dense_nbytes,
    dequantize,
    entries,
    keep_entries,
    layer_stats,
    nbytes,
    pack,
    quantize,
    topk_mask,
    unpack,
)

import tiny

# teacher-forced logits vs full precision: ||dlogits|| / ||logits - mean||, measured max over the 7 tiny models
# (group 16, residual 8): 8 bits 0.0014, 4 bits 0.025, 2 bits 0.124 (qwen3_vl; the others <= 0.077). ~2x margin.
REL_TOL = {8: 0.005, 4: 0.06, 2: 0.25}
G, RES = 16, 8


@functools.cache
def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 128, (2, 80), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0  # left padding
    return model, {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def llama():
    return _tiny_llama()


def _model_inputs(name, models):
    if name == "llama":
        return _tiny_llama()
    model = models(name)
    return model, tiny.make_inputs(model, name, batch=2)


def _bound(x, scale, zero, bits, group, dim):
    """Per element: half the stored step, and the derived bound on it from the group's own range (float16 stats:
    zero rounded down by <= 2**-10 |min| (+2**-24 subnormal), step rounded up by a factor <= 1 + 2**-10)."""
    d = dim % 4
    levels = 2**bits - 1
    n_groups = -(-x.shape[d] // group)
    pad = n_groups * group - x.shape[d]
    edge = x.narrow(d, x.shape[d] - 1, 1)
    xp = torch.cat([x, edge.expand(*[pad if i == d else s for i, s in enumerate(x.shape)])], d)
    shape = list(xp.shape)
    grouped = xp.reshape(shape[:d] + [n_groups, group] + shape[d + 1 :])
    mn, mx = grouped.amin(d + 1), grouped.amax(d + 1)
    derived = ((mx - mn + 2**-10 * mn.abs() + 2**-24) / levels * (1 + 2**-10) + 2**-24) / 2
    return _expand(scale, group, d, x.shape[d]).float() / 2, _expand(derived, group, d, x.shape[d])


# ------------------------------------------------------------------------------------------------------ pure parts
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trips_exactly(bits):
    gen = torch.Generator().manual_seed(bits)
    for n in [1, 2, 3, 5, 8, 13, 64]:
        codes = torch.randint(0, 2**bits, (2, 3, 7, n), generator=gen, dtype=torch.uint8)
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape[-1] == math.ceil(n * bits / 8)
        assert torch.equal(unpack(packed, bits, n), codes)
    # the extremes fill every bit of a byte
    full = torch.full((1, 1, 1, 8), 2**bits - 1, dtype=torch.uint8)
    assert torch.equal(pack(full, bits), torch.full((1, 1, 1, 8 * bits // 8), 255, dtype=torch.uint8))


@pytest.mark.parametrize("stats_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [-2, -1])
def test_quantize_error_within_half_a_step(bits, dim, stats_dtype):
    """|x - dequant(quant(x))| <= scale / 2 per group, and scale <= (max - min) / (2**bits - 1) up to the
    statistics' rounding; a partial last group and an outlier channel included."""
    gen = torch.Generator().manual_seed(10 * bits + dim)
    x = torch.randn(2, 3, 37, 20, generator=gen) * 3
    x[..., 5] += 40.0  # a KIVI-style outlier channel
    group = 8
    packed, scale, zero = quantize(x, bits, group, dim, stats_dtype)
    assert scale.dtype == zero.dtype == stats_dtype
    y = dequantize(packed, scale, zero, bits, group, dim, x.shape)
    err = (x - y).abs()
    half_step, derived = _bound(x, scale, zero, bits, group, dim)
    eps = 4e-7 * x.abs().amax()  # float32 arithmetic
    assert (err <= half_step + eps).all()
    assert (half_step <= derived + eps).all()
    # the bound is tight: the worst element uses most of its half step
    assert float((err / half_step).max()) > 0.9
    # constant groups dequantize exactly
    c = torch.full((1, 1, 16, 16), 0.75)
    assert torch.equal(dequantize(*quantize(c, bits, group, dim), bits, group, dim, c.shape), c)


def test_key_stats_per_channel_value_stats_per_token():
    x = torch.randn(1, 2, 40, 24)
    _, ks, _ = quantize(x, 2, 16, -2)
    _, vs, _ = quantize(x, 2, 16, -1)
    assert ks.shape == (1, 2, 3, 24)  # ceil(40 / 16) token groups x every channel
    assert vs.shape == (1, 2, 40, 2)  # every token x ceil(24 / 16) channel groups


# ------------------------------------------------------------------------------------------------------ layer logic
def _feed(layer, k, v, chunks):
    start = 0
    for c in chunks:
        layer.update(k[:, :, start : start + c], v[:, :, start : start + c])
        start += c


@pytest.mark.parametrize("bits", [2, 4])
def test_layer_window_and_lazy_quantization(bits):
    """The prompt stays exact until the next update; then older whole groups are quantized within the bound and the
    newest ``residual .. residual + group - 1`` entries stay exact."""
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 60, 16, generator=gen), torch.randn(2, 2, 60, 16, generator=gen)
    layer = QuantizedKVLayer(bits, group_size=G, residual=RES)
    k0, v0 = layer.update(k[:, :, :50], v[:, :, :50])
    assert torch.equal(k0, k[:, :, :50]) and torch.equal(v0, v[:, :, :50])  # prefill: nothing quantized yet
    assert layer_stats_one(layer) == (50, 0)
    k1, v1 = layer.update(k[:, :, 50:51], v[:, :, 50:51])
    assert k1.shape[-2] == 51 and layer_stats_one(layer) == (51, 32)  # (50 - 8) // 16 * 16 = 32 quantized
    assert torch.equal(k1[:, :, 32:], k[:, :, 32:51]) and torch.equal(v1[:, :, 32:], v[:, :, 32:51])
    kq, vq = k1[:, :, :32], v1[:, :, :32]
    _, ks, kz = quantize(k[:, :, :32], bits, G, -2)
    _, vs, vz = quantize(v[:, :, :32], bits, G, -1)
    assert ((kq - k[:, :, :32]).abs() <= _expand(ks, G, 2, 32).float() / 2 + 1e-6).all()
    assert ((vq - v[:, :, :32]).abs() <= _expand(vs, G, 3, 16).float() / 2 + 1e-6).all()
    assert not torch.equal(kq, k[:, :, :32])
    layer.update(k[:, :, 51:52], v[:, :, 51:52])
    layer.update(k[:, :, 52:60], v[:, :, 52:60])
    assert layer.get_seq_length() == 60 and layer._n_fp() <= RES + G - 1 + 8  # + the chunk just appended
    layer.flush()
    assert layer.get_seq_length() == 60 and RES <= layer._n_fp() <= RES + G - 1
    km, vm = layer.materialize()
    assert km.shape == (2, 2, 60, 16) and torch.equal(km[:, :, :32], kq)


def layer_stats_one(layer):
    return layer.get_seq_length(), layer.get_seq_length() - layer._n_fp()


def test_layer_reorder_crop_and_batch_ops_are_exact():
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(3, 2, 70, 16, generator=gen), torch.randn(3, 2, 70, 16, generator=gen)
    layer = QuantizedKVLayer(4, group_size=G, residual=RES)
    _feed(layer, k, v, [60, 5, 5])
    km, vm = layer.materialize()
    idx = torch.tensor([2, 0, 0])
    layer.reorder_cache(idx)
    k2, v2 = layer.materialize()
    assert torch.equal(k2, km[idx]) and torch.equal(v2, vm[idx])
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.materialize()[0], km[idx].repeat_interleave(2, 0))
    layer.batch_select_indices(torch.tensor([0, 3]))
    assert torch.equal(layer.materialize()[1], vm[idx].repeat_interleave(2, 0)[[0, 3]])
    n_fp = layer._n_fp()
    layer.crop(-(n_fp + 5))  # through the window into the quantized block
    assert layer.get_seq_length() == 70 - n_fp - 5
    assert torch.equal(layer.materialize()[0], km[idx].repeat_interleave(2, 0)[[0, 3]][:, :, : 65 - n_fp])
    with pytest.raises(ValueError, match="negative"):
        layer.crop(3)


# ------------------------------------------------------------------------------------------------------ generate
class _Force(LogitsProcessor):
    """Teacher forcing: the next token is the reference's (raw logits are still returned by output_logits)."""

    def __init__(self, seq):
        self.seq = seq

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(1, self.seq[:, input_ids.shape[1], None].to(scores.device), 0.0)


def _gen(model, inputs, cache=None, **kw):
    kw = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True) | kw
    with torch.no_grad():
        return model.generate(**inputs, cache=cache, **kw) if cache is not None else model.generate(**inputs, **kw)


FAST = ["llama", "llava", "qwen2_vl", "qwen3_vl"]
NAMES = FAST + [pytest.param(f, marks=pytest.mark.slow) for f in tiny.FAMILIES if f not in FAST]


@pytest.mark.parametrize("name", NAMES)
def test_16_bits_is_bit_identical_to_dynamic_cache(models, name):
    model, inputs = _model_inputs(name, models)
    ref = _gen(model, inputs, DynamicCache())
    out = _gen(model, inputs, QuantizedKVCache(16, group_size=G, residual=RES))
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_quantized_generate_close_to_full_precision(models, name):
    """Teacher-forced on the full-precision continuation (batch 2, left padding): finite logits whose error
    shrinks with the bit width and stays within the measured tolerance."""
    model, inputs = _model_inputs(name, models)
    ref = _gen(model, inputs)
    full = torch.stack(ref.logits, 1)
    centred = (full - full.mean(-1, keepdim=True)).norm()
    errs = {}
    for bits in (8, 4, 2):
        cache = QuantizedKVCache(bits, group_size=G, residual=RES, config=model.config)
        out = _gen(model, inputs, cache, logits_processor=LogitsProcessorList([_Force(ref.sequences)]))
        assert torch.equal(out.sequences, ref.sequences)
        logits = torch.stack(out.logits, 1)
        assert torch.isfinite(logits).all()
        errs[bits] = float((logits - full).norm() / centred)
        assert errs[bits] <= REL_TOL[bits], (bits, errs)
        assert all(st["quantized"] > 0 for st in layer_stats(cache))
    assert errs[8] < errs[4] < errs[2]
    free = _gen(model, inputs, QuantizedKVCache(2, group_size=G, residual=RES), output_logits=False)  # not forced
    assert free.sequences.shape == ref.sequences.shape


def test_beam_search(llama):
    model, inputs = llama
    kw = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, output_logits=False, output_scores=True)
    ref = _gen(model, inputs, **kw)
    same = _gen(model, inputs, QuantizedKVCache(16), **kw)
    assert torch.equal(same.sequences, ref.sequences)
    for bits in (4, 2):
        out = _gen(model, inputs, QuantizedKVCache(bits, group_size=G, residual=RES), **kw)
        assert out.sequences.shape == ref.sequences.shape
        assert torch.isfinite(out.sequences_scores).all()
    q8 = _gen(model, inputs, QuantizedKVCache(8, group_size=G, residual=RES), **kw)
    assert torch.equal(q8.sequences, ref.sequences)  # 8 bits changes no beam on this model


# ------------------------------------------------------------------------------------------------------ eviction
def test_keep_is_exact_before_and_after_quantization():
    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn(2, 2, 64, 16, generator=gen), torch.randn(2, 2, 64, 16, generator=gen)
    index = torch.sort(torch.rand(2, 2, 64, generator=gen).argsort(-1)[..., :24], -1).values

    def take(x, i):
        return x.gather(2, i.unsqueeze(-1).expand(*i.shape, x.shape[-1]))

    layer = QuantizedKVLayer(2, group_size=G, residual=RES)
    layer.update(k, v)  # prefill: still full precision
    layer.keep(index)
    km, vm = layer.materialize()
    assert torch.equal(km, take(k, index)) and torch.equal(vm, take(v, index))
    assert layer.get_seq_length() == 24 and layer._n_fp() == 24  # lazy: quantized at the next update

    # on quantized entries: exact too (codes, value statistics and key group ids are gathered), repeatedly
    layer = QuantizedKVLayer(4, group_size=G, residual=RES)
    layer.update(k, v)
    layer.update(k[:, :, :1], v[:, :, :1])  # decoding step: 48 entries quantized, 17 in the window
    before_k, before_v = layer.materialize()
    n_fp = layer._n_fp()
    recent = torch.arange(65 - n_fp, 65).expand(2, 2, n_fp)
    older = torch.sort(torch.rand(2, 2, 48, generator=gen).argsort(-1)[..., :30], -1).values
    sel = torch.cat([older, recent], -1)  # a press keeping the recent window: the window stays exact
    layer.keep(sel)
    assert layer.get_seq_length() == 30 + n_fp and layer._n_fp() == n_fp
    km, vm = layer.materialize()
    assert torch.equal(km, take(before_k, sel)) and torch.equal(vm, take(before_v, sel))
    for _ in range(3):  # a subset mixing window and older entries: the window is quantized first
        layer.update(k[:, :, :1], v[:, :, :1])
        before_k, before_v = layer.materialize()
        n, n_fp = layer.get_seq_length(), layer._n_fp()
        window_k = layer.keys
        _, ks, _ = quantize(window_k, 4, G, -2)
        half_k = _expand(ks, G, 2, n_fp).float() / 2  # [B, H, n_fp, D]
        sel = torch.sort(torch.rand(2, 2, n, generator=gen).argsort(-1)[..., : n - 5], -1).values
        layer.keep(sel)
        assert layer._n_fp() == 0 and layer.get_seq_length() == n - 5
        km, vm = layer.materialize()
        old = (sel < n - n_fp).unsqueeze(-1)
        assert torch.equal(torch.where(old, km, 0), torch.where(old, take(before_k, sel), 0))  # exact
        assert torch.equal(torch.where(old, vm, 0), torch.where(old, take(before_v, sel), 0))
        bound = take(half_k, (sel - (n - n_fp)).clamp(min=0))
        assert (torch.where(old, 0, (km - take(before_k, sel)).abs() - bound) <= 1e-6).all()
    sel = torch.arange(layer.get_seq_length() - 3).expand(2, 2, -1)
    before_k, before_v = layer.materialize()
    layer.keep(sel)  # everything quantized: exact
    km, vm = layer.materialize()
    assert torch.equal(km, take(before_k, sel)) and torch.equal(vm, take(before_v, sel))
    index = sel

    layer.keep_entries(sel[..., :5])  # the names vlm_accel.kv.compress calls
    assert torch.equal(layer.full_entries()[0], take(before_k, sel)[:, :, :5])

    dyn = DynamicCache()
    dyn.update(k, v, 0)
    keep_entries(dyn.layers[0], index[..., :-1])
    assert torch.equal(dyn.layers[0].keys, take(k, index[..., :-1]))
    with pytest.raises(ValueError, match="index"):
        layer.keep(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        layer.keep(torch.full((2, 2, 3), 99))


def test_keep_then_generate(llama):
    """A press evicting right after prefill (per row and head, equal counts), then quantized decoding."""
    model, inputs = llama
    cache = QuantizedKVCache(4, group_size=G, residual=RES)
    with torch.no_grad():
        out = model(**inputs, cache=cache, use_cache=True)
        scores = torch.rand(2, 2, 80, generator=torch.Generator().manual_seed(0))
        scores[..., -4:] = 2.0  # keep the last tokens
        for layer in cache.layers:
            layer.keep(scores.topk(40, -1).indices.sort(-1).values)
        assert entries(cache) == [40, 40]
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"].new_ones(2, 40), torch.ones_like(tok)], 1)
        logits = []
        for step in range(20):
            pos = torch.full((2, 1), 80 + step)
            o = model(input_ids=tok, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            logits.append(o.logits)
            tok, mask = o.logits[:, -1].argmax(-1, keepdim=True), torch.cat([mask, torch.ones_like(tok)], 1)
    assert torch.isfinite(torch.cat(logits)).all()
    assert entries(cache) == [60, 60] and all(st["quantized"] > 0 for st in layer_stats(cache))


# ------------------------------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("high_bits", [8, 16])
def test_mixed_precision_keeps_important_entries_precise(high_bits):
    gen = torch.Generator().manual_seed(7)
    k, v = torch.randn(2, 2, 72, 16, generator=gen), torch.randn(2, 2, 72, 16, generator=gen)
    scores = torch.rand(2, 2, 72, generator=gen)
    mask = topk_mask(scores, 12)
    mask[1, 0, :3] = True  # unequal counts over rows / heads are allowed
    layer = MixedPrecisionKVLayer(2, high_bits=high_bits, group_size=G, residual=RES)
    layer.update(k, v)
    layer.set_important(mask)
    assert torch.equal(layer.important(), mask)
    layer.flush()
    n_q = layer.get_seq_length() - layer._n_fp()
    assert n_q == 64
    km, vm = layer.materialize()
    imp = mask[..., :n_q]
    err_k = (km - k).abs()[:, :, :n_q].amax(-1)
    err_v = (vm - v).abs()[:, :, :n_q].amax(-1)
    low_err = max(float(err_k[~imp].max()), float(err_v[~imp].max()))
    if high_bits == 16:
        assert float(err_k[imp].max()) == 0 and float(err_v[imp].max()) == 0
    else:  # 8 bits: about 1/85 of the 2-bit step
        assert max(float(err_k[imp].max()), float(err_v[imp].max())) < low_err / 20
    assert torch.equal(km[:, :, n_q:], k[:, :, n_q:])
    assert torch.equal(layer.important(), mask)
    uniform = QuantizedKVLayer(2, group_size=G, residual=RES)
    uniform.update(k, v)
    uniform.flush()
    assert uniform.nbytes() < layer.nbytes() < dense_bytes(k)
    # flags travel with crop, beams and eviction
    cropped = MixedPrecisionKVLayer(2, high_bits=high_bits, group_size=G, residual=RES)
    cropped.update(k, v)
    cropped.set_important(mask)
    cropped.flush()
    cropped.crop(-(cropped._n_fp() + 5))  # into the mixed block: exact
    assert torch.equal(cropped.materialize()[0], km[:, :, :59]) and torch.equal(cropped.important(), mask[..., :59])
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.important(), mask[[1, 0]])
    keep = torch.arange(0, 72, 2).expand(2, 2, 36)
    before_k, before_v = layer.materialize()
    layer.keep(keep)  # window entries picked too: the window is quantized first (mixed), the rest is exact
    assert torch.equal(layer.important(), mask[[1, 0]][..., ::2])
    km, vm = layer.materialize()
    assert torch.equal(km[:, :, :32], before_k[:, :, :64:2]) and torch.equal(vm[:, :, :32], before_v[:, :, :64:2])
    for _ in range(3):  # repeated decode-time evictions with ragged flag counts stay exact
        layer.update(k[:, :, :2], v[:, :, :2])
        before_k, before_v, flags = *layer.materialize(), layer.important()
        n = layer.get_seq_length()
        sel = torch.sort(torch.rand(2, 2, n - layer._n_fp(), generator=gen).argsort(-1)[..., :20], -1).values
        sel = torch.cat([sel, torch.arange(n - layer._n_fp(), n).expand(2, 2, -1)], -1)  # + the window
        layer.keep(sel)
        km, vm = layer.materialize()
        idx = sel.unsqueeze(-1).expand(*sel.shape, 16)
        assert torch.equal(km, before_k.gather(2, idx)) and torch.equal(vm, before_v.gather(2, idx))
        assert torch.equal(layer.important(), flags.gather(2, sel))
    with pytest.raises(ValueError, match="bool mask"):
        layer.set_important(mask)  # wrong length now


def dense_bytes(k):
    return 2 * k.numel() * k.element_size()


def test_mixed_precision_generate(llama):
    model, inputs = llama
    ref = _gen(model, inputs)
    full = torch.stack(ref.logits, 1)
    centred = (full - full.mean(-1, keepdim=True)).norm()
    errs = {}
    for frac in (0.0, 0.5):
        cache = MixedPrecisionKVCache(2, 16, group_size=G, residual=RES)
        with torch.no_grad():
            model(**inputs, cache=cache, use_cache=True)
        for i, layer in enumerate(cache.layers):
            k, _ = layer.materialize()
            cache.set_important(i, topk_mask(k.norm(dim=-1), int(frac * 80)))
        # continue decoding teacher-forced through generate on the whole prompt (cache re-filled after a reset)
        errs[frac] = _mixed_decode_error(model, inputs, cache, ref, full, centred)
    assert errs[0.5] < errs[0.0] <= REL_TOL[2]


def _mixed_decode_error(model, inputs, cache, ref, full, centred):
    seq = ref.sequences[:, inputs["input_ids"].shape[1] :]
    mask = inputs["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
    logits = []
    with torch.no_grad():
        for t in range(seq.shape[1] - 1):
            mask = torch.cat([mask, torch.ones_like(seq[:, :1])], 1)
            o = model(input_ids=seq[:, t : t + 1], attention_mask=mask, position_ids=pos + 1 + t, cache=cache)
            logits.append(o.logits[:, -1])
    got = torch.stack(logits, 1)
    assert torch.isfinite(got).all()
    return float((got - full[:, 1:]).norm() / centred)


# ------------------------------------------------------------------------------------------------------ accounting
@pytest.mark.parametrize("bits", [2, 4])
def test_nbytes_matches_hand_count(bits):
    """1000 fp16 entries, head dim 128, group 32, residual 32: codes + fp16 scales / zeros + the exact window."""
    b, h, n, d, g, r = 1, 2, 1000, 128, 32, 32
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(b, h, n, d, generator=gen).half()
    v = torch.randn(b, h, n, d, generator=gen).half()
    cache = QuantizedKVCache(bits, group_size=g, residual=r)
    cache.update(k, v, 0)
    cache.flush()
    n_q = (n - r) // g * g  # 960 quantized, 40 at full precision
    n_fp = n - n_q
    codes = 2 * b * h * n_q * d * bits // 8
    key_stats = b * h * (n_q // g) * d * 2 * 2  # scale + zero, fp16
    value_stats = b * h * n_q * math.ceil(d / g) * 2 * 2
    window = 2 * b * h * n_fp * d * 2
    assert nbytes(cache) == codes + key_stats + value_stats + window
    assert dense_nbytes(cache) == 2 * b * h * n * d * 2 == nbytes(DynamicCache(ddp_cache_data=[(k, v)]))
    ratio = nbytes(cache) / dense_nbytes(cache)
    assert ratio <= {2: 0.25, 4: 0.35}[bits]  # 2 bits: 0.220, 4 bits: 0.340
    assert entries(cache) == [n] and layer_stats(cache)[0] == {
        "entries": n,
        "bytes": nbytes(cache),
        "quantized": n_q,
        "full_precision": n_fp,
    }


# ------------------------------------------------------------------------------------------------------ arguments
def test_bad_arguments_say_what_is_allowed():
    with pytest.raises(ValueError, match="allowed: 2, 4, 8, 16"):
        QuantizedKVCache(3)
    with pytest.raises(ValueError, match="allowed: 2, 4, 8, 16"):
        QuantizedKVLayer(bits=True)
    with pytest.raises(ValueError, match="residual.*>= 0"):
        QuantizedKVCache(4, residual=-1)
    with pytest.raises(ValueError, match="group_size.*>= 1"):
        QuantizedKVCache(4, group_size=0)
    with pytest.raises(ValueError, match="float16, torch.float32"):
        QuantizedKVCache(4, stats_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="high_bits.*allowed: 8, 16"):
        MixedPrecisionKVCache(2, high_bits=4)
    with pytest.raises(ValueError, match="allowed: 2, 4"):
        MixedPrecisionKVCache(8)
    with pytest.raises(ValueError, match="prefill"):
        QuantizedKVLayer().keep(torch.zeros(1, 1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="allowed: 2, 4, 8"):
        pack(torch.zeros(4, dtype=torch.uint8), 16)
