"""Pruning inside the language model (FastV / PyramidDrop) under any attention implementation.

At a stage layer ``l`` the visual tokens are ranked by the attention layer ``l - 1`` pays them from the last prompt
token(s) (recomputed for those rows only, :func:`vlm_accel.llm.attention.row_attention`), and only the top ones go on to
layers ``l..``. The decoder layers are wrapped on the instance: from the first stage on, each layer receives the
hidden states, attention mask and rotary embeddings of its own (shorter) layout, so every layer's KV cache holds
exactly the tokens that layer processed and every kept token keeps its original position. During decoding the
caller's mask is mapped to each layer's cache the same way (dynamic and static caches).

Layouts here are in the coordinates of the sequence the language model receives (after any pre-LLM reduction).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from ..methods import Context, Method
from ..methods.inllm import stage_layers, stage_quota
from .attention import row_attention
from .layout import cache_arg, compose, decode_mask, gather_mask, reduced_layout, slots, take


@dataclass
class LMSegment:
    """One budgeted group of visual tokens (an image, crop or frame) as the language model sees it.

    Attributes:
        row: batch row.
        pos: ``[n]`` its positions in the language model's input sequence.
        final: tokens it keeps after the last stage.
    """

    row: int
    pos: torch.Tensor
    final: int


@dataclass
class _Run:
    """One prefill's stages and, afterwards, what decoding needs."""

    segments: list[LMSegment]
    layout: tuple[torch.Tensor, torch.Tensor]  # current (index [B, n], valid [B, n]) into the LM input
    vis: torch.Tensor  # [B, L] visual positions of the LM input
    n0: int  # LM input length
    replay: list | None = None  # stage layouts to reuse instead of scoring
    stages: list = field(default_factory=list)  # per stage (layer, index, valid)
    scores: torch.Tensor | None = None  # [B, n] pending attention scores for the next stage
    seg_pos: list = field(default_factory=list)  # per segment, its positions in the current layout
    cache: weakref.ref | None = None
    decoding: bool = False
    input_layout: tuple | None = None
    cache_valid: dict = field(default_factory=dict)  # layer -> [B, n] validity of its cached prompt entries

    def layout_of(self, layer: int):
        """The layout layer ``layer`` processed (``None``: the whole input)."""
        found = None
        for start, idx, valid in self.stages:
            if start <= layer:
                found = (idx, valid)
        return found


