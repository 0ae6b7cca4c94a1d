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

from .base import Adapter, ImageInfo, Segment, frame_segments

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
    if _decoder(inner) is None:
        out.append("model.model.language_model.layers (a decoder; or .text_model)")
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

    @property
    def language_model(self) -> nn.Module:
        return _decoder(self.inner)

    def describe(self, features, call, cls_attn):
        return [_one_segment(f) for f in features]

    def describe_video(self, features, call, cls_attn):
        return [_one_segment(f) for f in features]


def _decoder(inner: nn.Module) -> nn.Module | None:
    """The inner model's language model: ``language_model`` (most families) or ``text_model`` (SmolVLM)."""
    for name in ("language_model", "text_model"):
        lm = getattr(inner, name, None)
        if isinstance(getattr(lm, "layers", None), nn.ModuleList):
            return lm
    return None


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


class SmolVLMAdapter(GenericAdapter):
    """SmolVLM / Idefics3-style: image splitting into tiles + pixel shuffle; one feature row per tile (each tile its
    own quota); row / tile marker tokens are text and stay. The decoder is the inner model's ``text_model``."""

    family = "smolvlm"
    model_classes = ("SmolVLMForConditionalGeneration",)
    tested = True


class LlavaOnevision15Adapter(GenericAdapter):
    """LLaVA-OneVision-1.5: its own tower (merged 2 x 2 patches, one grid per image from ``image_grid_thw``) and a
    Qwen3 decoder with 1-D positions; videos per frame (``video_grid_thw``)."""

    family = "llava_onevision1_5"
    model_classes = ("LlavaOnevision15ForConditionalGeneration",)
    tested = True
    has_video = False  # the frame cache needs per-frame encoding hooks, not written for this tower yet

    def describe(self, features, call, cls_attn):
        return _grid_infos(self, features, call["image_grid_thw"], frames=False)

    def describe_video(self, features, call, cls_attn):
        return _grid_infos(self, features, call["video_grid_thw"], frames=True)


def _grid_infos(adapter: Adapter, features, grids: torch.Tensor, frames: bool) -> list[ImageInfo]:
    """Per input ``(t, h, w)`` in patches, merged ``spatial_merge_size`` x ``spatial_merge_size``: its grid, and a
    segment per frame for videos."""
    m = adapter.model.config.vision_config.spatial_merge_size
    infos = []
    for f, (t, h, w) in zip(features, grids.tolist(), strict=True):
        grid = (h // m, w // m)
        if frames and t > 1 and t * grid[0] * grid[1] == f.shape[0]:
            infos.append(ImageInfo(f.shape[0], frame_segments(t, grid, f.device), frames=t))
            continue
        ok = t * grid[0] * grid[1] == f.shape[0] and t == 1
        infos.append(ImageInfo(f.shape[0], [Segment(torch.arange(f.shape[0], device=f.device), grid if ok else None)]))
    return infos
