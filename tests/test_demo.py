"""The demo's handlers on the embedded model (no Gradio needed), and the app when Gradio is installed.

The video tab has two paths: an image-only model gets the frames streamed as images, a model with a video input
(LLaVA-OneVision) gets the clip through it. Both are tested on tiny models shaped like the default (random weights),
and the embedded default (either kind) on the same checks."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_zoo import image_views, kept_tokens

from vlm_accel import zoo
from vlm_accel.demo import Demo, build_app, dim_dropped

import tiny


def tiny_onevision(seed: int = 0):
    """A tiny random ``LlavaOnevisionForConditionalGeneration`` shaped like the default's OneVision form (DINOv2 at
    224 px / 14 px patches: 256 base-view tokens per image, 64 per frame), with its real processor."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from vlm_accel.zoo import onevision

    llava, _ = tiny.build_default_like(seed)
    processor = onevision.build_processor()
    cfg = onevision.build_config(llava.config, processor.tokenizer)
    cfg.text_config.vocab_size = len(processor.tokenizer)
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(cfg).eval(), processor


@pytest.fixture(scope="module")
def demo():
    return Demo(*zoo.load_default(), max_new_tokens=4)


@pytest.fixture(scope="module")
def image_only_demo():
    return Demo(*tiny.build_default_like(), max_new_tokens=4)


@pytest.fixture(scope="module")
def video_input_demo():
    return Demo(*tiny_onevision(), max_new_tokens=4)


@pytest.fixture(scope="module", params=["default", "image_only", "video_input"])
def any_demo(request):
    """The embedded default, a tiny image-only model (frames streamed as images) and a tiny model with a video
    input (the clip through it)."""
    return request.getfixturevalue("demo" if request.param == "default" else f"{request.param}_demo")


def _video_token_id(config):
    token = getattr(config, "video_token_id", None)
    return getattr(config, "video_token_index", None) if token is None else token


def frame_tokens(model, processor, frames: int = 4) -> tuple[int, int]:
    """``(tokens per frame, placeholders of a clip of frames)`` before any reduction, from the processed prompt:
    through a video input, its placeholders over the frames (a structural newline aside); for an image-only model,
    one image's placeholders per frame."""
    frame = Image.new("RGB", (96, 64), (90, 30, 200))
    if zoo.has_video_input(model, processor):
        prompt = zoo.build_prompt(processor, "What color is the shape?", "video")
        inputs = processor(videos=[[frame] * frames], text=prompt, return_tensors="pt")
        n = int((inputs["input_ids"] == _video_token_id(model.config)).sum())
        return n // frames, n
    n, _ = image_views(model, processor, frame)
    return n, n * frames


def test_answer_image_full_vs_accelerated(demo):
    s = zoo.samples()[0]
    full, fast, overlay, info = demo.answer_image(s["path"], s["question"], budget=0.33, method="visionzip")
    assert full == fast == s["answer"]
    n, views = image_views(demo.model, demo.processor, zoo.load_image(s["path"]))
    assert info["visual tokens"] == f"{kept_tokens(0.33, n, views)} of {n}" and info["method"] == "visionzip"
    image = zoo.load_image(s["path"])
    assert overlay.size == image.size
    dimmed = np.asarray(overlay, dtype=np.int32).sum(-1) < np.asarray(image, dtype=np.int32).sum(-1)
    assert 0.5 < dimmed.mean() < 0.8  # about two thirds of the patches were dropped


def test_dim_dropped_marks_exactly_the_dropped_cells():
    image = Image.new("RGB", (40, 20), (200, 200, 200))
    out = np.asarray(dim_dropped(image, torch.tensor([0, 3]), (2, 4)))
    assert out[5, 5].tolist() == out[5, 35].tolist() == [200, 200, 200]  # cells 0 and 3 (first row) kept
    assert out[15, 5].tolist() == out[15, 35].tolist() == out[5, 15].tolist() == [50, 50, 50]  # the rest dimmed


def test_anyres_overlay_dims_the_base_views_dropped_tokens(video_input_demo):
    """An anyres image (OneVision): the overlay dims the base view's dropped tokens (the whole image at the tower's
    224 px), about two thirds of them at a third of the tokens."""
    d = video_input_demo
    s = zoo.samples()[0]
    image = zoo.load_image(s["path"])
    _, _, overlay, info = d.answer_image(image, s["question"], budget=0.33, method="visionzip")
    n, views = image_views(d.model, d.processor, image)
    assert len(views) == 2 and info["visual tokens"] == f"{kept_tokens(0.33, n, views)} of {n}"
    pixels, out = np.asarray(image, dtype=np.int32), np.asarray(overlay, dtype=np.int32)
    assert overlay.size == image.size
    assert np.all((out == pixels) | (out == (pixels * 0.25).astype(np.int32)))  # kept as is, or dimmed
    assert 0.5 < (out.sum(-1) < pixels.sum(-1)).mean() < 0.8


def test_answer_video(any_demo, tmp_path):
    """Four frames at 16 tokens each: every frame's kept tokens in the gallery; the image-only path holds 16 per
    frame in its stream, the video input keeps 16 of each frame's tokens of the clip's placeholders."""
    pytest.importorskip("av")
    from vlm_accel.zoo.clips import write_clips

    d = any_demo
    write_clips(tmp_path, n=1, frames=6)
    answer, info, gallery = d.answer_video(tmp_path / "clip_0000.mp4", "What color is the shape?", budget=16, frames=4)
    assert isinstance(answer, str)
    assert info["frames sampled"] == 4 == info["frames encoded"] + info["frames reused (frame cache)"]
    per_frame, n_clip = frame_tokens(d.model, d.processor, frames=4)
    assert per_frame > 16
    assert len(gallery) == 4 and all(caption.endswith("16 tokens kept") for _, caption in gallery)
    if zoo.has_video_input(d.model, d.processor):
        assert info["input"] == "the model's video input" and info["visual tokens"] == f"{4 * 16} of {n_clip}"
    else:
        assert info["visual tokens held"] == 16 * info["frames held"]


