"""The embedded default VLM: a small LLaVA (DINOv2 ViT-S/14 + 4-layer Llama) trained on rendered shape scenes.

    from vlm_accel.zoo import load_default, ask
    model, processor = load_default()
    ask(model, processor, "vlm_accel/zoo/samples/sample_1.png", "What color is the circle?")

The model is a stock ``transformers.LlavaForConditionalGeneration`` with a stock ``LlavaProcessor``, so the usual
``apply_chat_template`` → ``processor(images=..., text=...)`` → ``generate`` flow works unchanged (256 visual tokens
per image).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..loading import check_context
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
    "ask",
    "build_prompt",
    "describe",
    "heldout",
    "load_default",
    "load_image",
    "normalize_answer",
    "questions",
    "render_scene",
    "samples",
]


def load_default(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load the embedded default VLM and its processor offline.

    Args:
        path: model directory (default: the packaged ``vlm_accel/zoo/default``; env ``VLM_ACCEL_MODEL`` overrides).
        dtype: parameter dtype (weights are stored in fp16; fp32 is the CPU default).
        device: where to put the model.

    Returns:
        ``(model, processor)``: a ``LlavaForConditionalGeneration`` in eval mode and a ``LlavaProcessor``.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path or os.environ.get("VLM_ACCEL_MODEL") or DEFAULT_DIR)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (expected config.json + model.safetensors + processor files)")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
    model.eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


def load_image(image_or_path):
    """Return an RGB ``PIL.Image`` from a PIL image, a numpy array (H, W, 3) or a path; ``ValueError`` if unusable."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image_or_path, Image.Image):
        return image_or_path.convert("RGB")
    if hasattr(image_or_path, "shape") and not isinstance(image_or_path, (str, os.PathLike)):
        import numpy as np

        return Image.fromarray(np.asarray(image_or_path)).convert("RGB")
    p = Path(image_or_path)
    if not p.is_file():
        raise ValueError(f"image not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {p}: not a valid image file ({e})") from e


def build_prompt(processor, question: str) -> str:
    """Chat prompt for one image + one question, via the processor's chat template."""
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conv, add_generation_prompt=True)


@torch.no_grad()
def ask(model, processor, image_or_path, question: str, max_new_tokens: int = 8) -> str:
    """Answer one question about one image with greedy decoding; returns the decoded answer text (stripped).

    Raises ``ValueError`` for a missing or unreadable image or an empty question.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    image = load_image(image_or_path)
    inputs = processor(images=image, text=build_prompt(processor, question), return_tensors="pt")
    inputs = inputs.to(model.device)
    check_context(model, inputs["input_ids"], max_new_tokens)  # a prompt past the context answers wrongly, silently
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def samples() -> list[dict]:
    """The bundled sample images with a question and its expected answer each: ``[{path, question, answer}]``."""
    import json

    with open(SAMPLES_DIR / "samples.json") as f:
        items = json.load(f)
    for it in items:
        it["path"] = str(SAMPLES_DIR / it["file"])
    return items