class LLMStages:
    """The stages of an in-LLM method on one language model. ``remove()`` takes the forward pre-hooks off;
    instance attribute patches go through the session's ``patch`` (undone by ``Session.restore``)."""

    def __init__(self, method: Method, options: dict, lm: nn.Module, patch, scoring: list[int] | None = None):
        self.method = method
        self.options = options
        self.layers = lm.layers
        self.starts = stage_layers(method.name, options, len(self.layers), scoring)
        # hybrid decoders: layers without attention (linear attention: a recurrent state) get a 2-D padding mask
        self.recurrent = set() if scoring is None else set(range(len(self.layers))) - set(scoring)
        sched = options.get("schedule")
        self.ratios = [float(r) for _, r in sched] if sched is not None else None
        self.run: _Run | None = None  # the run the current forward belongs to
        self.last: _Run | None = None  # the last prefill, for decoding and replays
        self._hooks = []
        for i in range(self.starts[0], len(self.layers)):
            patch(self.layers[i], "forward", self._wrap_layer(self.layers[i].forward, i))
        for s in self.starts:
            attn = self.layers[s - 1].self_attn
            self._hooks.append(attn.register_forward_pre_hook(self._score_hook(), with_kwargs=True))
        if hasattr(lm, "_deepstack_process"):  # Qwen3-VL injects features at visual positions of early layers
            patch(lm, "_deepstack_process", self._wrap_deepstack(lm._deepstack_process))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.run = self.last = None

    # --- per forward --------------------------------------------------------------------------------------------
    def begin_prefill(self, segments: list[LMSegment], valid: torch.Tensor, vis: torch.Tensor, replay: bool = False):
        """Before a prefill forward. ``valid`` ``[B, L]``: non-padding positions of the LM input; ``vis`` ``[B, L]``:
        its visual positions. ``replay``: the input is the last prefill's plus tokens appended at the end (``generate``
        without cache): reuse its stages instead of scoring again."""
        bsz, n0 = valid.shape
        rows, shortest = self.options.get("rows", 1), int(valid.sum(1).min())
        if rows > shortest:
            raise ValueError(
                f"{self.method.name}: rows={rows} scoring rows, but the shortest prompt of this batch has {shortest} "
                f"tokens; pass method_options={{'rows': n}} with n <= {shortest} (FastV's default: 1)"
            )
        idx = torch.arange(n0, device=valid.device).expand(bsz, n0)
        stages = None
        if replay and self.last is not None:
            grow = n0 - self.last.n0
            stages = []
            for start, sidx, svalid in self.last.stages:
                new = torch.arange(self.last.n0, n0, device=sidx.device).expand(bsz, grow)
                stages.append((start, torch.cat([sidx, new], 1), torch.cat([svalid, svalid.new_ones(bsz, grow)], 1)))
        self.run = _Run(segments, (idx, valid.bool()), vis.bool(), n0, replay=stages)
        self.run.input_layout = self.run.layout
        self.run.seg_pos = [s.pos for s in segments]

    def begin_decode(self, cache) -> None:
        """Before a decoding forward: continue the last prefill if ``cache`` is its cache, else run unchanged."""
        last = self.last
        if last is not None and last.cache is not None and last.cache() is cache:
            last.decoding = True
            self.run = last
        else:
            self.run = None

    def end(self, out) -> _Run | None:
        """After a forward: remember a prefill's cache for decoding. Returns the prefill's run (``None`` else)."""
        run, self.run = self.run, None
        if run is None or run.decoding:
            return None
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        run.cache = weakref.ref(cache) if cache is not None else None
        self.last = run
        return run

    def visual_per_layer(self, run: _Run) -> list[int]:
        """Visual tokens each layer processed (summed over the batch)."""
        counts = []
        for i in range(len(self.layers)):
            idx, valid = run.layout_of(i) or run.input_layout
            counts.append(int((run.vis.gather(1, idx) & valid).sum()))
        return counts

    # --- stage selection ----------------------------------------------------------------------------------------
    def _select(self, run: _Run, stage: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept slots ``(index [B, n'], valid [B, n'])`` into the current layout, from ``run.scores``."""
        idx, valid = run.layout
        keep = valid & ~(run.vis.gather(1, idx) & valid)  # structural visual tokens (newlines) go at the first stage
        scores = run.scores
        for pos, seg in zip(run.seg_pos, run.segments, strict=True):
            n = pos.numel()
            k = stage_quota(seg.pos.numel(), seg.final, stage, len(self.starts), self.ratios)
            k = min(n, k)
            if k >= n:
                keep[seg.row, pos] = True
                continue
            ctx = Context(importance=scores[seg.row, pos])
            red = self.method(hidden[seg.row, pos], k, ctx)
            keep[seg.row, pos[red.keep]] = True
        inner = reduced_layout(keep)
        where = slots(inner[0], keep.shape[1]).masked_fill(~keep, -1)  # each kept old slot's new slot
        pairs = zip(run.seg_pos, run.segments, strict=True)
        run.seg_pos = [where[seg.row, pos][keep[seg.row, pos]] for pos, seg in pairs]
        return inner

    def _score_hook(self):
        def hook(attn, args, kwargs):
            run = self.run
            if run is None or run.decoding or run.replay is not None:
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            rows = self.options.get("rows", 1)
            n = hidden.shape[1]
            row_idx = torch.arange(n - rows, n, device=hidden.device).expand(hidden.shape[0], rows)
            probs = row_attention(attn, hidden, kwargs["position_embeddings"], row_idx, key_valid=run.layout[1])
            run.scores = probs.mean(dim=(1, 2))  # [B, n]: head- and row-averaged attention received
            return None

        return hook

    # --- wrapped decoder layers -----------------------------------------------------------------------------------
    def _wrap_layer(self, orig, i: int):
        @functools.wraps(orig)
        def forward(hidden_states, *args, **kwargs):
            run = self.run
            if run is None or args:
                return orig(hidden_states, *args, **kwargs)
            cache = cache_arg(kwargs)
            if run.decoding:
                return orig(hidden_states, **self._decode_kwargs(run, i, kwargs, cache, hidden_states.shape[1]))
            if i in self.starts:
                stage = self.starts.index(i) + 1
                if run.replay is not None:
                    _, sidx, svalid = run.replay[stage - 1]
                    inner = _relative(run.layout[0], sidx, svalid)
                else:
                    inner = self._select(run, stage, hidden_states)
                hidden_states = take(hidden_states, inner[0])
                run.layout = compose(run.layout, inner)
                run.stages.append((i, *run.layout))
            idx, valid = run.layout
            kw = dict(kwargs)
            mask = kwargs.get("attention_mask")
            if i in self.recurrent:  # a [B, L] padding mask (or None) for the recurrent state
                kw["attention_mask"] = None if mask is None and bool(valid.all()) else _padding(mask, idx, valid)
            else:
                width = _static_width(cache, i, mask)
                kw["attention_mask"] = gather_mask(mask, idx, valid, width=width)
            if kwargs.get("position_embeddings") is not None:
                kw["position_embeddings"] = tuple(take(p, idx) for p in kwargs["position_embeddings"])
            if torch.is_tensor(kwargs.get("position_ids")):
                kw["position_ids"] = take(kwargs["position_ids"], idx)
            return orig(hidden_states, **kw)

        return forward

    def _decode_kwargs(self, run: _Run, i: int, kwargs: dict, cache, q: int) -> dict:
        lay = run.layout_of(i)
        if lay is None or i in self.recurrent:  # a recurrent state holds no entries to mask
            return kwargs
        valid = run.cache_valid.get(i, lay[1])  # KV eviction may have shortened this layer's prompt entries
        layer_cache = cache.layers[i] if cache is not None and hasattr(cache, "layers") else None
        held = int(layer_cache.get_seq_length()) if layer_cache is not None else 0
        extra = held - valid.shape[1] + q  # decoded entries in this layer's cache after this step
        kw = dict(kwargs)
        width = _static_width(cache, i, kwargs.get("attention_mask"))
        kw["attention_mask"] = decode_mask(kwargs.get("attention_mask"), valid, extra, q, width=width)
        return kw

    def _wrap_deepstack(self, orig):
        @functools.wraps(orig)
        def deepstack(hidden_states, visual_pos_masks, visual_embeds):
            run = self.run
            if run is None or visual_pos_masks is None or hidden_states.shape[1] == visual_pos_masks.shape[1]:
                return orig(hidden_states, visual_pos_masks, visual_embeds)
            idx, valid = run.layout
            vpm = visual_pos_masks.to(idx.device)
            full = visual_embeds.new_zeros(*vpm.shape, visual_embeds.shape[-1])
            full[vpm] = visual_embeds
            new_vpm = vpm.gather(1, idx) & valid
            return orig(hidden_states, new_vpm, take(full, idx)[new_vpm])

        return deepstack


def _padding(mask, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` 0/1 padding mask of the kept slots for a recurrent (linear-attention) layer."""
    if torch.is_tensor(mask) and mask.dim() == 2:
        return mask.gather(1, idx) * valid.to(mask.dtype)
    return valid.long()


def _relative(cur_idx: torch.Tensor, stage_idx: torch.Tensor, stage_valid: torch.Tensor):
    """A stage layout (indices into the LM input) as indices into the current layout ``cur_idx`` ``[B, n]``."""
    n0 = int(max(cur_idx.max(), stage_idx.max())) + 1
    return slots(cur_idx, n0).gather(1, stage_idx).clamp_min(0), stage_valid  # padding slots: any valid index


def _static_width(cache, i: int, mask) -> int | None:
    """Key width of a static cache layer's mask (its full length), ``None`` for growing caches."""
    layer = cache.layers[i] if cache is not None and hasattr(cache, "layers") and i < len(cache.layers) else None
    if layer is None or getattr(layer, "max_cache_len", None) is None:
        return None
    return mask.shape[-1] if torch.is_tensor(mask) else int(layer.max_cache_len)
