"""Per-patch frame cache (LLaVA-OneVision video, LLaVA-family towers): exact at threshold 0, partial frames equal a
plainly written reference, the full tower when every patch is recomputed, stats, restore and refusals."""

import pytest
import torch

import vlm_accel
from vlm_accel.adapters import adapter_for
from vlm_accel.adapters.base import encoder_layers
from vlm_accel.tower.patch_cache import PatchCache, patch_diff

import tiny


def _clip(model, edits=()):
    """A static 4-frame clip ``[1, 4, 3, 56, 56]`` with ``edits``: ``(frame, rows, cols, delta)`` pixel changes."""
    pv = tiny.make_video_inputs(model, "llava_onevision", batch=1, frames=4, static=True)["pixel_values_videos"]
    pv = pv.clone()
    for f, rows, cols, delta in edits:
        pv[0, f, :, rows, cols] += delta
    return pv


def _features(model, pv, cache=None):
    with torch.no_grad():
        if cache is None:
            return model.model.get_video_features(pixel_values_videos=pv).pooler_output
        with PatchCache.attach(model, **cache) as c:
            out = model.model.get_video_features(pixel_values_videos=pv).pooler_output
        return out, c.stats


def test_threshold_zero_changes_nothing(models):
    model = models("llava_onevision")
    static = _clip(model)
    edited = _clip(model, [(2, slice(0, 7), slice(0, 14), 1.0)])  # two patches of frame 2 changed
    for pv, encoded in [(static, 1), (edited, 3)]:  # frame 3 equals frame 0, not the key frame 2
        out, stats = _features(model, pv, {"threshold": 0.0})
        assert torch.equal(out, _features(model, pv))  # bit-identical features
        assert (stats.frames_in, stats.frames_encoded, stats.frames_partial) == (4, encoded, 0)
        assert (stats.patches_in, stats.patches_encoded) == (4 * 64, encoded * 64)
    assert "get_video_features" not in vars(model.model)  # restored


def test_every_patch_recomputed_is_the_full_tower(models):
    """A partial frame whose patches all changed attends only to its own keys / values: the full tower's output."""
    model = models("llava_onevision")
    pv = _clip(model, [(1, slice(None), slice(None), 1.0)])
    out, stats = _features(model, pv, {"threshold": 0.01, "max_changed": 1.0})
    assert (stats.frames_encoded, stats.frames_partial, stats.patches_encoded) == (2, 1, 128)
    torch.testing.assert_close(out, _features(model, pv), rtol=1e-5, atol=1e-6)


def _plain_partial(layers, x_new, key_states, changed):
    """The partial frame written plainly: per layer, per head, the changed tokens' queries over keys / values that
    are the key frame's at unchanged positions and the frame's own at changed ones; other tokens copy the key frame's
    layer output (SigLIP layers: layer_norm1, self_attn, layer_norm2, mlp)."""
    x = x_new.clone()
    for layer, (k_key, v_key, out_key) in zip(layers, key_states, strict=True):
        attn = layer.self_attn
        t, c = x.shape
        hd = attn.head_dim
        h = layer.layer_norm1(x[changed])
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        keys, values = k_key.clone(), v_key.clone()
        for row, pos in enumerate(changed.tolist()):
            keys[pos], values[pos] = k[row], v[row]
        heads = []
        for i in range(c // hd):
            sl = slice(i * hd, (i + 1) * hd)
            w = (q[:, sl] @ keys[:, sl].T * hd**-0.5).softmax(-1)
            heads.append(w @ values[:, sl])
        y = x[changed] + attn.out_proj(torch.cat(heads, -1))
        y = y + layer.mlp(layer.layer_norm2(y))
        x = out_key.clone()
        x[changed] = y
    return x


def test_partial_frame_equals_plain_reference(models):
    model = models("llava_onevision")
    pv = _clip(model, [(2, slice(7, 14), slice(21, 35), 0.7)])  # frame 2: patches (1, 3) and (1, 4) of 8 x 8
    tower = model.model.vision_tower
    layers = list(encoder_layers(tower))
    last = {}
    hook = layers[-1].register_forward_hook(lambda m, a, o: last.update(out=o))
    out, stats = _features(model, pv, {"threshold": 0.01})
    hook.remove()
    assert (stats.frames_encoded, stats.frames_partial, stats.patches_encoded) == (2, 1, 64 + 2)
    full = _features(model, pv)
    for f in (0, 1, 3):  # the key frame 0 and its exact repeats: the full tower's features
        assert torch.equal(out[0, 16 * f : 16 * (f + 1)], full[0, 16 * f : 16 * (f + 1)])
    # the reference: key frame 0's per-layer keys / values / outputs, frame 2's embeddings
    states, grab = [], {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, a, o: grab.update(k=o[0])) for layer in layers]
    hooks += [layer.self_attn.v_proj.register_forward_hook(lambda m, a, o: grab.update(v=o[0])) for layer in layers]
    hooks += [
        layer.register_forward_hook(lambda m, a, o: states.append((grab["k"], grab["v"], o[0]))) for layer in layers
    ]
    with torch.no_grad():
        tower(pv[0, :1])
        for h in hooks:
            h.remove()
        ref = _plain_partial(layers, tower.embeddings(pv[0, 2:3])[0], states, torch.tensor([1 * 8 + 3, 1 * 8 + 4]))
    torch.testing.assert_close(last["out"][1], ref, rtol=1e-4, atol=1e-5)  # tower rows: frames 0 and 2
    assert torch.equal(last["out"][1][:11], states[-1][2][:11])  # unchanged tokens: the key frame's output
    assert not torch.allclose(out[0, 32:48], full[0, 32:48])  # an approximation: the features moved a little
    torch.testing.assert_close(out[0, 32:48], full[0, 32:48], rtol=0.1, atol=0.05)


