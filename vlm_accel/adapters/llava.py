"""LLaVA-1.5, LLaVA-NeXT (anyres) and LLaVA-OneVision: tokens scattered at ``<image>`` placeholders, 1-D RoPE."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .base import (
    Adapter,
    Frame,
    ImageInfo,
    Segment,
    TowerSpec,
    encoder_layers,
    feature_layer_index,
    frame_segments,
)

CLS_TOWERS = ("clip_vision_model", "dinov2")
MERGE_TOWERS = ("clip_vision_model", "siglip_vision_model", "dinov2")  # towers tome_vit can merge inside

logger = logging.getLogger(__name__)


class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    @property
    def tower(self) -> nn.Module:
        return self.inner.vision_tower

    def _option(self, call: dict, name: str):
        value = call.get(name)
        return getattr(self.model.config, name) if value is None else value

    def importance_layer(self, call: dict) -> nn.Module | None:
        vcfg = self.model.config.vision_config
        if vcfg.model_type not in CLS_TOWERS or self._option(call, "vision_feature_select_strategy") != "default":
            return None
        layers = encoder_layers(self.tower)
        return layers[feature_layer_index(len(layers), self._option(call, "vision_feature_layer"))]

    @property
    def side(self) -> int:
        vcfg = self.model.config.vision_config
        return vcfg.image_size // vcfg.patch_size

    def tower_spec(self):

        vcfg = self.model.config.vision_config
        if vcfg.model_type not in MERGE_TOWERS:
            raise ValueError(
                f"tome_vit merges inside {', '.join(MERGE_TOWERS)} towers; this model's is {vcfg.model_type!r}"
            )
        impl = getattr(vcfg, "_attn_implementation", None) or "eager"
        if impl not in ("eager", "sdpa"):
            raise ValueError(
                f"tome_vit adds log(size) to the vision tower's attention logits, which {impl!r} cannot take: load "
                "the model with attn_implementation='sdpa' or 'eager' for the vision tower"
            )
        layers = list(encoder_layers(self.tower))
        attns = [getattr(layer, "self_attn", None) or layer.attention for layer in layers]
        return TowerSpec(layers, attns, prefix=1 if vcfg.model_type in CLS_TOWERS else 0)

    def tower_feature_layer(self, call):
        chosen = self._option(call, "vision_feature_layer")
        n = len(encoder_layers(self.tower))
        first = min(feature_layer_index(n, f) for f in (chosen if isinstance(chosen, (list, tuple)) else [chosen]))
        if first < 0:
            raise ValueError("tome_vit: the image features are the tower's embeddings; there is no layer to merge in")
        return first

    def tower_dropped(self, call):
        return 1 if self._option(call, "vision_feature_select_strategy") == "default" else 0

    def describe_alive(self, infos, views, call):
        for info, alive in zip(infos, views, strict=True):
            info.alive = alive.to(info.segments[0].idx.device) if alive.numel() == info.n_tokens else None

    def describe(self, features, call, cls_attn):
        infos = []
        for i, f in enumerate(features):
            n = f.shape[0]
            s = math.isqrt(n)
            grid = (s, s) if s * s == n else None
            imp = cls_attn[i] if cls_attn is not None and cls_attn.shape[-1] == n else None
            infos.append(ImageInfo(n, [Segment(torch.arange(n, device=f.device), grid)], imp))
        return infos


class LlavaNextAdapter(LlavaAdapter):
    """Anyres: a base view (one quota) plus the unpadded high-resolution crops (one quota per crop), with an
    ``image_newline`` token ending every row; newlines are structural."""

    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)

    def _views_per_image(self, call: dict) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        return [
            image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            for s in call["image_sizes"]
        ]

    def _pack(self, per_image: list[torch.Tensor], call: dict) -> list[torch.Tensor]:
        return self.inner.pack_image_features(
            per_image,
            call["image_sizes"],
            vision_feature_select_strategy=self._option(call, "vision_feature_select_strategy"),
            image_newline=None,
        )[0]

    def describe(self, features, call, cls_attn):
        hw = self.side**2
        newline = self.inner.image_newline
        packed_imp = None
        if cls_attn is not None:
            per_image = torch.split(cls_attn.float(), self._views_per_image(call))
            packed_imp = self._pack([a[..., None] for a in per_image], call)
        infos = []
        for i, f in enumerate(features):
            n = f.shape[0]
            is_nl = (f == newline.to(f.dtype)).all(-1)
            idx = torch.arange(n, device=f.device)
            segments = [Segment(idx[:hw], (self.side, self.side))]
            rest = idx[hw:][~is_nl[hw:]]
            rows = int(is_nl[hw:].sum())
            if rest.numel():
                grid = (rows, rest.numel() // rows) if rows and rest.numel() % rows == 0 else None
                segments.append(Segment(rest, grid, units=max(1, round(rest.numel() / hw))))
            imp = None
            if packed_imp is not None:
                imp = torch.full((n,), float("nan"), device=f.device)
                imp[~is_nl] = packed_imp[i].reshape(-1).to(f.device)
            infos.append(ImageInfo(n, segments, imp))
        return infos

    def describe_alive(self, infos, views, call):
        """The views' alive marks packed like the features (base view, unpadded crops; newlines alive). Where the
        packing resamples the crops (OneVision's anyres_max), marks are no longer 0/1: that image stays unreduced."""
        per_image = torch.split(views.float(), self._views_per_image(call))
        packed = self._pack([v[..., None] for v in per_image], call)
        for info, p in zip(infos, packed, strict=True):
            p = p.reshape(-1)
            if not bool(((p == 0) | (p == 1)).all()):
                logger.warning("vlm_accel: tome_vit: the crops of an image were resampled; its tokens are all kept")
                continue
            idx = torch.cat([s.idx for s in info.segments]).sort().values
            alive = torch.ones(info.n_tokens, dtype=torch.bool, device=idx.device)
            alive[idx] = p.to(idx.device) > 0.5
            info.alive = alive


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)

    def _pack(self, per_image, call):
        return self.inner.pack_image_features(
            per_image,
            call["image_sizes"],
            image_newline=None,
            vision_aspect_ratio=self._option(call, "vision_aspect_ratio"),
        )[0]

    has_video = True

    def video_frames(self, call):

        return [[Frame(frame) for frame in clip] for clip in call["pixel_values_videos"]]

    def encode_frames(self, orig, frames, call):
        rest = {k: v for k, v in call.items() if k != "pixel_values_videos"}
        out = orig(pixel_values_videos=torch.stack([f.pixels for f in frames])[None], **rest)
        feats = out.pooler_output[0]  # [n * tokens + 1, D]: frames, then the newline
        per_frame = feats[:-1].view(len(frames), -1, feats.shape[-1])
        return [(per_frame[i], feats[-1]) for i in range(len(frames))]

    def assemble_video(self, per_video, call):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(
            pooler_output=torch.stack([torch.cat([f[0] for f in clip] + [clip[0][1][None]]) for clip in per_video])
        )

    def describe_video(self, features, call, cls_attn):
        """Each video: ``frames`` pooled grids, then one trailing newline token (structural)."""
        frames = call["pixel_values_videos"].shape[1]
        infos = []
        for f in features:
            side = math.isqrt((f.shape[0] - 1) // frames)
            infos.append(ImageInfo(f.shape[0], frame_segments(frames, (side, side), f.device), frames=frames))
        return infos