def test_answer_video_marks_frames_reused_from_the_frame_cache(any_demo):
    """The bundled clip holds three scenes for 3, 2 and 3 frames: 3 frames are encoded, the other 5 reused; the
    gallery dims the dropped tokens of encoded frames and frames the reused ones in orange."""
    pytest.importorskip("av")
    from vlm_accel.demo import SAMPLE_VIDEO
    from vlm_accel.video import load

    d = any_demo
    answer, info, gallery = d.answer_video(SAMPLE_VIDEO, "What color is the shape?", budget=0.25, frames=8)
    assert info["frames encoded"] == 3 and info["frames reused (frame cache)"] == 5
    captions = [c for _, c in gallery]
    reused = [i for i, c in enumerate(captions) if "reused" in c]
    assert reused == [1, 2, 4, 6, 7]
    per_frame, _ = frame_tokens(d.model, d.processor)
    kept = f"{round(0.25 * per_frame)} tokens kept"
    assert all(c.endswith(kept) for i, c in enumerate(captions) if i not in reused)
    first, second = (np.asarray(im) for im, _ in gallery[:2])
    assert first[0, 0].tolist() != [255, 140, 0] and second[0, 0].tolist() == [255, 140, 0]
    frame = load(SAMPLE_VIDEO, num_frames=8).frames[0].astype(np.int32)
    shown = first.astype(np.int32)
    assert np.all((shown == frame) | (shown == (frame * 0.25).astype(np.int32)))  # kept as is, or dimmed
    assert (shown != frame).any()


def test_video_input_gallery_shows_each_frames_kept_tokens(video_input_demo):
    """Through the video input the gallery's per-frame counts are what the language model kept of each frame: they
    add up to the clip's kept tokens (the newline dropped with the pruned tokens), a frame reused from the frame
    cache keeps its share, and a clip-wide method (``temporal``) spends its budget unevenly across frames."""
    pytest.importorskip("av")
    from vlm_accel.demo import SAMPLE_VIDEO
    from vlm_accel.video import load

    d = video_input_demo
    per_frame, n_clip = frame_tokens(d.model, d.processor, frames=8)
    for method in ("visionzip", "temporal"):
        _, info, gallery = d.answer_video(SAMPLE_VIDEO, "What color is the shape?", budget=0.25, method=method)
        counts = [int(c.split(", ")[-1].split(": ")[-1].split()[0]) for _, c in gallery]
        kept, total = (int(v) for v in info["visual tokens"].split(" of "))
        assert total == n_clip and sum(counts) == kept
        if method == "visionzip":
            assert counts == [round(0.25 * per_frame)] * 8
            first, second = (np.asarray(im)[4:-4, 4:-4] for im, _ in gallery[:2])
            assert np.array_equal(first, second)  # frame 2 reuses frame 1's features: the same tokens kept (dimmed)
        else:  # one quota for the clip, spent where frames differ (runs of static tokens merge)
            assert kept == round(0.25 * 8 * per_frame) and len(set(counts)) > 1
    _, info, gallery = d.answer_video(SAMPLE_VIDEO, "What color is the shape?", budget=1.0)
    assert info["visual tokens"] == f"{n_clip} of {n_clip}" and info["frames encoded"] == 3
    frames = load(SAMPLE_VIDEO, num_frames=8).frames  # every token kept: the frames as they are (orange border aside)
    assert all(
        np.array_equal(np.asarray(im)[8:-8, 8:-8], f[8:-8, 8:-8]) for (im, _), f in zip(gallery, frames, strict=True)
    )


def test_timing_table_and_localhost_binding(demo):
    from vlm_accel.demo import TABLE_HEADERS, launch_options

    s = zoo.samples()[0]
    full, fast, _, _ = demo.answer_image(s["path"], s["question"], budget=0.11, method="divprune")
    table = demo.last_table
    assert [row[0] for row in table] == ["all tokens", "accelerated"] and len(table[0]) == len(TABLE_HEADERS)
    n, views = image_views(demo.model, demo.processor, zoo.load_image(s["path"]))
    assert [row[1] for row in table] == [full, fast] and [row[2] for row in table] == [n, kept_tokens(0.11, n, views)]
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


def test_bad_uploads_show_the_demos_message(tmp_path):
    """A text file named .png and a 0-byte .png: the demo's own message, not Gradio's generic error (#28.5); a
    fractional frame count is refused, not truncated."""
    gr = pytest.importorskip("gradio")
    from gradio.data_classes import ImageData

    from vlm_accel.demo import checked_image

    image = checked_image(gr, type="pil")
    for name, data in (("notes.png", b"just text"), ("empty.png", b"")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(gr.Error, match=f"{name}: not a readable image file"):
            image.preprocess(ImageData(path=str(path), orig_name=name))
    good = image.preprocess(ImageData(path=str(zoo.samples("image")[0]["path"]), orig_name="sample.png"))
    assert good.size[0] > 0
    with pytest.raises(ValueError, match="frames must be a whole number"):
        Demo(None, None).answer_video("clip.mp4", "q", frames=2.5)
