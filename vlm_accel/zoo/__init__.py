"""The embedded default VLM: a small LLaVA-OneVision (DINOv2 ViT-S/14 + 4-layer Llama) trained on rendered shape
scenes and clips of them.

    from vlm_accel.zoo import load_default, ask
    model, processor = load_default()
    ask(model, processor, "vlm_accel/zoo/samples/sample_1.png", "What color is the circle?")
    ask(model, processor, "vlm_accel/zoo/samples/clip_1.mp4", "Which way does the green rectangle move?")

The model is a stock ``transformers.LlavaOnevisionForConditionalGeneration`` with a stock
``LlavaOnevisionProcessor``, so the usual ``apply_chat_template`` → ``processor(images=..., text=...)`` (or
``videos=...``) → ``generate`` flow works unchanged: an image is 256 tokens of the whole image plus its
aspect-preserving view (≤ 528), a clip 8 uniformly sampled frames of 64 tokens each plus a newline (513).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..media import check_context
from .render import COLOR_NAMES, QTYPES, SHAPES, Scene, describe, heldout, normalize_answer, questions, render_scene

log = logging.getLogger(__name__)

DEFAULT_DIR = Path(__file__).resolve().parent / "default"
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"

__all__ = [
    "COLOR_NAMES",
    "DEFAULT_DIR",
    "QTYPES",
    "SAMPLES_DIR",
    "SHAPES",
    "Scene",
    "answer_inputs",
    "ask",
    "build_prompt",
    "describe",
    "has_video_input",
    "heldout",
    "load_default",
    "load_image",
    "load_media",
    "media_inputs",
    "normalize_answer",
    "questions",
    "render_scene",
    "samples",
]


def load_default(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load the embedded default VLM and its processor offline.

    Args:
        path: model directory (default: the packaged ``vlm_accel/zoo/default``, the OneVision model for images and
            videos; env ``VLM_ACCEL_MODEL`` overrides); a zoo-built ``llava`` (image) or ``llava_onevision`` (image +
            video) directory.
        dtype: parameter dtype (weights are stored in fp16; fp32 is the CPU default).
        device: where to put the model.

    Returns:
        ``(model, processor)``: a ``LlavaForConditionalGeneration`` + ``LlavaProcessor``, or a
        ``LlavaOnevisionForConditionalGeneration`` + ``LlavaOnevisionProcessor``, the model in eval mode.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    from .onevision import is_onevision, load_processor

    path = Path(path or os.environ.get("VLM_ACCEL_MODEL") or DEFAULT_DIR)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (expected config.json + model.safetensors + processor files)")
    if is_onevision(path):
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)
        processor = load_processor(path)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), processor


def load_image(image_or_path):
    """An RGB ``PIL.Image`` from a PIL image, a path or an ``[H, W, 3]`` uint8 array; ``ValueError`` if unusable."""
    from ..media import load_image as _load

    return _load(image_or_path)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts"}


def load_media(media, num_frames: int = 8):
    """What :func:`ask` was given: ``("image", PIL.Image)`` or ``("video", [PIL.Image] * k)``.

    ``media``: a PIL image, an ``[H, W, 3]`` uint8 array (image), a ``[T, H, W, 3]`` uint8 array or a list of
    images (frames), a loaded :class:`vlm_accel.video.Video`, or a path to an image or a video file. Videos give
    ``num_frames`` frames sampled uniformly (frames already loaded are subsampled uniformly when there are more,
    used as they are when there are fewer).

    Raises:
        ValueError: a missing, empty or unreadable file (naming it and why), or an unusable object.
    """
    import numpy as np
    from PIL import Image

    from ..video import Video, load

    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if isinstance(media, Image.Image):
        return "image", media.convert("RGB")
    if isinstance(media, Video):
        frames = media.frames
    elif isinstance(media, (list, tuple)):
        if not media:
            raise ValueError("the video has no frames (empty list)")
        frames = np.stack([np.asarray(load_image(f)) for f in media])
    elif hasattr(media, "shape") and not isinstance(media, (str, os.PathLike)) and len(media.shape) == 4:
        frames = np.asarray(media.detach().cpu() if hasattr(media, "detach") else media)
        if frames.dtype != np.uint8 or frames.shape[-1] != 3 or 0 in frames.shape:
            raise ValueError(f"video frames must be a [T, H, W, 3] uint8 array, got {frames.dtype} {frames.shape}")
    elif isinstance(media, (str, os.PathLike)):
        p = Path(media)
        if not p.is_file():
            raise ValueError(f"{p}: not found (no such file; expected an image or a video)")
        if p.stat().st_size == 0:
            raise ValueError(f"{p}: the file is empty")
        if p.suffix.lower() in VIDEO_SUFFIXES:
            return "video", load(p, num_frames=num_frames).images()
        if p.suffix.lower() in IMAGE_SUFFIXES:
            return "image", load_image(p)
        try:
            return "image", load_image(p)
        except ValueError as image_error:
            try:
                return "video", load(p, num_frames=num_frames).images()
            except ValueError as video_error:
                raise ValueError(f"{p}: neither an image nor a video ({image_error}; {video_error})") from None
    else:
        return "image", load_image(media)
    if len(frames) == 0:
        raise ValueError("the video has no frames")
    if len(frames) > num_frames:
        frames = frames[np.linspace(0, len(frames) - 1, num_frames).round().astype(int)]
    return "video", [Image.fromarray(f) for f in frames]


def has_video_input(model, processor) -> bool:
    """Whether the model takes videos itself (a video placeholder token and a processor that makes video inputs)."""
    cfg = model.config
    token = getattr(cfg, "video_token_id", None)
    if token is None:
        token = getattr(cfg, "video_token_index", None)
    return token is not None and getattr(processor, "video_processor", None) is not None


def build_prompt(processor, question: str, media: str = "image") -> str:
    """Chat prompt for one image (or one video: ``media="video"``) + one question, via the chat template."""
    conv = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conv, add_generation_prompt=True)


@torch.no_grad()
def ask(model, processor, media, question: str, max_new_tokens: int = 8, num_frames: int = 8) -> str:
    """Answer one question about one image or video with greedy decoding; returns the answer text (stripped).

    ``media``: a PIL image, an image path, a video path, a loaded :class:`vlm_accel.video.Video` or a
    ``[T, H, W, 3]`` uint8 array of frames (see :func:`load_media`). A video goes through the model's own video
    input (``pixel_values_videos``, ``num_frames`` frames sampled uniformly); a model without one (an image-only
    LLaVA) is given the frames as a stream of images within half its context (:func:`vlm_accel.video.ask_video`).

    Raises ``ValueError`` for missing or unreadable media (naming the file and why) or an empty question.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    for name, value in (("max_new_tokens", max_new_tokens), ("num_frames", num_frames)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    kind, content = load_media(media, num_frames)
    if kind == "video" and not has_video_input(model, processor):
        import numpy as np

        from ..video import Video
        from ..video.stream import ask_video

        log.info("%s has no video input: the %d frames go in as a stream of images", type(model).__name__, len(content))
        frames = np.stack([np.asarray(f) for f in content])
        clip = Video(frames, np.arange(len(frames), dtype=float), 1.0, str(media) if isinstance(media, str) else "")
        answer, _stats = ask_video(model, processor, clip, question, max_new_tokens=max_new_tokens)
        return answer.strip()
    return answer_inputs(model, processor, media_inputs(model, processor, kind, content, question, max_new_tokens))


def media_inputs(model, processor, kind: str, content, question: str, max_new_tokens: int = 8):
    """The processor's inputs for ``question`` about loaded media (``(kind, content)`` of :func:`load_media`; a video
    through the model's video input) on the model's device and dtype; ``ValueError`` when the prompt plus
    ``max_new_tokens`` passes the model's context."""
    if kind == "video":
        inputs = processor(videos=[content], text=build_prompt(processor, question, "video"), return_tensors="pt")
    else:
        inputs = processor(images=content, text=build_prompt(processor, question), return_tensors="pt")
    inputs = inputs.to(model.device)
    check_context(model, inputs["input_ids"], max_new_tokens)  # a prompt past the context answers wrongly, silently
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(model.dtype)
    return inputs


def answer_inputs(model, processor, inputs, max_new_tokens: int = 8) -> str:
    """Greedy answer (stripped text) to the prompt in ``inputs`` (:func:`media_inputs`)."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def samples(kind: str | None = None) -> list[dict]:
    """The bundled held-out samples with a question and its expected answer each: ``[{path, kind, question,
    answer}]``; ``kind``: ``"image"`` (rendered scenes) or ``"video"`` (MP4 clips; ask with ``num_frames=8``), or
    ``None`` for both."""
    import json

    if kind not in (None, "image", "video"):
        raise ValueError(f"kind must be 'image', 'video' or None, got {kind!r}")
    with open(SAMPLES_DIR / "samples.json") as f:
        items = json.load(f)
    for it in items:
        it["path"] = str(SAMPLES_DIR / it["file"])
    return [it for it in items if kind is None or it["kind"] == kind]
