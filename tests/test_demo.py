"""The demo's handlers on the embedded model (no Gradio needed), and the app when Gradio is installed."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_accel import zoo
from vlm_accel.demo import Demo, build_app, dim_dropped


@pytest.fixture(scope="module")
def demo():
    return Demo(*zoo.load_default(), max_new_tokens=4)


def test_answer_image_full_vs_accelerated(demo):
    s = zoo.samples()[0]
    full, fast, overlay, info = demo.answer_image(s["path"], s["question"], budget=0.33, method="visionzip")
    assert full == fast == s["answer"]
    assert info["visual tokens"] == "84 of 256" and info["method"] == "visionzip"
    image = zoo.load_image(s["path"])
    assert overlay.size == image.size
    dimmed = np.asarray(overlay, dtype=np.int32).sum(-1) < np.asarray(image, dtype=np.int32).sum(-1)
    assert 0.5 < dimmed.mean() < 0.8  # about two thirds of the patches were dropped


def test_dim_dropped_marks_exactly_the_dropped_cells():
    image = Image.new("RGB", (40, 20), (200, 200, 200))
    out = np.asarray(dim_dropped(image, torch.tensor([0, 3]), (2, 4)))
    assert out[5, 5].tolist() == out[5, 35].tolist() == [200, 200, 200]  # cells 0 and 3 (first row) kept
    assert out[15, 5].tolist() == out[15, 35].tolist() == out[5, 15].tolist() == [50, 50, 50]  # the rest dimmed


def test_answer_video(demo, tmp_path):
    pytest.importorskip("av")
    from vlm_accel.video.synthetic import write_clips

    write_clips(tmp_path, n=1, frames=6)
    answer, info = demo.answer_video(tmp_path / "clip_0000.mp4", "What color is the shape?", budget=16, frames=4)
    assert isinstance(answer, str) and answer
    assert info["frames sampled"] == 4 and info["visual tokens held"] == 16 * info["frames held"]


def test_app_builds(demo):
    gr = pytest.importorskip("gradio")
    assert isinstance(build_app(demo), gr.Blocks)


def test_answer_image_refuses_float_arrays_and_overlong_questions(demo):
    """Clear ValueErrors (the app shows them as messages): a float array is not an image, and a question past the
    model's context names both lengths instead of answering wrongly."""
    with pytest.raises(ValueError, match="uint8"):
        demo.answer_image(np.random.default_rng(0).random((64, 64, 3)), "What color is the circle?")
    s = zoo.samples()[0]
    with pytest.raises(ValueError, match="context is 1024 positions"):
        demo.answer_image(s["path"], "Is there a red circle? " * 400)
