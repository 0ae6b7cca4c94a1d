"""Per-patch frame cache for the vision tower (STC-Cacher style): a frame reuses the features of the patches that
did not change since a *key frame* and runs the tower only on the changed ones.

Every frame is compared patch by patch (the tower's ``patch_size`` cells of the processor-normalised pixels, mean
absolute difference) with the key frame, the last frame the tower encoded in full:

- no patch changed by more than ``threshold``: the frame reuses the key frame's features bit for bit (as
  :class:`~vlm_accel.tower.frame_cache.FrameCache` does for a whole frame);
- at most ``max_changed`` of the patches changed (and ``threshold > 0``): a *partial* frame. In every tower layer
  only the changed tokens (and the CLS token, whose value depends on every patch) are computed: their queries attend
  to the key frame's cached keys / values at the unchanged positions and to their own at the changed ones; the
  unchanged tokens take the key frame's layer output. Projections, MLP and attention queries cost in proportion to
  the changed patches;
- otherwise the frame is encoded in full and becomes the new key frame.

``threshold=0.0`` changes nothing: only frames whose pixels are exactly the key frame's are reused (bit-identical
features, as the whole-frame cache) and every other frame is encoded in full — a partial frame is an approximation
(an unchanged patch of the full tower would attend to the changed ones), so it needs a positive threshold. Partial
frames always refer to a fully encoded key frame, so errors do not accumulate along the clip. How coarse the
approximation is depends on the tower and the scene: on the embedded default's DINOv2 tower and synthetic clips on
plain backgrounds, a shape appearing in 10 patches moves the other patches' hidden states by ~26 % after one layer
(they attend to it), so a partial frame's features can be far from the full tower's (``eval/results/patch_cache.*``).

Where it works: the LLaVA-family towers (CLIP, SigLIP, DINOv2: pre-norm layers with ``q/k/v`` projections) on the
LLaVA-OneVision video path (every frame through the tower independently). Memory: the key frame's keys, values and
output of every layer (``3 * layers * tokens * width`` floats). The Qwen-VL towers attend over all frames' patches at
once (with windows in Qwen2.5-VL) and are refused.

Without :func:`vlm_accel.accelerate` (its ``frame_cache`` takes the whole-frame cache)::

    with PatchCache.attach(model, threshold=0.05) as cache:   # wraps model.model.get_video_features
        model.generate(**video_inputs)
    cache.stats   # frames_in, frames_encoded, frames_partial, patches_in, patches_encoded
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters.base import Frame, call_arguments
from .frame_cache import FrameCache, FrameStats
from .merge import layer_parts

logger = logging.getLogger(__name__)

PATCH_TOWERS = ("clip_vision_model", "siglip_vision_model", "dinov2")


def patch_diff(a: torch.Tensor, b: torch.Tensor, patch: int) -> torch.Tensor:
    """``[C, H, W]`` frames -> ``[(H / patch) * (W / patch)]`` mean absolute difference per patch, in the tower's
    token order (row-major)."""
    c, h, w = a.shape
    d = (a.float() - b.float()).abs().view(c, h // patch, patch, w // patch, patch)
    return d.mean(dim=(0, 2, 4)).reshape(-1)


@dataclass
class PatchStats(FrameStats):
    frames_partial: int = 0  # frames encoded on their changed patches only (counted in frames_encoded)
    patches_in: int = 0
    patches_encoded: int = 0  # patches that ran through the tower's layers (all of a full frame)


@dataclass
class _Key:
    """A fully encoded key frame: its pixels, its feature object (the adapter's) and per layer its attention keys,
    values (``[T, C]``, after the projections) and output ``[T, C]``."""

    pixels: torch.Tensor
    features: object = None
    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


@dataclass
class _Job:
    """One row of the tower batch: a key frame (``key is None``) or a partial frame (its key and changed tokens)."""

    pixels: torch.Tensor
    key: _Key | None = None
    changed: torch.Tensor | None = None  # [c] token indices (CLS included)
    own: _Key | None = None  # the key state this row fills (full frames)


def partial_layer(layer: nn.Module, x: torch.Tensor, key_k, key_v, key_out, idx: torch.Tensor) -> torch.Tensor:
    """One encoder layer for one frame whose tokens ``idx`` changed.

    Args:
        x: ``[T, C]`` the frame's layer input (only rows ``idx`` are read).
        key_k, key_v, key_out: ``[T, C]`` the key frame's attention keys / values and output at this layer.
        idx: ``[c]`` the changed tokens.
    Returns:
        ``[T, C]``: the key frame's output with rows ``idx`` computed — their queries attend to the key frame's
        keys / values at the other positions and to their own at ``idx``.
    """
    norm1, attn, norm2, mlp, scale1, scale2 = layer_parts(layer)
    out_proj = getattr(attn, "out_proj", None) or attn.o_proj
    t, c = key_k.shape
    head_dim = getattr(attn, "head_dim", None) or c // attn.num_heads
    heads = c // head_dim
    scale = getattr(attn, "scaling", None) or getattr(attn, "scale", None) or head_dim**-0.5
    h = x[idx]
    n1 = norm1(h)
    k, v = key_k.index_copy(0, idx, attn.k_proj(n1)), key_v.index_copy(0, idx, attn.v_proj(n1))
    q = attn.q_proj(n1).view(-1, heads, head_dim).transpose(0, 1)  # [H, c, d]
    a = torch.nn.functional.scaled_dot_product_attention(
        q, k.view(t, heads, head_dim).transpose(0, 1), v.view(t, heads, head_dim).transpose(0, 1), scale=scale
    )
    a = out_proj(a.transpose(0, 1).reshape(-1, c))
    h = h + (scale1(a) if scale1 is not None else a)
    f = mlp(norm2(h))
    h = h + (scale2(f) if scale2 is not None else f)
    return key_out.index_copy(0, idx, h.to(key_out.dtype))


class PatchCache(FrameCache):
    """Wraps a LLaVA-OneVision model's ``get_video_features`` (like :class:`FrameCache`), per patch.

    Args:
        adapter: the family adapter (``video_frames`` / ``encode_frames`` / ``assemble_video`` and its ``tower``).
        threshold: mean absolute difference of a patch's (processor-normalised) pixels at or below which it counts
            as unchanged; ``0.0``: only exact repeats of the key frame are reused, nothing is approximated.
        max_changed: largest share of changed patches a partial frame may have; a frame with more is encoded in
            full and becomes the key frame.
    """

    def __init__(self, adapter, threshold: float = 0.0, max_changed: float = 0.25):
        super().__init__(adapter, threshold)
        if not 0.0 <= max_changed <= 1.0:
            raise ValueError(f"patch cache: max_changed is a share of the patches in [0, 1], got {max_changed}")
        if not getattr(adapter, "has_video", False):
            raise ValueError(f"patch cache: {adapter.family} has no video input path")
        vcfg = adapter.model.config.vision_config
        if vcfg.model_type not in PATCH_TOWERS or not hasattr(adapter, "tower"):
            raise ValueError(
                f"patch cache: the tower must be one of {', '.join(PATCH_TOWERS)} (frames encoded independently); "
                f"this model's is {vcfg.model_type!r} — use the whole-frame cache (frame_cache=...)"
            )
        from ..adapters.base import encoder_layers

        self.max_changed = float(max_changed)
        self.patch = vcfg.patch_size
        self.prefix = 1 if vcfg.model_type in ("clip_vision_model", "dinov2") else 0
        self.layers = list(encoder_layers(adapter.tower))
        self.stats = PatchStats()
        self._key: _Key | None = None
        self._jobs: list[_Job] | None = None  # rows of the tower batch being encoded

    def reset(self) -> None:
        self._key = None

    @classmethod
    @contextlib.contextmanager
    def attach(cls, model, threshold: float = 0.0, max_changed: float = 0.25):
        """Wrap ``model``'s ``get_video_features`` on the instance for the ``with`` block (restored after)."""
        from ..adapters import adapter_for

        adapter = adapter_for(model)
        self = cls(adapter, threshold, max_changed)
        inner = adapter.inner
        if "get_video_features" in vars(inner):
            raise RuntimeError("get_video_features is already overridden on the instance (an accelerate session?)")
        inner.get_video_features = self.wrap(inner.get_video_features)
        try:
            yield self
        finally:
            del inner.get_video_features

    # --- planning -----------------------------------------------------------------------------------------------
    def _plan(self, videos) -> tuple[list[list], list[_Job]]:
        """Per video, per frame: a :class:`_Job` index (encoded) or a :class:`_Key` (reused); and the jobs."""
        plan, jobs = [], []
        key = self._key
        n_patches = None
        for frames in videos:
            row = []
            for frame in frames:
                pix = frame.pixels
                n_patches = (pix.shape[-2] // self.patch) * (pix.shape[-1] // self.patch)
                changed = None
                if key is not None and key.pixels.shape == pix.shape:
                    if self.threshold == 0.0:
                        changed = None if not torch.equal(pix, key.pixels) else torch.zeros(0, dtype=torch.long)
                    else:
                        moved = patch_diff(pix, key.pixels, self.patch) > self.threshold
                        if float(moved.float().mean()) <= self.max_changed:
                            changed = moved.nonzero().view(-1) + self.prefix
                if changed is not None and changed.numel() == 0:
                    row.append(key)  # nothing changed: the key frame's features
                elif changed is not None:
                    idx = torch.cat([torch.arange(self.prefix), changed]).to(pix.device)
                    jobs.append(_Job(pix, key=key, changed=idx))
                    row.append(len(jobs) - 1)
                else:
                    key = _Key(pix)
                    jobs.append(_Job(pix, own=key))
                    row.append(len(jobs) - 1)
            plan.append(row)
        stats = PatchStats()
        stats.frames_in = sum(len(r) for r in plan)
        stats.frames_encoded = len(jobs)
        stats.frames_partial = sum(j.own is None for j in jobs)
        stats.patches_in = stats.frames_in * (n_patches or 0)
        stats.patches_encoded = sum(
            (n_patches or 0) if j.own is not None else j.changed.numel() - self.prefix for j in jobs
        )
        self.stats = stats
        return plan, jobs

    # --- the wrapper --------------------------------------------------------------------------------------------
    def wrap(self, orig):
        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def get_video_features(*args, **kwargs):
            call = call_arguments(sig, args, kwargs)
            plan, jobs = self._plan(self.adapter.video_frames(call))
            encoded = []
            if jobs:
                with self._layers_partial(jobs):
                    encoded = self.adapter.encode_frames(orig, [Frame(j.pixels) for j in jobs], call)
                for job, feats in zip(jobs, encoded, strict=True):
                    if job.own is not None:
                        job.own.features = feats
                last_key = next((j.own for j in reversed(jobs) if j.own is not None), None)
                if last_key is not None:
                    self._key = last_key
            per_video = [[encoded[x] if isinstance(x, int) else x.features for x in row] for row in plan]
            return self.adapter.assemble_video(per_video, call)

        return get_video_features

    @contextlib.contextmanager
    def _layers_partial(self, jobs: list[_Job]):
        """Wrap the tower's layers (on the instance, for this call) so the rows of partial frames compute only their
        changed tokens, and capture the key frames' per-layer keys / values / outputs."""
        full = [i for i, j in enumerate(jobs) if j.own is not None]
        part = [i for i, j in enumerate(jobs) if j.own is None]
        saved, handles = [], []
        grabbed: dict[str, torch.Tensor] = {}

        def grab(name):
            def hook(mod, args, out):
                grabbed[name] = out

            return hook

        for li, layer in enumerate(self.layers):
            attn = layer_parts(layer)[1]
            handles.append(attn.k_proj.register_forward_hook(grab("k")))
            handles.append(attn.v_proj.register_forward_hook(grab("v")))
            previous = vars(layer).get("forward")
            saved.append((layer, previous))
            layer.forward = self._layer_forward(li, layer, layer.forward, jobs, full, part, grabbed)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for layer, previous in saved:
                if previous is None:
                    del layer.forward
                else:
                    layer.forward = previous

    def _layer_forward(self, li, layer, orig, jobs, full, part, grabbed):
        def forward(hidden_states, *args, **kwargs):
            if (
                hidden_states.shape[0] != len(jobs)
                or any(torch.is_tensor(a) for a in args)
                or (kwargs.get("attention_mask") is not None)
            ):
                raise RuntimeError("patch cache: the tower was called with a batch or mask it did not plan for")
            out = hidden_states.new_empty(hidden_states.shape)
            rest = ()
            if full:
                grabbed.clear()
                res = orig(hidden_states[full] if part else hidden_states, *args, **kwargs)
                y = res[0] if isinstance(res, tuple) else res
                rest = res[1:] if isinstance(res, tuple) else ()
                out[full] = y
                for r, i in enumerate(full):
                    key = jobs[i].own
                    key.keys.append(grabbed["k"][r])
                    key.values.append(grabbed["v"][r])
                    key.outputs.append(y[r])
            with torch.no_grad():
                for i in part:
                    key = jobs[i].key
                    out[i] = partial_layer(
                        layer, hidden_states[i], key.keys[li], key.values[li], key.outputs[li], jobs[i].changed
                    )
            return (out, *rest) if rest else out

        return forward


__all__ = ["PATCH_TOWERS", "PatchCache", "PatchStats", "partial_layer", "patch_diff"]
