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
    answer, info, gallery = demo.answer_video(
        tmp_path / "clip_0000.mp4", "What color is the shape?", budget=16, frames=4
    )
    assert isinstance(answer, str) and answer
    assert info["frames sampled"] == 4 and info["visual tokens held"] == 16 * info["frames held"]
    assert len(gallery) == 4 and all(caption.endswith("16 tokens kept") for _, caption in gallery)


def test_answer_video_marks_frames_reused_from_the_frame_cache(demo):
    """The bundled clip holds three scenes for 3, 2 and 3 frames: 3 frames are encoded, the other 5 reused; the
    gallery dims the dropped tokens of encoded frames and frames the reused ones in orange."""
    pytest.importorskip("av")
    from vlm_accel.demo import SAMPLE_VIDEO

    answer, info, gallery = demo.answer_video(SAMPLE_VIDEO, "What color is the shape?", budget=0.25, frames=8)
    assert info["frames encoded"] == 3 and info["frames reused (frame cache)"] == 5
    captions = [c for _, c in gallery]
    reused = [i for i, c in enumerate(captions) if "reused" in c]
    assert reused == [1, 2, 4, 6, 7]
    assert all(c.endswith("64 tokens kept") for i, c in enumerate(captions) if i not in reused)
    first, second = (np.asarray(im) for im, _ in gallery[:2])
    assert first[0, 0].tolist() != [255, 140, 0] and second[0, 0].tolist() == [255, 140, 0]


def test_timing_table_and_localhost_binding(demo):
    from vlm_accel.demo import TABLE_HEADERS, launch_options

    s = zoo.samples()[0]
    full, fast, _, _ = demo.answer_image(s["path"], s["question"], budget=0.11, method="divprune")
    table = demo.last_table
    assert [row[0] for row in table] == ["all tokens", "accelerated"] and len(table[0]) == len(TABLE_HEADERS)
    assert [row[1] for row in table] == [full, fast] and [row[2] for row in table] == [256, 28]
    assert launch_options()["server_name"] == "127.0.0.1"
    assert launch_options(host="0.0.0.0", port=9000)["server_name"] == "0.0.0.0"
    assert launch_options(share=True)["server_name"] == "127.0.0.1"


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
