"""What every family adapter provides, and the helpers shared by adapters.

An adapter knows one model family: where the vision tower and the language model are, how the image features of
one image are laid out (segments, grids, structural tokens such as newlines), and how to read the placeholder mask.
The patching machinery itself (:mod:`vlm_accel.api`) is family-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Segment:
    """A group of visual tokens that shares one quota: an image, a crop grid or a frame.

    Attributes:
        idx: ``[n]`` indices of the segment's tokens within its image's token sequence (raster order).
        grid: ``(h, w)`` layout of those tokens, or ``None``.
        units: how many images/crops/frames the segment counts as for integer budgets.
    """

    idx: torch.Tensor
    grid: tuple[int, int] | None = None
    units: int = 1
    frames: int = 1


@dataclass
class ImageInfo:
    """Layout of one image's tokens in the LLM sequence.

    Tokens of the image that belong to no segment (e.g. LLaVA-NeXT newline tokens) are structural: kept when the
    image is not reduced, dropped when it is.

    Attributes:
        n_tokens: number of placeholder tokens of the image.
        segments: the budgeted groups.
        importance: ``[n_tokens]`` vision-tower importance per token (``nan`` for structural tokens), or ``None``.
        frames: for a video, its number of frames (then ``segments`` are its frames, in order).
        alive: ``[n_tokens]`` bool, the tokens that left the vision tower as themselves when token merging inside the
            tower folded the others into them (their features then stand for the merged group), or ``None``. Only
            alive tokens reach the language model; a pre-LLM method selects further among them.
    """

    n_tokens: int
    segments: list[Segment] = field(default_factory=list)
    importance: torch.Tensor | None = None
    frames: int = 1
    alive: torch.Tensor | None = None


@dataclass
class Frame:
    """One independently encoded unit of a video: its pixels and what the adapter needs to encode it alone."""

    pixels: torch.Tensor
    meta: object = None


@dataclass
class TowerSpec:
    """What the adapter tells about a vision tower.

    Attributes:
        layers: the tower's transformer layers, in order (each called as ``layer(hidden [B, T, C], mask, ...)``).
        attentions: per layer, its attention module (``k_proj`` and ``num_heads`` / ``head_dim`` read from it).
        prefix: tokens at the front of every view that never merge (CLS), ``0`` for towers without one.
    """

    layers: list[nn.Module]
    attentions: list[nn.Module]
    prefix: int


class Adapter:
    """Base class. Subclasses set ``family`` and ``model_classes`` and implement :meth:`describe`."""

    family: str = ""
    model_classes: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.inner = model.model

    # --- where things are -------------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.inner.language_model

    def placeholder_masks(self, returned, kwargs: dict) -> dict[str, torch.Tensor]:
        """``{modality: [B, L] mask}`` from what ``get_placeholder_mask`` returned. Families with videos return
        ``(image_mask, video_mask)`` and are called once per modality (with ``image_features`` or
        ``video_features``)."""
        if not isinstance(returned, tuple):
            return {"image": returned[..., 0]}
        out = {}
        if kwargs.get("image_features") is not None:
            out["image"] = returned[0][..., 0]
        if kwargs.get("video_features") is not None:
            out["video"] = returned[1][..., 0]
        return out

    @property
    def layer_types(self) -> list[str]:
        """Per decoder layer, its kind (``"full_attention"``, ``"sliding_attention"``, ``"linear_attention"`` ...)
        from the text config, ``"full_attention"`` for every layer when the config does not say."""
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n = len(self.language_model.layers)
        types = getattr(text, "layer_types", None)
        return list(types) if types is not None and len(types) == n else ["full_attention"] * n

    @property
    def scoring_layers(self) -> list[int] | None:
        """Decoder layers whose attention can score tokens (``None``: every layer); hybrid decoders: the full- and
        sliding-attention ones (a linear-attention layer has a recurrent state, no attention rows)."""
        types = self.layer_types
        if "linear_attention" not in types:
            return None
        return [i for i, t in enumerate(types) if t != "linear_attention"]

    def refuse_hybrid(self, what: str, kinds: tuple[str, ...] = ("linear_attention",)) -> None:
        """``ValueError`` when the decoder has layers of ``kinds`` (linear attention: a recurrent state, no KV cache;
        sliding attention: a windowed cache), which ``what`` cannot handle yet; names the layers that can."""
        types = self.layer_types
        odd = sorted({t for t in types if t in kinds})
        if odd:
            full = [i for i, t in enumerate(types) if t == "full_attention"]
            raise ValueError(
                f"{what} is not supported on {self.family}'s decoder yet: it has {' and '.join(odd)} layers (only "
                f"layers {full} are full attention); pre-LLM methods work on it (e.g. 'divprune')"
            )

    # --- importance evidence ----------------------------------------------------------------------------------
    def importance_layer(self, call: dict) -> nn.Module | None:
        """The vision-encoder layer whose CLS attention scores the tokens (its input is captured during the vision
        forward), or ``None`` when the tower has no CLS token."""
        return None

    # --- layout -----------------------------------------------------------------------------------------------
    def describe(self, features: list[torch.Tensor], call: dict, cls_attn: torch.Tensor | None) -> list[ImageInfo]:
        """One :class:`ImageInfo` per image.

        Args:
            features: per-image features ``[n_i, D]`` as ``get_image_features`` returned them.
            call: the arguments ``get_image_features`` was called with.
            cls_attn: ``[num_views, N_patches]`` CLS attention of every view the tower saw, or ``None``.
        """
        raise NotImplementedError

    def describe_video(self, features: list[torch.Tensor], call: dict, cls_attn: torch.Tensor | None):
        """One :class:`ImageInfo` per video (``frames`` set, one segment per frame)."""
        raise NotImplementedError(f"{type(self).__name__} has no video path")

    # --- token merging inside the vision tower (``tome_vit``, :mod:`vlm_accel.tower.merge`) --------------------
    def tower_spec(self):
        """The vision tower's layers, attention modules and protected prefix (a
        :class:`TowerSpec`); ``ValueError`` when the family's tower cannot merge tokens."""
        raise ValueError(f"tome_vit: merging inside the vision tower is not available for {self.family}")

    def tower_feature_layer(self, call: dict) -> int:
        """Index of the first tower layer whose output becomes image features (merging must be done by then)."""
        raise NotImplementedError

    def tower_dropped(self, call: dict) -> int:
        """Tokens at the front of every view that the features leave out (CLS under the ``default`` strategy)."""
        return 0

    def describe_alive(self, infos: list[ImageInfo], views: torch.Tensor, call: dict) -> None:
        """Set ``info.alive`` of every image from ``views`` ``[num_views, n_feat]`` (True: a merged group's
        representative), laid out as the features are."""
        raise NotImplementedError

    # --- frame cache: split a get_video_features call into independently encoded frames and back -------------
    has_video = False

    def video_frames(self, call: dict) -> list[list]:
        """Per video, its frames as :class:`Frame` objects."""
        raise NotImplementedError

    def encode_frames(self, orig, frames: list, call: dict) -> list:
        """Run the original ``get_video_features`` on ``frames`` as independent one-frame videos; one feature
        object per frame."""
        raise NotImplementedError

    def assemble_video(self, per_video: list[list], call: dict):
        """The ``get_video_features`` output for the call, from per-frame feature objects."""
        raise NotImplementedError


