"""The embedded default VLM: offline loading, the standard processor flow, fixed held-out answers, renderer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlm_accel import zoo
from vlm_accel.zoo import render

HAVE_WEIGHTS = (zoo.DEFAULT_DIR / "model.safetensors").is_file()
needs_weights = pytest.mark.usefixtures("default_model")  # committed weights: a missing file fails, not skips


def test_weights_are_packaged():
    assert HAVE_WEIGHTS, f"{zoo.DEFAULT_DIR / 'model.safetensors'} is missing"


# (held-out seed, index in heldout(n, seed)): two fixed samples per question type (shape, color, exists, count, side)
# that the shipped weights answer correctly — a regression test, not the accuracy measurement (see zoo/README.md)
FIXED = [(0, 0), (0, 5), (0, 1), (0, 11), (0, 2), (0, 7), (0, 3), (0, 8), (0, 4), (0, 9)]


@pytest.fixture(scope="module")
def default_model():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return zoo.load_default()


def test_normalize_answer():
    assert zoo.normalize_answer(" Two. ") == "2"
    assert zoo.normalize_answer("The RED") == "red"
    assert zoo.normalize_answer("grey!") == "gray"
    assert zoo.normalize_answer("Yes.") == "yes"
    assert zoo.normalize_answer("4") == "4"


def test_render_deterministic_and_split_disjoint():
    a, b = zoo.render_scene(7), zoo.render_scene(7)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert [o.name for o in a.objects] == [o.name for o in b.objects]
    c = zoo.render_scene(7, "heldout")
    assert not (a.image.size == c.image.size and np.array_equal(np.asarray(a.image), np.asarray(c.image)))
    for s in range(20):
        sc = zoo.render_scene(s)
        assert 224 <= min(sc.image.size) and max(sc.image.size) <= 448
        assert 1 <= len(sc.objects) <= 4
        assert sc.patch_labels.shape == (16, 16)


def test_heldout_balanced_and_valid():
    items = list(zoo.heldout(25, seed=3))
    assert len(items) == 25
    types = [it["type"] for it in items]
    assert {t: types.count(t) for t in render.QTYPES} == dict.fromkeys(render.QTYPES, 5)
    for it in items:
        a = it["answer"]
        if it["type"] == "shape":
            assert a in render.SHAPES
        elif it["type"] == "color":
            assert a in render.COLOR_NAMES
        elif it["type"] == "exists":
            assert a in ("yes", "no")
        elif it["type"] == "count":
            assert a in ("1", "2", "3", "4")
        else:
            assert a in ("left", "right")
    again = list(zoo.heldout(25, seed=3))
    assert [(x["question"], x["answer"]) for x in again] == [(x["question"], x["answer"]) for x in items]


@needs_weights
def test_standard_flow_offline(default_model):
    model, processor = default_model
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(processor, LlavaProcessor)
    assert model.config.vision_config.model_type == "dinov2"
    img = zoo.render_scene(0, "heldout").image
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes are there?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=img, text=prompt, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 256  # ≥ 196 visual tokens
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    ans = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert zoo.normalize_answer(ans) == str(len(zoo.render_scene(0, "heldout").objects))


@needs_weights
def test_no_center_crop():
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(zoo.DEFAULT_DIR, local_files_only=True)
    assert not getattr(proc.image_processor, "do_center_crop", False)


@needs_weights
def test_fixed_heldout_answers(default_model):
    model, processor = default_model
    by_seed: dict[int, list] = {}
    for seed, _i in FIXED:
        by_seed.setdefault(seed, list(zoo.heldout(12, seed)))
    wrong = []
    for seed, i in FIXED:
        it = by_seed[seed][i]
        pred = zoo.ask(model, processor, it["image"], it["question"])
        if zoo.normalize_answer(pred) != zoo.normalize_answer(it["answer"]):
            wrong.append((it["question"], it["answer"], pred))
    assert not wrong, wrong


@needs_weights
def test_bundled_samples(default_model):
    model, processor = default_model
    for s in zoo.samples():
        assert zoo.normalize_answer(zoo.ask(model, processor, s["path"], s["question"])) == s["answer"]


@needs_weights
def test_ask_bad_image(default_model, tmp_path):
    model, processor = default_model
    with pytest.raises(ValueError, match="not found"):
        zoo.ask(model, processor, tmp_path / "missing.png", "What shape is in the image?")
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        zoo.ask(model, processor, bad, "What shape is in the image?")


@needs_weights
@pytest.mark.parametrize("budget,kept", [(0.33, 84), (0.11, 28), (64, 64), (1.0, 256)])
def test_accelerate_keeps_promised_tokens(default_model, budget, kept):
    """accelerate() on the embedded model keeps exactly the budgeted tokens, still answers the bundled samples at a
    third of the tokens, and restores exactly."""
    import vlm_accel

    model, processor = default_model
    item = zoo.samples()[0]
    for method in vlm_accel.methods():
        with vlm_accel.accelerate(model, budget=budget, method=method) as sess:
            answer = zoo.ask(model, processor, item["path"], item["question"])
        assert sess.stats.visual_tokens_in == 256
        assert sess.stats.visual_tokens_kept == kept
        if budget == 0.33 and method in ("visionzip", "divprune"):
            assert zoo.normalize_answer(answer) == zoo.normalize_answer(item["answer"])
    assert zoo.normalize_answer(zoo.ask(model, processor, item["path"], item["question"])) == item["answer"]
