"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL: merged 2x2 patches, M-RoPE 3-D positions, ``mm_token_type_ids``; Qwen3-VL also
injects deepstack features at the visual positions of early LLM layers (pruned in step by the patcher)."""

from __future__ import annotations

import torch

from .base import Adapter, ImageInfo, Segment, frame_segments


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)

    def describe(self, features, call, cls_attn):
        grids = call["image_grid_thw"]
        m = self.model.config.vision_config.spatial_merge_size
        infos = []
        for f, (t, h, w) in zip(features, grids.tolist(), strict=True):
            n = f.shape[0]
            grid = (h // m, w // m) if t == 1 and (h // m) * (w // m) == n else None
            infos.append(ImageInfo(n, [Segment(torch.arange(n, device=f.device), grid, units=t if t > 1 else 1)]))
        return infos

    def describe_video(self, features, call, cls_attn):
        m = self.model.config.vision_config.spatial_merge_size
        infos = []
        for f, (t, h, w) in zip(features, call["video_grid_thw"].tolist(), strict=True):
            grid = (h // m, w // m)
            infos.append(ImageInfo(f.shape[0], frame_segments(t, grid, f.device), frames=t))
        return infos


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration",)