def frame_segments(n_frames: int, grid: tuple[int, int], device, offset: int = 0) -> list[Segment]:
    """Consecutive per-frame segments of ``h * w`` tokens each, starting at ``offset``."""
    hw = grid[0] * grid[1]
    return [Segment(torch.arange(offset + t * hw, offset + (t + 1) * hw, device=device), grid) for t in range(n_frames)]


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The list of transformer layers of a vision tower (CLIP, SigLIP, DINOv2 layouts)."""
    for path in ("encoder.layers", "encoder.layer", "vision_model.encoder.layers", "blocks"):
        mod = tower
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList):
            return mod
    raise TypeError(f"cannot find the encoder layers of {type(tower).__name__}")


def cls_attention(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention of the CLS query over the patch keys, recomputed from the layer input.

    Works with any attention implementation (only a q-row and the keys are computed, no eager attention needed).

    Args:
        layer: a CLIP or DINOv2 encoder layer.
        hidden: ``[B, 1 + N, C]`` the layer's input hidden states (CLS first).
    Returns:
        ``[B, N]`` attention from CLS to each patch token (CLS column dropped).
    """
    norm = getattr(layer, "layer_norm1", None) or layer.norm1
    attn = getattr(layer, "self_attn", None) or layer.attention
    x = norm(hidden)
    q = attn.q_proj(x[:, :1])
    k = attn.k_proj(x)
    hd = attn.head_dim
    b, t, c = k.shape
    q = q.view(b, 1, c // hd, hd).transpose(1, 2).float()  # [B, H, 1, hd]
    k = k.view(b, t, c // hd, hd).transpose(1, 2).float()  # [B, H, T, hd]
    att = torch.softmax(q @ k.transpose(-1, -2) * hd**-0.5, dim=-1)  # [B, H, 1, T]
    return att.mean(1)[:, 0, 1:]


def feature_layer_index(n_layers: int, vision_feature_layer) -> int:
    """Encoder layer whose output is ``hidden_states[vision_feature_layer]`` (the last one for a list)."""
    f = vision_feature_layer[-1] if isinstance(vision_feature_layer, (list, tuple)) else vision_feature_layer
    return f % (n_layers + 1) - 1


def call_arguments(sig, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call to a wrapped model method as one dict (``sig``: its ``inspect.signature``; ``**kwargs``
    passed through it are flattened in): what the adapters' ``call`` parameters read."""
    call = sig.bind_partial(*args, **kwargs).arguments
    call.update(call.pop("kwargs", {}))
    return call
