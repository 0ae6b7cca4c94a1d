"""Streaming video Q&A: bounded memory over a long stream, frame cache, answers at any time, clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

import vlm_accel

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


def test_stream_errors(default_like, models):
    model, processor = default_like
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        vlm_accel.stream(models("qwen2_vl"), processor)
    with pytest.raises(ValueError, match="max_tokens"):
        vlm_accel.stream(model, processor, max_tokens=0)
    with vlm_accel.stream(model, processor) as s:
        with pytest.raises(ValueError, match="no frames"):
            s.ask("what?")
        with pytest.raises(ValueError, match="not found"):
            s.add_frame("/no/such/frame.png")
