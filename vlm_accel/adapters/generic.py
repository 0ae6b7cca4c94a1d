"""Any standard-interface VLM: a ``...ForConditionalGeneration`` whose inner model has ``get_image_features`` and
``get_placeholder_mask`` and whose decoder uses 1-D positions (Gemma 3 / 4, InternVL, SmolVLM, Mistral 3 ... in
transformers 5).

Every feature row ``get_image_features`` returns (an image, or a tile / crop of one: InternVL and SmolVLM return one
per tile) is one input with one quota; its grid is square when its token count is a square (pooled towers: Gemma's
16 x 16, InternVL's 16 x 16 after pixel shuffle), unknown otherwise. Text tokens between tiles (tile and row markers,
``<start_of_image>`` / ``<end_of_image>``) are structural text and always stay. Families tested here get a named
subclass; any other qualifying model is accelerated with a one-time notice that its family is untested.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .base import Adapter, ImageInfo, Segment

logger = logging.getLogger(__name__)
_NOTICED: set[str] = set()


def missing(model: nn.Module) -> list[str]:
    """What ``model`` lacks for the generic adapter (empty: it qualifies)."""
    inner = getattr(model, "model", None)
    out = []
    if inner is None:
        return ["an inner .model (load it with its ...ForConditionalGeneration class)"]
    for name in ("get_image_features", "get_placeholder_mask"):
        if not callable(getattr(inner, name, None)):
            out.append(f"model.model.{name}")
    lm = getattr(inner, "language_model", None)
    if not isinstance(getattr(lm, "layers", None), nn.ModuleList):
        out.append("model.model.language_model.layers (a decoder)")
    if hasattr(inner, "get_rope_index") or hasattr(inner, "compute_3d_position_ids"):
        out.append("1-D positions (this model uses multimodal RoPE, which needs a family adapter)")
    return out


class GenericAdapter(Adapter):
    """Pre-LLM pruning (and the in-LLM / KV stages where the decoder is standard) for any standard-interface VLM."""

    family = "generic"
    model_classes: tuple[str, ...] = ()
    tested = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if type(self) is GenericAdapter:
            self.family = getattr(model.config, "model_type", type(model).__name__)
        name = type(model).__name__
        if not self.tested and name not in _NOTICED:
            _NOTICED.add(name)
            logger.warning(
                "vlm_accel: %s is accelerated by the generic adapter (one quota per image / tile); its family is "
                "untested here: check identity at budget 1.0 and accuracy on your data",
                name,
            )

    def describe(self, features, call, cls_attn):
        return [_one_segment(f) for f in features]

    def describe_video(self, features, call, cls_attn):
        return [_one_segment(f) for f in features]


def _one_segment(f: torch.Tensor) -> ImageInfo:
    n = f.shape[0]
    side = math.isqrt(n)
    grid = (side, side) if side * side == n else None
    return ImageInfo(n, [Segment(torch.arange(n, device=f.device), grid)])


class Gemma3Adapter(GenericAdapter):
    """Gemma 3: a SigLIP tower average-pooled to ``mm_tokens_per_image`` tokens per image (and per pan-and-scan
    crop), between ``<start_of_image>`` / ``<end_of_image>``; image tokens attend to each other bidirectionally (the
    session gathers that block for the kept tokens), sliding-window and full-attention layers."""

    family = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration",)
    tested = True


class InternVLAdapter(GenericAdapter):
    """InternVL 3 / 3.5: InternViT + pixel shuffle (``downsample_ratio`` 0.5); one feature row per tile (dynamic
    tiles plus a thumbnail), so each tile gets its own quota; the tile markers are text and stay."""

    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)
    tested = True
