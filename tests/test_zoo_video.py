"""The default model's OneVision form (images + videos) and ``zoo.ask`` on every media kind, with its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_accel import zoo
from vlm_accel.video import Video, load
from vlm_accel.zoo import onevision
from vlm_accel.zoo.clips import heldout_clips, write_video

# while the packaged default is the image model, the OneVision form under test is built from it; once the default is
# the trained OneVision model, that model is tested
SHIPS_ONEVISION = onevision.is_onevision(zoo.DEFAULT_DIR)


@pytest.fixture(scope="module")
def image_model():
    """The trained image model the OneVision form is built from (``onevision.from_image_model``'s source: the
    packaged directory, whatever ``VLM_ACCEL_MODEL`` says)."""
    if SHIPS_ONEVISION:
        pytest.skip("the packaged default is the OneVision model: no image model to build its form from")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return zoo.load_default(zoo.DEFAULT_DIR)


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory):
    """The packaged OneVision model's directory, or (while the image model ships) the shipped image weights in the
    OneVision layout, saved as a model directory."""
    if SHIPS_ONEVISION:
        return zoo.DEFAULT_DIR
    model, processor = onevision.from_image_model()
    d = tmp_path_factory.mktemp("ov")
    model.save_pretrained(d)
    onevision.save_processor(processor, d)
    return d


@pytest.fixture(scope="module")
def ov(ov_dir):
    """That directory loaded back the way ``load_default`` loads."""
    return zoo.load_default(ov_dir)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    item = next(heldout_clips(1, seed=5, frames=None))
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    pytest.importorskip("av")
    write_video(path, item["frames"], item["fps"])
    return path, item


def test_onevision_form_keeps_the_image_tokens(ov, image_model):
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    model, processor = ov
    assert isinstance(model, LlavaOnevisionForConditionalGeneration)
    assert isinstance(processor, LlavaOnevisionProcessor)
    llava, lproc = image_model
    for s in zoo.samples():
        img = zoo.load_image(s["path"])
        inp = processor(images=img, text=zoo.build_prompt(processor, s["question"]), return_tensors="pt")
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=inp["pixel_values"], image_sizes=inp["image_sizes"])
            base = llava.model.get_image_features(
                pixel_values=lproc.image_processor(img, return_tensors="pt")["pixel_values"]
            )
        base = base.pooler_output if hasattr(base, "pooler_output") else base
        base = base[0] if isinstance(base, (list, tuple)) else base
        # the first 256 tokens are the LLaVA model's tokens (DINOv2 position grid pre-interpolated to 16x16)
        torch.testing.assert_close(feats.pooler_output[0][:256], base.reshape(256, -1), atol=1e-3, rtol=1e-3)
        n_image = int((inp["input_ids"] == model.config.image_token_index).sum())
        assert n_image == feats.pooler_output[0].shape[0] and 256 + 16 < n_image <= 256 + 16 * 17  # + aspect view


def test_frame_processor_matches_the_image_base_view(ov):
    _, processor = ov
    img = zoo.load_image(zoo.samples()[2]["path"])
    video = onevision.FrameVideoProcessor()([img], return_tensors="pt")["pixel_values_videos"]
    image = processor.image_processor(img, return_tensors="pt")["pixel_values"][0, 0]
    assert video.shape == (1, 1, 3, 224, 224)
    torch.testing.assert_close(video[0, 0], image, atol=0.02, rtol=0)


def test_processor_round_trip(ov, tmp_path):
    _, processor = ov
    onevision.save_processor(processor, tmp_path)
    again = onevision.load_processor(tmp_path)
    q = "Which appears first, the red circle or the blue triangle?"
    assert again.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}], add_generation_prompt=True
    ) == zoo.build_prompt(processor, q, "video")
    ids = again.tokenizer(q)["input_ids"]
    assert again.tokenizer.unk_token_id not in ids and ids == processor.tokenizer(q)["input_ids"]


def _manual_video_answer(model, processor, frames, question):
    inputs = processor(videos=[frames], text=zoo.build_prompt(processor, question, "video"), return_tensors="pt")
    assert inputs["pixel_values_videos"].shape[:2] == (1, len(frames))
    n_video = int((inputs["input_ids"] == model.config.video_token_index).sum())
    assert n_video == len(frames) * 64 + 1
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_ask_every_media_kind(ov, clip_file):
    model, processor = ov
    path, item = clip_file
    s = zoo.samples()[0]
    img = zoo.load_image(s["path"])
    answers = {zoo.ask(model, processor, m, s["question"]) for m in (s["path"], img, np.asarray(img))}
    assert answers == {s["answer"]}
    q = item["question"]
    video = load(path, num_frames=8)
    want = _manual_video_answer(model, processor, video.images(), q)  # the model's own video input, 8 frames
    assert zoo.ask(model, processor, path, q) == want
    assert zoo.ask(model, processor, str(path), q) == want
    assert zoo.ask(model, processor, video, q) == want
    assert zoo.ask(model, processor, video.frames, q) == want
    long = load(path, num_frames=16)  # more frames than asked: subsampled uniformly to num_frames
    kind, frames = zoo.load_media(long, num_frames=8)
    assert kind == "video" and len(frames) == 8
    np.testing.assert_array_equal(np.asarray(frames[-1]), long.frames[-1])


def test_ask_bad_media(ov, tmp_path):
    model, processor = ov
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00not a video" * 50)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for media, why in [
        (tmp_path / "missing.mp4", "not found"),
        (empty, "empty"),
        (junk, "cannot read video"),
        (text, "neither an image nor a video"),
    ]:
        with pytest.raises(ValueError, match=why) as e:
            zoo.ask(model, processor, media, "What shape disappears?")
        assert str(media) in str(e.value)
    with pytest.raises(ValueError, match="uint8"):
        zoo.ask(model, processor, np.zeros((4, 32, 32, 3), np.float32), "What shape disappears?")
    with pytest.raises(ValueError, match="num_frames"):
        zoo.ask(model, processor, Video(np.zeros((2, 8, 8, 3), np.uint8), np.arange(2.0), 1.0, ""), "x", num_frames=0)
    with pytest.raises(ValueError, match="question"):
        zoo.ask(model, processor, Image.new("RGB", (32, 32)), " ")


def test_ask_video_on_an_image_only_model_streams_frames(clip_file):
    """A model without a video input (a tiny LLaVA shaped like the image default) gets the sampled frames as a
    stream of images: ``ask`` answers what ``ask_video`` answers on those frames."""
    from vlm_accel.video.stream import ask_video

    import tiny

    model, processor = tiny.build_default_like()
    assert not zoo.has_video_input(model, processor)
    path, item = clip_file
    answer = zoo.ask(model, processor, path, item["question"], num_frames=4)
    frames = load(path, num_frames=4).frames
    clip = Video(frames, np.arange(len(frames), dtype=float), 1.0, str(path))
    want, stats = ask_video(model, processor, clip, item["question"], max_new_tokens=8)
    assert isinstance(answer, str) and answer == want.strip() and stats.frames_seen == 4


def test_load_model_routes_zoo_directories(ov_dir, tmp_path):
    """``loading.load_model`` (CLI, demo, benchmarks) loads a zoo OneVision directory through the zoo loader (its
    processor is assembled there: no torchvision needed) and the image model as before."""
    from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    from vlm_accel.loading import is_zoo_dir, load_model

    import tiny

    model, processor = load_model(ov_dir)
    assert isinstance(model, LlavaOnevisionForConditionalGeneration) and zoo.has_video_input(model, processor)
    assert not model.training
    image_dir = tmp_path / "image_only"  # a zoo image model (DINOv2 LLaVA + the image model's processor)
    tiny_model, tiny_processor = tiny.build_default_like()
    tiny_model.save_pretrained(image_dir)
    tiny_processor.save_pretrained(image_dir)
    image_model, image_processor = load_model(image_dir)
    assert is_zoo_dir(json.loads((image_dir / "config.json").read_text()))
    assert isinstance(image_model, LlavaForConditionalGeneration)
    assert not zoo.has_video_input(image_model, image_processor)
    assert not is_zoo_dir({"model_type": "llava_onevision", "vision_config": {"model_type": "siglip_vision_model"}})


def test_cli_ask_video_goes_through_the_video_input(ov, ov_dir, clip_file, capsys, caplog):
    """``vlm-accel ask CLIP.mp4 q --model DIR`` answers what ``zoo.ask`` answers (the model's video input, 8
    frames); with a budget the log reports the video's tokens kept of 8 × 64 + 1."""
    import logging

    import vlm_accel
    from vlm_accel import cli

    model, processor = ov
    path, item = clip_file
    q = item["question"]
    assert cli.main(["ask", str(path), q, "--model", str(ov_dir)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == zoo.ask(model, processor, path, q)
    with vlm_accel.accelerate(model, budget=0.5, method="visionzip") as sess:
        want = zoo.ask(model, processor, path, q)
    kept = sess.stats.visual_tokens_kept
    with caplog.at_level(logging.INFO, logger="vlm_accel.cli"):
        rc = cli.main(["ask", str(path), q, "--model", str(ov_dir), "--budget", "0.5", "--method", "visionzip"])
    assert rc == 0 and capsys.readouterr().out.strip().splitlines()[-1] == want
    assert f"visual tokens kept: {kept} of {8 * 64 + 1}" in [r.getMessage() for r in caplog.records]
    assert 0 < kept < 8 * 64 + 1


def test_demo_video_tab_goes_through_the_video_input(ov, clip_file):
    """The demo's video tab answers what ``zoo.ask`` answers under the same budget (its frame cache at threshold 0
    changes no answer) and shows each sampled frame with the tokens kept of it."""
    import vlm_accel
    from vlm_accel.demo import Demo

    model, processor = ov
    path, item = clip_file
    answer, info, gallery = Demo(model, processor, max_new_tokens=8).answer_video(
        path, item["question"], budget=0.25, method="temporal", frames=8
    )
    with vlm_accel.accelerate(model, budget=0.25, method="temporal") as sess:
        assert answer == zoo.ask(model, processor, path, item["question"])
    assert info["visual tokens"] == f"{sess.stats.visual_tokens_kept} of {8 * 64 + 1}"
    assert info["method"] == "temporal" and info["frames sampled"] == 8 == len(gallery)
    assert info["frames encoded"] + info["frames reused (frame cache)"] == 8
    counts = [int(caption.split(", ")[-1].split(": ")[-1].split()[0]) for _, caption in gallery]  # "N tokens kept"
    assert sum(counts) == sess.stats.visual_tokens_kept
    for (image, _), frame in zip(gallery, load(path, num_frames=8).frames, strict=True):  # the sampled frames,
        shown, frame = np.asarray(image, np.int32)[4:-4, 4:-4], frame.astype(np.int32)[4:-4, 4:-4]  # border aside
        assert np.all((shown == frame) | (shown == (frame * 0.25).astype(np.int32)))  # dropped tokens dimmed
    with pytest.raises(ValueError, match="no video"):
        Demo(model, processor).answer_video(None, "What shape disappears?")


@pytest.mark.slow  # ~45 s of CPU: five generations of a 513-token clip plus a streamed one
def test_videoqa_matrix_on_the_video_input(ov, tmp_path):
    """The video benchmark through the model's video input: per-frame and per-clip budgets, the frame cache at
    threshold 0 (changes no answer) and a bounded stream; files written."""
    from vlm_accel.bench import videoqa

    model, processor = ov
    items = [
        {"frames": [Image.fromarray(f) for f in it["frames"]], **{k: it[k] for k in ("question", "answer", "type")}}
        for it in heldout_clips(1, seed=1)
    ]
    rows = videoqa.run_video(
        model, processor, items, ["temporal"], (1.0, 0.5), (0.0,), (0.5,), out_dir=tmp_path, name="vv"
    )
    got = [(r["method"], r["scope"], r["budget"]) for r in rows]
    assert got == [
        ("none", "frame", 1.0),
        ("temporal", "frame", 0.5),
        ("temporal", "clip", 0.5),
        ("frame_cache", "frame_cache", 0.0),
        ("stream", "stream", 0.5),
    ]
    cache = rows[3]
    assert cache["answers_changed"] == 0 and 0 < cache["frames_encoded_pct"] <= 100
    assert rows[4]["max_tokens"] == (8 * 64 + 1) // 2
    assert all((tmp_path / f"vv.{ext}").is_file() for ext in ("json", "csv", "png"))
    memo = json.loads((tmp_path / "vv.json").read_text())["tower_memo"]
    assert memo["hits"] == 2  # temporal per frame and per clip reused the full budget's tower output
