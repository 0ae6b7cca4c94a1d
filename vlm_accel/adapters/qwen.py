"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL: merged 2x2 patches, M-RoPE 3-D positions, ``mm_token_type_ids``; Qwen3-VL also
injects deepstack features at the visual positions of early LLM layers (pruned in step by the patcher)."""

from __future__ import annotations

import torch

from .base import Adapter, Frame, ImageInfo, Segment, frame_segments


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    has_video = True
    _out_cls = None

    def video_frames(self, call):

        pv, videos, off = call["pixel_values_videos"], [], 0
        for t, h, w in call["video_grid_thw"].tolist():
            videos.append([Frame(pv[off + i * h * w : off + (i + 1) * h * w], (h, w)) for i in range(t)])
            off += t * h * w
        return videos

    def encode_frames(self, orig, frames, call):
        rest = {k: v for k, v in call.items() if k not in ("pixel_values_videos", "video_grid_thw")}
        grid = torch.tensor([[1, *f.meta] for f in frames], device=call["video_grid_thw"].device)
        out = orig(pixel_values_videos=torch.cat([f.pixels for f in frames]), video_grid_thw=grid, **rest)
        type(self)._out_cls = type(out)
        deep = getattr(out, "deepstack_features", None)
        return [(out.pooler_output[i], [lvl[i] for lvl in deep] if deep else None) for i in range(len(frames))]

    def assemble_video(self, per_video, call):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = (self._out_cls or BaseModelOutputWithPooling)()
        out.pooler_output = tuple(torch.cat([f[0] for f in frames]) for frames in per_video)
        if per_video[0][0][1] is not None:  # Qwen3-VL deepstack: per level, per video
            levels = len(per_video[0][0][1])
            out.deepstack_features = [
                tuple(torch.cat([f[1][lvl] for f in frames]) for frames in per_video) for lvl in range(levels)
            ]
        return out

    def tower_spec(self):
        raise ValueError(
            f"tome_vit cannot merge inside {self.family}'s vision tower: every LLM token is a 2x2 unit of patches "
            "that the patch merger concatenates (a merged patch has no unit of its own), the tower's attention runs "
            "on per-image / per-window sequences (cu_seqlens) and 2-D rotary positions; use a pre-LLM method "
            "(e.g. 'divprune') or an in-LLM one ('fastv')"
        )

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


class Qwen35Adapter(Qwen2VLAdapter):
    """Qwen3.5: a Qwen3-VL-style tower (no deepstack) and a hybrid decoder — Gated DeltaNet (linear attention, a
    recurrent state, no KV cache) and full-attention layers (``text_config.layer_types``)."""

    family = "qwen3_5"
    model_classes = ("Qwen3_5ForConditionalGeneration",)


class Glm4vAdapter(Qwen2VLAdapter):
    """GLM-4.1V / GLM-4.6V: a Qwen-style tower (merged 2 x 2 patches, ``image_grid_thw``) and M-RoPE positions from
    the model's own ``get_rope_index``; between ``<|begin_of_image|>`` / ``<|end_of_image|>`` text tokens."""

    family = "glm4v"
    model_classes = ("Glm4vForConditionalGeneration", "Glm46VForConditionalGeneration")
    has_video = False  # the frame cache's per-frame encoding is written for the Qwen towers only

    def tower_spec(self):
        raise ValueError(
            f"tome_vit cannot merge inside {self.family}'s vision tower (merged 2 x 2 units, per-image packed "
            "sequences, 2-D rotary positions); use a pre-LLM method (e.g. 'divprune') or an in-LLM one ('fastv')"
        )
