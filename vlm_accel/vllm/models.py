"""Pruned variants of vLLM's LLaVA, Qwen2.5-VL and Qwen3-VL classes (imported by vLLM through
:func:`vlm_accel.vllm.register`).

vLLM fixes the number of placeholder tokens per image when it processes the prompt, and the positions of a
request's tokens when the request is admitted, both before the encoder runs in the batched encoder step. So:

1. the processors put ``Settings.quota(N)`` placeholders per image (``N`` = the encoder's tokens);
2. ``get_mrope_input_positions`` (run once per admitted request) encodes each reduced image, runs the library's
   method on it, caches the kept (or merged) features by image content and returns the kept tokens' *original*
   positions (LLaVA: 1-D positions as three equal M-RoPE rows; Qwen: 3-D M-RoPE positions); text after an image
   keeps its original positions too;
3. the batched encoder step (``embed_multimodal``) returns the cached features (or encodes and reduces the same
   way when nothing was cached, e.g. vLLM's profiling run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import OrderedDict

import numpy as np
import torch
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import PlaceholderRange
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.utils import group_and_batch_mm_kwargs

from ..methods import Context, get
from . import Settings, settings_from_config
from .config import llava_auto_method

logger = logging.getLogger(__name__)

CACHE_ITEMS = 256  # reduced images kept between admission and the encoder step (consumed there)


def _fingerprint(t: torch.Tensor) -> str:
    """Content key of one image's input tensor (same bytes -> same key, in both places it is computed)."""
    t = t.detach().contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(t.view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


class _Pruned:
    """What both families share: settings, the per-image reduction, the admission-time cache and positions.

    A family provides ``_vlm_auto`` (its ``auto`` method), ``_vlm_items(image_input)`` -> per image ``(key, grid)``,
    ``_vlm_encode(image_input)`` -> per image ``(features [N, D], importance [N] | None)``, ``_vlm_full_positions(
    feature, grid_info)`` and ``_vlm_reducible(image_input)``."""

    _vlm_auto = "divprune"

    def _vlm_setup(self) -> None:
        self.vlm_settings: Settings = settings_from_config(self.config, auto=self._vlm_auto)
        self._vlm_method = get(self.vlm_settings.method)
        self._vlm_cache: OrderedDict[str, tuple[np.ndarray, torch.Tensor]] = OrderedDict()
        logger.info(
            "vlm_accel: %s prunes images with %r at budget %r",
            type(self).__name__,
            self.vlm_settings.method,
            self.vlm_settings.budget.visual,
        )

    # --- one image ----------------------------------------------------------------------------------------------
    def _vlm_reduce_one(self, x: torch.Tensor, grid, importance) -> tuple[np.ndarray, torch.Tensor]:
        """``x`` ``[N, D]`` -> (kept indices ``[K]`` ascending, features ``[K, D]``) with ``K = quota(N)``."""
        n = x.shape[0]
        k = self.vlm_settings.quota(n)
        if k >= n:
            return np.arange(n), x
        ctx = Context(
            grid=grid if grid is not None and grid[0] * grid[1] == n else None,
            importance=importance,
            generator=torch.Generator().manual_seed(self.vlm_settings.seed),
        )
        red = self._vlm_method(self._vlm_view(x), k, ctx)
        return red.keep.cpu().numpy(), red.apply(x)

    def _vlm_view(self, x: torch.Tensor) -> torch.Tensor:
        """The part of an image's rows ``x`` ``[N, *]`` the method sees (the rows are reduced whole)."""
        return x

    def _vlm_reduce_images(self, image_input, consume: bool) -> list[tuple[np.ndarray, torch.Tensor]]:
        """Per image of ``image_input``: (kept indices, features), from the cache or computed (and cached)."""
        items = self._vlm_items(image_input)
        got = [self._vlm_cache.get(key) for key, _ in items]
        if any(g is None for g in got):
            encoded = self._vlm_encode(image_input)
            for i, ((key, grid), (x, imp)) in enumerate(zip(items, encoded, strict=True)):
                if got[i] is None:
                    got[i] = self._vlm_reduce_one(x, grid, imp)
                    if not consume:
                        self._vlm_cache[key] = got[i]
                        while len(self._vlm_cache) > CACHE_ITEMS:
                            self._vlm_cache.popitem(last=False)
        if consume:
            for key, _ in items:
                self._vlm_cache.pop(key, None)
        return got

    def _vlm_kept(self, feature) -> np.ndarray:
        """Kept indices of one admitted image (a ``MultiModalFeatureSpec``); its reduced features stay cached."""
        device = next(self.parameters()).device
        with torch.inference_mode():
            ((_, _, kwargs),) = list(group_and_batch_mm_kwargs([(feature.modality, feature.data)], device=device))
            image_input = self._parse_and_validate_image_input(**kwargs)
            ((kept, _),) = self._vlm_reduce_images(image_input, consume=False)
        return kept

    def _vlm_images(self, image_input):
        """The family's ``_process_image_input`` result, reduced (images the prompt has full counts for pass)."""
        return tuple(f for _, f in self._vlm_reduce_images(image_input, consume=True))

    # --- positions ----------------------------------------------------------------------------------------------
    def _vlm_positions(self, input_tokens: list[int], features, full) -> tuple[torch.Tensor, int]:
        """M-RoPE positions ``[3, L]`` of a prompt whose items ``features`` may be reduced, and the decode delta.

        ``full[i]``: the unreduced item's positions ``[3, N]`` relative to its first token; a reduced item (fewer
        placeholders than ``N``) takes the columns of its kept tokens; the next text starts after the full item."""
        parts, st, nxt = [], 0, 0
        for f, pos in zip(features, full, strict=True):
            offset, length = f.mm_position.offset, f.mm_position.length
            text = offset - st
            parts.append(np.broadcast_to(np.arange(text) + nxt, (3, text)))
            nxt += text
            span = int(pos.max()) + 1 if pos.size else 0
            if pos.shape[1] != length:
                pos = pos[:, self._vlm_kept(f)]
            if pos.shape[1] != length:
                raise RuntimeError(
                    f"vlm_accel: {length} placeholders but {pos.shape[1]} reduced tokens for a {f.modality} item"
                )
            parts.append(pos + nxt)
            nxt += span
            st = offset + length
        tail = len(input_tokens) - st
        parts.append(np.broadcast_to(np.arange(tail) + nxt, (3, tail)))
        nxt += tail
        positions = np.concatenate(parts, axis=1).astype(np.int64)
        return torch.from_numpy(positions), nxt - len(input_tokens)

    def _vlm_positions_from_full(self, input_tokens: list[int], features, n_full, full_fn):
        """M-RoPE positions of a prompt with reduced images, taken from the unreduced prompt's positions.

        Rebuilds the prompt with every reduced image at its full ``n_full(feature)`` tokens, asks ``full_fn(tokens,
        features)`` (the family's own positions) for its positions, and keeps the columns of the text, of the kept
        tokens and of every unreduced item."""
        full, cols, specs, st = [], [], [], 0
        for f in sorted(features, key=lambda f: f.mm_position.offset):
            offset, length = f.mm_position.offset, f.mm_position.length
            cols.append(np.arange(offset - st) + len(full))
            full += input_tokens[st:offset]
            start, n = len(full), n_full(f)
            if n != length:
                kept = self._vlm_kept(f)
                if kept.shape[0] != length:
                    raise RuntimeError(f"vlm_accel: {length} placeholders but {kept.shape[0]} reduced tokens")
                full += [input_tokens[offset]] * n
                cols.append(kept + start)
                f = dataclasses.replace(f, mm_position=PlaceholderRange(offset=start, length=n))
            else:
                full += input_tokens[offset : offset + length]
                cols.append(np.arange(length) + start)
                f = dataclasses.replace(f, mm_position=dataclasses.replace(f.mm_position, offset=start))
            specs.append(f)
            st = offset + length
        cols.append(np.arange(len(input_tokens) - st) + len(full))
        full += input_tokens[st:]
        positions, delta = full_fn(full, specs)
        positions = positions[:, torch.from_numpy(np.concatenate(cols))]
        return positions, int(delta) + len(full) - len(input_tokens)


# --- LLaVA ----------------------------------------------------------------------------------------------------------
class VlmAccelLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        hf = self.get_hf_config()
        return settings_from_config(hf, auto=llava_auto_method(hf)).quota(n)


def _cls_attention(layer, hidden: torch.Tensor, total_heads: int) -> torch.Tensor:
    """Head-averaged attention of the CLS query over the patch keys of a vLLM CLIP encoder layer, recomputed from
    the layer input ``hidden`` ``[B, 1 + N, C]`` -> ``[B, N]`` (as :func:`vlm_accel.adapters.base.cls_attention`).

    Under tensor parallelism each rank holds some heads: their sums are all-reduced so every rank scores alike."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    qkv, _ = attn.qkv_proj(x)
    q, k, _ = qkv.chunk(3, dim=-1)
    hd = attn.head_dim
    b, t, c = k.shape
    heads = c // hd
    q = q[:, :1].reshape(b, 1, heads, hd).transpose(1, 2).float()  # [B, H, 1, hd]
    k = k.reshape(b, t, heads, hd).transpose(1, 2).float()  # [B, H, T, hd]
    att = torch.softmax(q @ k.transpose(-1, -2) * hd**-0.5, dim=-1)  # [B, H, 1, T]
    if heads == total_heads:
        return att.mean(1)[:, 0, 1:]
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(att.sum(1)[:, 0, 1:].contiguous()) / total_heads


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor, info=VlmAccelLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VlmAccelLlavaForConditionalGeneration(_Pruned, LlavaForConditionalGeneration, SupportsMRoPE):
    """vLLM's LLaVA with each image reduced to its quota; positions as M-RoPE with three equal rows (the config hook
    adds the sections), so the kept tokens and the text after them keep their original 1-D positions."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vlm_auto = llava_auto_method(self.config)
        self._vlm_setup()

    def _vlm_importance_layer(self):
        if "importance" not in self._vlm_method.needs:
            return None
        if self.config.vision_config.model_type != "clip_vision_model":
            return None
        if self.config.vision_feature_select_strategy != "default":
            return None
        if not isinstance(self.config.vision_feature_layer, int):
            return None
        return self.vision_tower.vision_model.encoder.layers[-1]  # built up to the feature layer

    def _vlm_items(self, image_input):
        pv = image_input["pixel_values"]
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return [(_fingerprint(p), (side, side)) for p in pv]

    def _vlm_encode(self, image_input):
        layer = self._vlm_importance_layer()
        captured = {}
        handle = None
        if layer is not None:

            def grab(mod, args, kwargs):
                captured["hidden"] = args[0] if args else kwargs["hidden_states"]

            handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            feats = super()._process_image_input(image_input)
        finally:
            if handle is not None:
                handle.remove()
        imps = [None] * len(feats)
        if "hidden" in captured:
            scores = _cls_attention(layer, captured["hidden"], self.config.vision_config.num_attention_heads)
            imps = [s if s.shape[0] == f.shape[0] else None for s, f in zip(scores, feats, strict=True)]
        return list(zip(feats, imps, strict=True))

    def _process_image_input(self, image_input):
        if image_input["type"] != "pixel_values" or self.vlm_settings.budget.is_full:
            return super()._process_image_input(image_input)
        return self._vlm_images(image_input)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        feats = sorted(mm_features, key=lambda f: f.mm_position.offset)
        full = []
        for f in feats:
            n = self._vlm_full_tokens(f)
            full.append(np.broadcast_to(np.arange(n), (3, n)))
        return self._vlm_positions(input_tokens, feats, full)

    def _vlm_full_tokens(self, feature) -> int:
        """Tokens the encoder gives one image (embeddings: as many as given)."""
        data = feature.data
        if data is not None and "image_embeds" in data:
            return feature.mm_position.length
        vc = self.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n + 1 if self.config.vision_feature_select_strategy == "full" else n


