"""Reading the inputs of a request with clear errors: images (paths, PIL images, arrays) and the context check.

Imports nothing of the package: every room (``zoo``, ``video``, the faces) reads media through here.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["check_context", "context_length", "load_image"]


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
    if p.is_dir():
        raise ValueError(f"{p} is a directory, not an image file")
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
