"""Loading models and inputs, with clear errors: the library functions behind the CLI, the demo and the benchmarks.

from vlm_accel.loading import load_model, load_image, check_context
model, processor = load_model("path/to/checkpoint")      # or load_model() for the embedded default
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

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


def load_image(image_or_path):
    """An RGB ``PIL.Image`` from a PIL image, a path, or an ``[H, W, 3]`` / ``[H, W]`` uint8 array or tensor.

    Raises:
        ValueError: a missing or unreadable file, or an array that is not ``uint8`` ``[H, W]`` / ``[H, W, 3|4]`` (float
            arrays and ``[3, H, W]`` channel-first tensors are refused with what to pass instead).
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image_or_path, Image.Image):
        return image_or_path.convert("RGB")
    if hasattr(image_or_path, "shape") and not isinstance(image_or_path, (str, os.PathLike)):
        return Image.fromarray(_image_array(image_or_path)).convert("RGB")
    if not isinstance(image_or_path, (str, os.PathLike)):
        raise ValueError(
            f"an image must be a PIL image, a file path or an [H, W, 3] uint8 array, not {type(image_or_path).__name__}"
        )
    p = Path(image_or_path)
    if not p.is_file():
        raise ValueError(f"image not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {p}: not a valid image file ({e})") from e


def _image_array(x):
    """``x`` (numpy array or tensor) as a ``[H, W]`` / ``[H, W, 3|4]`` uint8 numpy array, or a ``ValueError``."""
    import numpy as np

    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    shape = tuple(a.shape)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image array of shape {shape} looks channel-first [C, H, W]; pass [H, W, C] (e.g. x.permute(1, 2, 0) "
            "for a tensor, x.transpose(1, 2, 0) for an array)"
        )
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ValueError(f"an image array must be [H, W, 3] (RGB), [H, W, 4] or [H, W]; got shape {shape}")
    if a.dtype != np.uint8:
        kind = "float values in [0, 1]: pass (x * 255).round() as uint8" if a.dtype.kind == "f" else "uint8 values"
        raise ValueError(f"an image array must be uint8 (0-255), got {a.dtype} (for {kind})")
    if 0 in a.shape:
        raise ValueError(f"image array of shape {shape} is empty")
    return np.ascontiguousarray(a)


def context_length(model) -> int | None:
    """The language model's context in positions (``max_position_embeddings`` of its text config), if it has one."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_context(model, input_ids, max_new_tokens: int = 0) -> None:
    """Raise ``ValueError`` when a prompt (``input_ids`` ``[B, L]`` / ``[L]``, or its length ``L``) plus
    ``max_new_tokens`` does not fit the model's context; the message names both lengths.

    The prompt is counted before any token reduction (what the processor made, visual placeholders included): a
    model past its positions answers wrongly without an error, so callers check before ``generate``."""
    limit = context_length(model)
    if limit is None:
        return
    n = int(input_ids) if isinstance(input_ids, int) else int(input_ids.shape[-1])
    new = int(max_new_tokens or 0)
    if n + new > limit:
        extra = f" + {new} new tokens" if new else ""
        hint = "ask for fewer new tokens" if n <= limit else "shorten the question (visual tokens count too)"
        raise ValueError(f"the prompt is {n} tokens{extra} but the model's context is {limit} positions: {hint}")