def test_patch_diff_token_order():
    a = torch.zeros(3, 28, 42)
    b = a.clone()
    b[:, 7:14, 7:14] = 3.0  # row 1, column 1 of a 4 x 6 grid of 7-px patches
    d = patch_diff(a, b, 7)
    assert d.shape == (24,) and d.nonzero().view(-1).tolist() == [1 * 6 + 1] and float(d[7]) == 3.0


def test_refusals(models):
    with pytest.raises(ValueError, match="video"):
        PatchCache(adapter_for(models("llava")), 0.1)
    with pytest.raises(ValueError, match="whole-frame"):
        PatchCache(adapter_for(models("qwen2_vl")), 0.1)
    with pytest.raises(ValueError, match="threshold"):
        PatchCache(adapter_for(models("llava_onevision")), -1.0)
    with pytest.raises(ValueError, match="max_changed"):
        PatchCache(adapter_for(models("llava_onevision")), 0.1, max_changed=2.0)


def test_generate_with_patch_cache_and_session_stats(models):
    """Through a whole forward / generate: threshold 0 leaves the logits bit-identical."""
    model = models("llava_onevision")
    inputs = tiny.make_video_inputs(model, "llava_onevision", batch=2, static=True)
    with torch.no_grad():
        ref = model(**inputs).logits
        with PatchCache.attach(model, threshold=0.0) as c:
            assert torch.equal(model(**inputs).logits, ref)
            gen = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert (c.stats.frames_in, c.stats.frames_encoded) == (8, 2)  # one key frame per static clip
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 2
    assert not hasattr(model, "_vlm_accel_session") and vlm_accel is not None


@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_accelerate_with_patch_cache(models, budget):
    """``accelerate(frame_cache=0.0, frame_cache_patches=True)``: the same output as the whole-frame cache (exact at
    threshold 0, with a reduction after it too), and the session's stats count frames and patches."""
    model = models("llava_onevision")
    inputs = tiny.make_video_inputs(model, "llava_onevision", batch=2, static=True)
    with torch.no_grad():
        with vlm_accel.accelerate(model, budget=budget, frame_cache=0.0):
            ref = model(**inputs).logits
        with vlm_accel.accelerate(model, budget=budget, frame_cache=0.0, frame_cache_patches=True) as sess:
            out = model(**inputs).logits
    assert isinstance(sess.frame_cache, PatchCache)
    assert torch.equal(out, ref)
    st = sess.stats
    assert (st.frames_in, st.frames_encoded, st.frames_partial) == (8, 2, 0)
    assert st.patches_in == 8 * st.patches_encoded // 2 > 0  # two key frames encoded in full, six reused


def test_accelerate_patch_cache_needs_frame_cache(models):
    with pytest.raises(ValueError, match="pass frame_cache="):
        vlm_accel.accelerate(models("llava_onevision"), budget=0.5, frame_cache_patches=True)
