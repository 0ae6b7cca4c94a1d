"""Loading models and inputs, with clear errors: the library functions behind the CLI, the demo and the benchmarks.

from vlm_accel.loading import load_model, load_image, check_context
model, processor = load_model("path/to/checkpoint")      # or load_model() for the embedded default
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .media import check_context, context_length, load_image  # noqa: F401  (importable from here too)

logger = logging.getLogger(__name__)

__all__ = ["check_context", "context_length", "is_zoo_dir", "load_image", "load_model"]


def load_model(path: str | os.PathLike | None = None):
    """The embedded default (``path=None``) or any supported checkpoint directory, offline: ``(model, processor)``.

    Raises:
        ValueError: ``path`` is not a model directory, its ``config.json`` is not valid JSON, or the weights or the
            processor files cannot be loaded (the message names the directory and what is wrong).
    """
    from . import zoo

    if path is None:
        return zoo.load_default()
    p = Path(path)
    config = p / "config.json"
    if not config.is_file():
        raise ValueError(f"{p}: not a model directory (no config.json)")
    try:
        cfg = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config}: not a valid config file ({e})") from None
    if is_zoo_dir(cfg):
        try:
            return zoo.load_default(p)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot load the zoo model from {p}: {_first_line(e)}") from None
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        model = AutoModelForImageTextToText.from_pretrained(p, local_files_only=True).eval()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot load a vision-language model from {p}: {_first_line(e)}") from None
    try:
        processor = AutoProcessor.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"cannot load the processor from {p} (tokenizer / image processor files): {_first_line(e)}"
        ) from None
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise ValueError(
            f"{p}: the processor there is a {type(processor).__name__}, not a multimodal processor (tokenizer + image "
            "processor); save the model's processor with processor.save_pretrained(dir)"
        )
    return model, processor


def is_zoo_dir(config: dict) -> bool:
    """Whether a ``config.json`` (as a dict) is a zoo-built model (DINOv2 tower in a LLaVA / LLaVA-OneVision).

    Those load through :func:`vlm_accel.zoo.load_default`: the OneVision form's processor is assembled there, because
    ``AutoProcessor`` would need torchvision for the stock ``LlavaOnevisionVideoProcessor``."""
    vision = config.get("vision_config") or {}
    return config.get("model_type") in ("llava", "llava_onevision") and vision.get("model_type") == "dinov2"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
