"""Streaming video Q&A: bounded memory over a long stream, frame cache, answers at any time, clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

import vlm_accel

import oracle
import tiny


@pytest.fixture(scope="module")
def default_like():
    return tiny.build_default_like()


def frame(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (60, 80, 3), dtype=np.uint8))


def test_memory_bound_holds_over_500_frames(default_like):
    model, processor = default_like
    bound = 200
    with vlm_accel.stream(model, processor, budget=16, max_tokens=bound) as s:
        for i in range(500):
            s.add_frame(frame(i // 5), t=i / 10)  # the view changes every 5 frames
            assert s.tokens_held <= bound
            if i in (7, 499):
                assert isinstance(s.ask("what color is the circle?", max_new_tokens=2), str)
        st = s.stats
        assert st.frames_seen == 500 and st.frames_encoded == 100  # unchanged frames are not encoded again
        assert st.frames_held == bound // 16 and st.evicted + st.merged == 100 - bound // 16
        feature_bytes = bound * model.config.text_config.hidden_size * 4
        assert s.bytes_held <= feature_bytes + 3 * 224 * 224 * 4  # features + the one cached frame
        assert s.entries[-1].t_end == pytest.approx(49.9)
    assert not hasattr(model, "_vlm_accel_session")  # closing restored the model


def test_redundant_frames_fold_instead_of_evicting(default_like):
    model, processor = default_like
    with vlm_accel.stream(model, processor, budget=16, max_tokens=32, frame_cache=None) as s:
        a = frame(1)
        s.add_frame(frame(0), t=0)
        s.add_frame(a, t=1)
        s.add_frame(a, t=2)  # frame cache off: encoded again, identical features -> folded into the previous one
        assert s.stats.merged == 1 and s.stats.evicted == 0
        assert [(e.t_start, e.t_end, e.frames) for e in s.entries] == [(0, 0, 1), (1, 2, 2)]


def test_ask_matches_the_model_on_the_same_tokens(default_like):
    """The answer equals running the model on the held tokens directly (frames-as-images)."""
    model, processor = default_like
    with vlm_accel.stream(model, processor, budget=1.0, max_tokens=10_000) as s:
        s.add_frame(frame(3))
        answer = s.ask("how many shapes are there?", max_new_tokens=3)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many shapes are there?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=frame(3), text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert answer == processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_stream_errors(default_like):
    model, processor = default_like
    with pytest.raises(TypeError, match="Qwen2VLForConditionalGeneration"):
        vlm_accel.stream(torch.nn.Linear(2, 2), processor)
    with pytest.raises(ValueError, match="max_tokens"):
        vlm_accel.stream(model, processor, max_tokens=0)
    with vlm_accel.stream(model, processor) as s:
        with pytest.raises(ValueError, match="no frames"):
            s.ask("what?")
        with pytest.raises(ValueError, match="not found"):
            s.add_frame("/no/such/frame.png")


def _qwen_frames(seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((16, 24), (24, 16))]


def _as_images(model, proc, frames, question: str) -> dict:
    """The frames passed to the unpatched model as images of one prompt, each image pad expanded to the image's
    token count (as the family's processor does; OneVision: every frame encoded as a single anyres image)."""
    content = [{"type": "image"} for _ in frames] + [{"type": "text", "text": question}]
    ids = proc.tokenizer(proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
    vis = [proc.image_processor(images=f, return_tensors="pt") for f in frames]
    out = {"pixel_values": torch.cat([v["pixel_values"] for v in vis])}
    if "image_grid_thw" in vis[0]:
        out["image_grid_thw"] = torch.cat([v["image_grid_thw"] for v in vis])
        counts = (out["image_grid_thw"].prod(-1) // 4).tolist()
    else:
        out["image_sizes"] = torch.cat([v["image_sizes"] for v in vis])
        if "batch_num_images" in vis[0]:
            out["batch_num_images"] = torch.ones(len(frames), dtype=torch.long)
        with torch.no_grad():
            feats = model.model.get_image_features(**out).pooler_output
        counts = [f.shape[0] for f in feats]
    counts, full = iter(counts), []
    for t in ids["input_ids"]:
        full += [t] * next(counts) if t == tiny.IMAGE_ID else [t]
    input_ids = torch.tensor([full])
    out.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    if "image_grid_thw" in out:
        out["mm_token_type_ids"] = (input_ids == tiny.IMAGE_ID).long()
    return out


def _check_full_budget(model, proc, frames, q: str) -> dict:
    """At full budget the stream's prefill logits and greedy answer are the unpatched model's on the frames as images;
    returns those full inputs."""
    full = _as_images(model, proc, frames, q)
    with torch.no_grad():
        ref_logits = model(**full).logits
        ref_gen = model.generate(**full, max_new_tokens=3, do_sample=False)[0, full["input_ids"].shape[1] :]
    with vlm_accel.stream(model, proc, budget=1.0, max_tokens=10_000, frame_cache=None) as s:
        for f in frames:
            s.add_frame(f)
        logits = s.logits(q)
        answer = s.ask(q, max_new_tokens=3)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert answer == proc.decode(ref_gen, skip_special_tokens=True).strip()
    return full


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_stream_equals_frames_as_images(models, family):
    """Full budget: streaming LLaVA-NeXT / OneVision = the unpatched model on the frames as (anyres) images."""
    model, proc, q = models(family), tiny.stream_processor(family), "w5 w6 w9"
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (60, 100, 3), dtype=np.uint8)) for _ in range(2)]
    full = _check_full_budget(model, proc, frames, q)
    with vlm_accel.stream(model, proc, budget=8, max_tokens=10_000) as s:
        s.add_frame(frames[0])
        assert s.tokens_held < full["input_ids"].shape[1] // 2 and isinstance(s.ask(q, max_new_tokens=2), str)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_stream_equals_frames_as_images(models, family):
    """Full budget: streaming a Qwen model = the unpatched model on the frames as images (logits, greedy answer).
    Pruned: = the unpatched LM on the kept tokens at their original M-RoPE positions."""
    model, proc, q = models(family), tiny.stream_processor(), "w5 w6 w9"
    frames = _qwen_frames(0)
    full = _check_full_budget(model, proc, frames, q)

    lm_in = oracle.lm_inputs(model, full)
    with vlm_accel.stream(model, proc, budget=0.5, method="divprune", max_tokens=10_000, frame_cache=None) as s:
        for f in frames:
            s.add_frame(f)
        logits = s.logits(q)
        runs = (full["input_ids"][0] == tiny.IMAGE_ID).nonzero()[:, 0]
        starts = [int(runs[0])] + [int(b) for a, b in zip(runs[:-1], runs[1:], strict=True) if b != a + 1]
        text = (full["input_ids"][0] != tiny.IMAGE_ID).nonzero()[:, 0]
        kept = torch.cat([text] + [st + e.index for st, e in zip(starts, s.entries, strict=True)]).sort().values
    assert kept.numel() < full["input_ids"].shape[1]
    pos = lm_in["position_ids"]
    pos = pos[1:] if pos.shape[0] == 4 else pos  # the 3 M-RoPE axes (newer transformers prepend text positions)
    index = kept[None]
    valid = torch.ones_like(index, dtype=torch.bool)
    embeds, pos = oracle.take(lm_in["inputs_embeds"], index), oracle.take(pos, index)
    ref = oracle.run_lm(model, embeds, pos, torch.ones_like(index), lm_in, index, valid)  # Qwen3: deepstack in step
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


