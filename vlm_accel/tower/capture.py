"""The vision side of a request: what the tower reported, for the stages after it.

:class:`TowerCapture` wraps the model's ``get_image_features`` / ``get_video_features`` / ``get_placeholder_mask``.
During one forward it records, per modality, each input's layout (:class:`~vlm_accel.adapters.ImageInfo`, from the
family adapter: segments, grids, structural tokens, CLS attention when the method needs importance) and the
placeholder mask, runs a tower merge / steering / frame cache around the tower when the session has one, and hands
all of it over once (:meth:`take`) when the language model consumes it. :meth:`clear` drops it (a failed request).
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, field

import torch

from ..adapters import Adapter, ImageInfo
from ..adapters.base import call_arguments, cls_attention
from ..control.controller import TowerChoice


@dataclass
class Pending:
    """What the vision side of one forward reported: per modality (``"image"``, ``"video"``) the layouts of its
    inputs in placeholder order and the ``[B, L]`` placeholder mask."""

    infos: dict[str, list[ImageInfo]] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    encode_ms: float = 0.0  # the vision tower's time in this forward
    tower: TowerChoice | None = None  # the merge chosen for this request's tower (latency_ms steering a tome_vit)

    def ready(self) -> list[str]:
        return [m for m in self.masks if self.infos.get(m)]


def expand_infos(infos: list[ImageInfo], mask: torch.Tensor) -> list[ImageInfo] | None:
    """Layouts in the placeholder order of ``mask`` ``[B, L]``, or ``None`` if they cannot fit it.

    ``generate(num_beams=k)`` / ``num_return_sequences=k`` encodes each prompt's images once, then repeats the prompt
    rows ``k`` times (``repeat_interleave``) and each prompt's group of images with them; the same
    :class:`ImageInfo` objects are repeated here, so the copies of a prompt are reduced once and identically (beam
    search reorders cache rows among them)."""
    total = sum(i.n_tokens for i in infos)
    counts = mask.sum(1).tolist()
    if sum(counts) == total:
        return infos
    if total == 0 or sum(counts) % total or len(counts) % (sum(counts) // total):
        return None
    k = sum(counts) // total
    out, it = [], iter(infos)
    for start in range(0, len(counts), k):
        group, need = [], counts[start]
        if counts[start : start + k] != [need] * k:
            return None
        while need > 0:
            info = next(it, None)
            if info is None:
                return None
            group.append(info)
            need -= info.n_tokens
        if need:
            return None
        out += group * k
    return out if next(it, None) is None else None


class TowerCapture:
    """Records the vision side of each request for one session.

    Args:
        adapter: the family adapter (``describe`` / ``describe_video`` / ``placeholder_masks`` / ``importance_layer``).
        importance: collect the tower's CLS attention (the pre-LLM method needs ``"importance"``).
        tower: a merge inside the vision tower (:class:`~vlm_accel.tower.merge.TowerMerge`), or ``None``.
        steering: chooses that merge per request for a latency target
            (:class:`~vlm_accel.tower.steering.TowerSteering`), or ``None``.
        frame_cache: wraps ``get_video_features`` (:mod:`vlm_accel.tower.frame_cache`), or ``None``.
    """

    def __init__(self, adapter: Adapter, importance: bool, tower=None, steering=None, frame_cache=None):
        self.adapter, self.importance = adapter, importance
        self.tower, self.steering, self.frame_cache = tower, steering, frame_cache
        self.pending = Pending()
        self.encoding = False  # inside the tower (e.g. Qwen3-VL's get_video_features calls get_image_features)

    def install(self, patch) -> None:
        inner = self.adapter.inner
        patch(inner, "get_image_features", self._wrap_features(inner.get_image_features, "image"))
        if hasattr(inner, "get_video_features"):
            video = inner.get_video_features
            if self.frame_cache is not None:
                video = self.frame_cache.wrap(video)
            patch(inner, "get_video_features", self._wrap_features(video, "video"))
        patch(inner, "get_placeholder_mask", self._wrap_placeholder_mask(inner.get_placeholder_mask))

    def take(self) -> Pending:
        """What the vision side reported since the last take; the capture starts empty again."""
        pending, self.pending = self.pending, Pending()
        return pending

    def clear(self) -> None:
        self.pending = Pending()
        self.encoding = False

    def _wrap_features(self, orig, modality: str):
        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def get_features(*args, **kwargs):
            if self.encoding:  # e.g. Qwen3-VL's get_video_features calls get_image_features
                return orig(*args, **kwargs)
            call = call_arguments(sig, args, kwargs)
            layer = self.adapter.importance_layer(call) if self.importance else None
            captured = {}
            handle = None
            if layer is not None:

                def grab(mod, a, kw):
                    captured["hidden"] = a[0] if a else kw["hidden_states"]

                handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
            returns = kwargs.get("return_dict")
            if returns is None:  # the decorator's default: the config's return_dict
                returns = getattr(getattr(orig, "__self__", self.adapter.inner).config, "return_dict", True)
            tuple_out = returns is False  # computed as a dict, handed back as the caller's tuple
            if tuple_out:
                kwargs = dict(kwargs, return_dict=True)
            self.encoding = True
            t0 = time.perf_counter()
            try:
                if self.steering is not None:  # latency_ms: this request's merge, chosen before the tower runs
                    self.pending.tower = self.steering.before_tower(call)
                if self.tower is not None:  # merging inside the vision tower, for this call only
                    self.tower.begin(call, modality)
                out = orig(*args, **kwargs)
            finally:
                self.encoding = False
                run = self.tower.end() if self.tower is not None else None
                if handle is not None:
                    handle.remove()
            cls_attn = None
            if "hidden" in captured:
                with torch.no_grad():
                    cls_attn = cls_attention(layer, captured["hidden"])
            self.pending.encode_ms += (time.perf_counter() - t0) * 1e3
            feats = out.pooler_output if hasattr(out, "pooler_output") else out[-1]
            describe = self.adapter.describe if modality == "image" else self.adapter.describe_video
            infos = describe(list(feats), call, cls_attn)
            if run is not None:
                self.tower.fill_alive(run, infos, call)
            self.pending.infos.setdefault(modality, []).extend(infos)
            return out.to_tuple() if tuple_out else out

        return get_features

    def _wrap_placeholder_mask(self, orig):
        @functools.wraps(orig)
        def get_placeholder_mask(*args, **kwargs):
            returned = orig(*args, **kwargs)
            self.pending.masks.update(self.adapter.placeholder_masks(returned, kwargs))
            return returned

        return get_placeholder_mask
