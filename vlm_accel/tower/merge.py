"""Token merging inside the vision tower (ToMe, Bolya et al. 2023): ``tome_vit``.

Inside the tower's layers, between a layer's attention and its MLP (where ToMe merges), bipartite soft matching on
the layer's keys folds the ``r`` most redundant tokens of each view into their best partners (a size-weighted mean),
so that layer's MLP and every later layer run on fewer tokens, and what leaves the tower at the feature layer is the
budgeted count per image / crop. A merging layer is run as its two halves (``norm1`` / attention / layer scale and
``norm2`` / MLP / layer scale of the pre-norm CLIP / SigLIP / DINOv2 layer, :func:`layer_parts`); the others run
their own forward. Attention is *proportional*: a token
that stands for ``s`` patches gets ``+ log(s)`` on its attention logits (passed as an additive attention mask
through the layer's own attention interface, eager or SDPA), so it weighs as its members did.

The tower's outputs stay full length, because ``transformers`` scatters one feature per placeholder: every patch
position holds its group's value, the group's *representative* (the surviving token, which keeps its original
position) is marked ``alive`` in :class:`~vlm_accel.adapters.ImageInfo`, and the session drops the other positions
before the LLM. Layers before the feature layer hand the merged tokens themselves to the next layer (no round
trip through the full layout) unless the caller asked for every hidden state. A pre-LLM method can select further
among the alive tokens (``"tome_vit+visionzip"``), an in-LLM method prune inside the LLM (``"tome_vit+fastv"``).

What the model family must provide (its adapter's :meth:`~vlm_accel.adapters.Adapter.tower_spec`): the tower's
layers, their attention modules, the protected prefix tokens (CLS) and how features map to images. LLaVA-family
towers (CLIP, SigLIP, DINOv2) are supported; the Qwen-VL towers are refused (see their adapter).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters.base import TowerSpec
from ..methods.tome_vit import SCHEDULES, bipartite_round, merge_schedule, proportional_bias

logger = logging.getLogger(__name__)


# --- one tower forward ----------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """The merge state of one tower forward over ``B`` views of ``T`` tokens."""

    points: list[int]  # layers after which tokens merge
    feature: int  # first layer whose output is a feature: its input and outputs from there on are full length
    full: bool  # every layer's output full length (the caller asked for the hidden states)
    schedule: str
    budget: object  # Budget: what leaves the tower per view
    prefix: int  # tokens that never merge (CLS)
    dropped: int  # prefix tokens the features leave out
    plan: dict[int, int] = field(default_factory=dict)  # layer index -> tokens to remove after it
    group: torch.Tensor | None = None  # [B, T] current index of every original token
    rep: torch.Tensor | None = None  # [B, M] original index representing every current token (ascending)
    size: torch.Tensor | None = None  # [B, M]
    keys: torch.Tensor | None = None  # [B, M, C] the running layer's keys
    bias: torch.Tensor | None = None  # [B, 1, 1, M] log(size), kept until the next merge
    tokens: int = 0  # T
    layer_tokens: list[int] = field(default_factory=list)  # tokens per view entering each tower layer, in order
    mlp_tokens: list[int] = field(
        default_factory=list
    )  # tokens per view each layer's MLP ran on (fewer where it merged)
    mlp_share: float = 2 / 3  # the MLP's share of a layer's per-token matrix work (2 I / (4 C + 2 I))

    def start(self, hidden: torch.Tensor) -> None:
        """A new forward over ``hidden`` ``[B, T, C]``: plan the merges so that ``budget`` of the feature tokens
        (``T - dropped``) leaves the tower, the protected ones among them included."""
        bsz, t = hidden.shape[:2]
        dev = hidden.device
        self.tokens = t
        target = self.budget.visual_quota(t - self.dropped)
        keep = max(1, target - max(0, self.prefix - self.dropped))
        rs = merge_schedule(t - self.prefix, keep, len(self.points), self.schedule)
        self.plan = {p: r for p, r in zip(self.points, rs, strict=True) if r > 0}
        self.rep = torch.arange(t, device=dev).expand(bsz, t).contiguous()
        self.group = self.rep.clone()
        self.size = torch.ones(bsz, t, device=dev)

    @property
    def merged(self) -> bool:
        return self.rep is not None and self.rep.shape[1] < self.tokens

    def merge(self, y: torch.Tensor, r: int, heads: int) -> torch.Tensor:
        """Fold ``r`` tokens of ``y`` ``[B, M, C]`` (the layer's residual stream after its attention) in rounds of at
        most half the mergeable ones."""
        bsz, m, c = self.keys.shape
        metric = self.keys.view(bsz, m, heads, c // heads).mean(2)
        while r > 0:
            mergeable = y.shape[1] - self.prefix
            step = min(r, mergeable // 2)
            if step < 1:
                break
            y, metric, self.size, alive, into = bipartite_round(y, metric, self.size, step, self.prefix)
            self.bias = None
            new_pos = alive.long().cumsum(1) - 1
            self.group = new_pos.gather(1, into.gather(1, self.group))
            self.rep = self.rep.gather(1, alive.nonzero()[:, 1].view(bsz, -1))
            r -= step
        return y

    def proportional(self, dtype) -> torch.Tensor:
        """``[B, 1, 1, M]`` the proportional-attention bias of the current tokens (computed once per merge)."""
        if self.bias is None or self.bias.dtype != dtype:
            self.bias = proportional_bias(self.size, dtype)
        return self.bias

    @property
    def mean_layer_tokens(self) -> float:
        """Tokens per view averaged over the tower layers that ran, each layer's attention part (its entering tokens)
        and MLP part (its tokens after a merge) weighted by their per-token matrix work: what a layer's compute
        scales with."""
        if not self.layer_tokens:
            return float(self.tokens)
        a = 1 - self.mlp_share
        per = [a * t + self.mlp_share * m for t, m in zip(self.layer_tokens, self.mlp_tokens, strict=True)]
        return sum(per) / len(per)

    def alive(self) -> torch.Tensor:
        """``[B, T]`` True at every representative."""
        out = torch.zeros(self.rep.shape[0], self.tokens, dtype=torch.bool, device=self.rep.device)
        out.scatter_(1, self.rep, True)
        return out


def layer_parts(layer: nn.Module) -> tuple:
    """``(norm1, attention, norm2, mlp, scale1, scale2)`` of a pre-norm CLIP / SigLIP / DINOv2 encoder layer (the
    layer scales are DINOv2's, ``None`` elsewhere)."""
    attn = getattr(layer, "self_attn", None) or layer.attention
    norm1 = getattr(layer, "layer_norm1", None) or layer.norm1
    norm2 = getattr(layer, "layer_norm2", None) or layer.norm2
    return norm1, attn, norm2, layer.mlp, getattr(layer, "layer_scale1", None), getattr(layer, "layer_scale2", None)


def _attention_half(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """``x + attention(norm1(x))`` of ``layer`` (its own attention module, with the layer call's mask and
    arguments): the first half of the layer's forward, ``[B, M, C]``."""
    norm1, attn, _, _, scale1, _ = layer_parts(layer)
    mask = args[0] if args else kwargs.pop("attention_mask", None)
    a = attn(norm1(x), attention_mask=mask, **kwargs)[0]
    return x + (scale1(a) if scale1 is not None else a)


def _mlp_half(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x + mlp(norm2(x))`` of ``layer``: the second half of its forward, ``[B, M, C]``."""
    _, _, norm2, mlp, _, scale2 = layer_parts(layer)
    f = mlp(norm2(x))
    return x + (scale2(f) if scale2 is not None else f)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, N, C]``, ``idx`` ``[B, M]`` -> ``[B, M, C]``."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


@dataclass
class TowerMerge:
    """Merging installed on one tower: per-layer wrappers (through the session's ``patch``, so ``restore`` removes
    them), active only between :meth:`begin` and :meth:`end` (inside ``get_image_features``); any other call of the
    tower runs unchanged."""

    adapter: object
    spec: TowerSpec
    budget: object  # Budget: what leaves the tower per view
    schedule: str = "cubic"
    start: int = 0
    run: _Run | None = None
    last: _Run | None = None  # the last finished forward's state (its layer_tokens: what the layers ran on)

    @classmethod
    def install(cls, adapter, budget, options: dict, patch) -> TowerMerge:
        spec = adapter.tower_spec()
        self = cls(adapter, spec, budget, options.get("schedule", "cubic"), options.get("start", 0))
        for i, (layer, attn) in enumerate(zip(spec.layers, spec.attentions, strict=True)):
            patch(layer, "forward", self._wrap_layer(i, layer.forward, attn))
            patch(attn.k_proj, "forward", self._wrap_keys(attn.k_proj.forward))
        return self

    # per forward ---------------------------------------------------------------------------------------------------
    def begin(self, call: dict, modality: str) -> None:
        """Plan the merges of the coming tower forward (``call``: the ``get_image_features`` arguments)."""
        if modality != "image":
            raise ValueError(
                f"tome_vit merges tokens of images only: {self.adapter.family}'s video path pools each frame's tokens "
                "after the tower, which a merge inside the tower cannot follow; use a pre-LLM method for videos "
                "(e.g. method='visionzip')"
            )
        feat = self.adapter.tower_feature_layer(call)  # index of the first layer whose output becomes a feature
        if self.start > feat:
            raise ValueError(
                f"tome_vit: start={self.start} is past the layer whose output becomes the features ({feat}); "
                f"pass method_options={{'start': n}} with 0 <= n <= {feat}"
            )
        points = list(range(min(self.start, feat), feat)) or [feat]
        full = call.get("output_hidden_states") is True
        self.run = _Run(
            points, feat, full, self.schedule, self.budget, self.spec.prefix, self.adapter.tower_dropped(call)
        )
        fc1 = next(m for m in layer_parts(self.spec.layers[0])[3].modules() if isinstance(m, nn.Linear))
        c, inner = fc1.in_features, fc1.out_features
        self.run.mlp_share = 2 * inner / (4 * c + 2 * inner)

    def end(self) -> _Run | None:
        run, self.run = self.run, None
        if run is not None and run.rep is not None:
            run.keys = None
            self.last = run
        return run

    def fill_alive(self, run: _Run, infos: list, call: dict) -> None:
        """Mark in ``infos`` (one per image, from the adapter's ``describe``) the tokens that left the tower alive."""
        if run.rep is None:  # the tower never ran
            return
        views = run.alive()[:, run.dropped :]
        self.adapter.describe_alive(infos, views, call)

    # wrappers ------------------------------------------------------------------------------------------------------
    def _wrap_keys(self, orig):
        def forward(x):
            out = orig(x)
            if self.run is not None:
                self.run.keys = out
            return out

        return forward

    def _wrap_layer(self, i: int, orig, attn: nn.Module):
        layer = self.spec.layers[i]
        heads = getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads", None)
        if heads is None:
            heads = attn.config.num_attention_heads

        def forward(hidden_states, *args, **kwargs):
            run = self.run
            if run is None:
                return orig(hidden_states, *args, **kwargs)
            if i == 0 or run.rep is None:
                run.start(hidden_states)
            if run.merged:
                # a layer before returned the merged tokens themselves, or the full-length layout
                x = hidden_states if hidden_states.shape[1] < run.tokens else _gather(hidden_states, run.rep)
                bias = run.proportional(x.dtype)  # proportional attention: [B, 1, 1, M]
                given = args[0] if args else kwargs.get("attention_mask")
                if given is not None:  # an additive mask the tower passed: restricted to the current tokens
                    given = given.gather(-1, run.rep[:, None, None, :].expand(*given.shape[:-1], -1))
                    given = given.gather(-2, run.rep[:, None, :, None].expand(*given.shape[:-2], -1, given.shape[-1]))
                    bias = given + bias
                if args:
                    args = (bias, *args[1:])
                else:
                    kwargs["attention_mask"] = bias
            else:
                x = hidden_states
            run.layer_tokens.append(x.shape[1])
            r = run.plan.get(i, 0)
            if r:  # ToMe's placement: merge between the attention and the MLP (the MLP runs on the merged tokens)
                out = y = _mlp_half(layer, run.merge(_attention_half(layer, x, args, kwargs), r, heads))
            else:
                out = orig(x, *args, **kwargs)
                y = out[0] if isinstance(out, tuple) else out
            run.mlp_tokens.append(y.shape[1])
            if run.merged and (i + 1 >= run.feature or run.full):  # the feature layer's input too (CLS attention)
                y = _gather(y, run.group)  # full length: every position holds its group's value
            return (y, *out[1:]) if isinstance(out, tuple) else y

        return forward


__all__ = ["SCHEDULES", "TowerMerge", "TowerSpec", "bipartite_round", "merge_schedule", "proportional_bias"]