def test_qwen_stream_memory_bound(models):
    model, proc = models("qwen2_vl"), tiny.stream_processor()
    with vlm_accel.stream(model, proc, budget=6, max_tokens=20) as s:
        for i in range(30):
            s.add_frame(_qwen_frames(i // 3)[0], t=i)  # the view changes every 3 frames
            assert s.tokens_held <= 20
        assert s.stats.frames_encoded == 10 and s.stats.frames_held == 3
        assert all(e.index.numel() == e.features.shape[0] == 6 for e in s.entries)
        assert isinstance(s.ask("w5 w6", max_new_tokens=2), str)
    assert not hasattr(model, "_vlm_accel_session")


def test_stream_used_after_close_or_takeover_says_so(default_like):
    """A stream whose session was closed, or taken over by another stream / accelerate, raises a RuntimeError that
    says what happened (it used to fail with ``KeyError: 'image'``)."""
    model, processor = default_like
    s = vlm_accel.stream(model, processor, budget=8)
    s.add_frame(frame(0))
    s.close()
    assert s.closed
    with pytest.raises(RuntimeError, match="closed"):
        s.add_frame(frame(1))
    with pytest.raises(RuntimeError, match="closed"):
        s.ask("what color is the circle?")
    s.close()  # closing twice is harmless

    first = vlm_accel.stream(model, processor, budget=8)
    first.add_frame(frame(0))
    with vlm_accel.stream(model, processor, budget=8) as second:
        with pytest.raises(RuntimeError, match="another"):
            first.add_frame(frame(1))
        second.add_frame(frame(2))  # the new stream works
        assert second.tokens_held == 8
    first.close()

    third = vlm_accel.stream(model, processor, budget=8)
    with vlm_accel.accelerate(model, budget=0.5):
        with pytest.raises(RuntimeError, match="another"):
            third.ask("what color is the circle?")
    third.close()
    assert not hasattr(model, "_vlm_accel_session")


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.random.default_rng(0).random((60, 80, 3)), "uint8"),  # float in [0, 1]
        (np.zeros((3, 60, 80), np.uint8), "channel-first"),
        (torch.zeros(3, 60, 80, dtype=torch.uint8), "channel-first"),
        (torch.rand(60, 80, 3), "uint8"),
    ],
)
def test_stream_frame_arrays_must_be_uint8_hwc(default_like, bad, match):
    model, processor = default_like
    with vlm_accel.stream(model, processor, budget=8) as s:
        with pytest.raises(ValueError, match=match):
            s.add_frame(bad)
        s.add_frame(torch.zeros(60, 80, 3, dtype=torch.uint8))  # an [H, W, 3] uint8 tensor is a frame
        assert s.stats.frames_encoded == 1


def test_stream_question_past_the_context_names_both_lengths(default_like):
    model, processor = default_like
    context = model.config.text_config.max_position_embeddings
    with vlm_accel.stream(model, processor, budget=8) as s:
        s.add_frame(frame(0))
        with pytest.raises(ValueError, match=rf"prompt is \d+ tokens.*context is {context} positions"):
            s.ask("red " * (context + 10))