# --- Qwen2.5-VL -----------------------------------------------------------------------------------------------------
def _reduced_image_updates(updates, settings: Settings) -> list:
    """The family's prompt updates with each image's placeholders cut to its quota."""
    out = []
    for upd in updates:
        if upd.modality == "image":
            full = upd.replacement

            def reduced(item_idx: int, full=full):
                tokens = full(item_idx)
                return tokens[: settings.quota(len(tokens))]

            upd = PromptReplacement(modality="image", target=upd.target, replacement=reduced)
        out.append(upd)
    return out


class VlmAccelQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        return _reduced_image_updates(updates, settings_from_config(self.info.get_hf_config(), auto="divprune"))


@MULTIMODAL_REGISTRY.register_processor(
    VlmAccelQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class VlmAccelQwen2_5_VLForConditionalGeneration(_Pruned, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with each image reduced to its quota; kept tokens keep their 3-D M-RoPE positions."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vlm_setup()

    def _vlm_items(self, image_input):
        grid = image_input["image_grid_thw"].tolist()
        m = self.config.vision_config.spatial_merge_size
        if image_input["type"] == "image_embeds":
            data, rows = image_input["image_embeds"], [t * h * w // (m * m) for t, h, w in grid]
        else:
            data, rows = image_input["pixel_values"], [t * h * w for t, h, w in grid]
        return [
            (_fingerprint(x), (h // m, w // m) if t == 1 else None)
            for x, (t, h, w) in zip(data.split(rows), grid, strict=True)
        ]

    def _vlm_encode(self, image_input):
        return [(f, None) for f in super()._process_image_input(image_input)]

    def _process_image_input(self, image_input):
        if self.vlm_settings.budget.is_full:
            return super()._process_image_input(image_input)
        return self._vlm_images(image_input)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        feats = sorted(mm_features, key=lambda f: f.mm_position.offset)
        full = []
        for _, t, h, w, t_factor in self.iter_mm_grid_thw(feats):
            grid = np.indices((t, h, w)).reshape(3, -1)
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).astype(np.int64)
            full.append(grid)
        return self._vlm_positions(input_tokens, feats, full)


# --- Qwen3-VL -------------------------------------------------------------------------------------------------------
class VlmAccelQwen3VLMultiModalProcessor(Qwen3VLMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        return _reduced_image_updates(updates, settings_from_config(self.info.get_hf_config(), auto="divprune"))


@MULTIMODAL_REGISTRY.register_processor(
    VlmAccelQwen3VLMultiModalProcessor, info=Qwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class VlmAccelQwen3VLForConditionalGeneration(_Pruned, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with each image reduced to its quota: the method sees the main features, the deepstack
    features (concatenated to them in vLLM's rows) are kept / merged in step; kept tokens keep their M-RoPE
    positions."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vlm_setup()

    _vlm_items = VlmAccelQwen2_5_VLForConditionalGeneration._vlm_items

    def _vlm_view(self, x):
        return x[:, : self.visual_dim]

    def _vlm_encode(self, image_input):
        return [(f, None) for f in super()._process_image_input(image_input)]

    def _process_image_input(self, image_input):
        if self.vlm_settings.budget.is_full:
            return super()._process_image_input(image_input)
        return self._vlm_images(image_input)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        m = self.config.vision_config.spatial_merge_size

        def n_full(f):
            if f.modality != "image" or f.data is None:
                return f.mm_position.length
            t, h, w = f.data["image_grid_thw"].data.tolist()
            return t * h * w // (m * m)

        return self._vlm_positions_from_full(input_tokens, mm_features, n_full, super().get_mrope_input_positions)
