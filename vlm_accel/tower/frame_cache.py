"""Frame cache for the vision encoder (STC-Cacher style): a frame whose pixels barely changed since the last
encoded frame reuses that frame's features instead of running the vision tower again.

Works at frame granularity (the unit every supported tower encodes independently: a Qwen temporal patch, a
LLaVA-OneVision frame). A reused frame gets the reference frame's features bit for bit. Per patch (the unchanged
patches of a frame reused, only the changed ones run through the tower): :class:`vlm_accel.tower.patch_cache.
PatchCache`, a subclass, for the LLaVA-family towers.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from dataclasses import dataclass, field

import torch

from ..adapters.base import call_arguments

logger = logging.getLogger(__name__)


def check_threshold(frame_cache) -> None:
    """``TypeError`` / ``ValueError`` naming ``frame_cache`` unless it is ``None`` or a finite number >= 0."""
    if frame_cache is None:
        return
    if isinstance(frame_cache, bool) or not isinstance(frame_cache, (int, float)):
        raise TypeError(
            f"frame_cache must be a number >= 0 (mean absolute pixel difference; 0.0: exact repeats) or None, "
            f"got {type(frame_cache).__name__} {frame_cache!r}"
        )
    if not math.isfinite(frame_cache) or frame_cache < 0:
        raise ValueError(f"frame_cache threshold must be a finite number >= 0 (0.0: exact repeats), got {frame_cache}")


def frames_match(a: torch.Tensor, b: torch.Tensor, threshold: float) -> bool:
    """Whether frame pixels ``b`` can stand for ``a``: same shape and mean absolute difference <= ``threshold``
    (``0.0``: exactly equal)."""
    if a.shape != b.shape:
        return False
    if threshold == 0.0:
        return torch.equal(a, b)
    return float((a.float() - b.float()).abs().mean()) <= threshold


@dataclass
class FrameStats:
    frames_in: int = 0
    frames_encoded: int = 0
    reused: list[list[bool]] = field(default_factory=list)  # per video, per unit: features taken from the cache


class FrameCache:
    """Wraps a model's ``get_video_features``.

    Args:
        adapter: the family adapter (``video_frames`` / ``encode_frames`` / ``assemble_video``).
        threshold: mean absolute difference of the (processor-normalised) pixels below which a frame reuses the
            features of the last encoded frame; ``0.0`` reuses only exact repeats.
    """

    def __init__(self, adapter, threshold: float = 0.0):
        if threshold < 0:
            raise ValueError(f"frame_cache threshold must be >= 0, got {threshold}")
        self.adapter = adapter
        self.threshold = float(threshold)
        self.stats = FrameStats()
        self._ref: tuple[torch.Tensor, object] | None = None  # (pixels, features) of the last encoded frame

    def reset(self) -> None:
        self._ref = None

    def wrap(self, orig):
        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def get_video_features(*args, **kwargs):
            call = call_arguments(sig, args, kwargs)
            videos = self.adapter.video_frames(call)
            self.stats = FrameStats()  # per call
            # plan: every frame either is encoded or points at an earlier encoded frame
            plan, todo, reused = [], [], []
            ref_pix, ref_slot = (self._ref[0], -1) if self._ref is not None else (None, None)
            for frames in videos:
                row, hits = [], []
                for frame in frames:
                    hit = ref_pix is not None and frames_match(frame.pixels, ref_pix, self.threshold)
                    if not hit:
                        todo.append(frame)
                        ref_pix, ref_slot = frame.pixels, len(todo) - 1
                    row.append(ref_slot)
                    hits.append(hit)
                plan.append(row)
                reused.append(hits)
            prev = self._ref[1] if self._ref is not None else None  # features of the reference from an earlier call
            encoded = self.adapter.encode_frames(orig, todo, call) if todo else []
            if todo:
                self._ref = (todo[-1].pixels, encoded[-1])
            per_video = [[encoded[i] if i >= 0 else prev for i in row] for row in plan]
            self.stats.frames_in = sum(len(r) for r in plan)
            self.stats.frames_encoded = len(todo)
            self.stats.reused = reused
            return self.adapter.assemble_video(per_video, call)

        return get_video_features
