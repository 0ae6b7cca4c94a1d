"""KV eviction presses: one small class per rule, a ``score()`` to override (shaped like NVIDIA kvpress's).

A press scores every cached entry of one layer, per KV head; the lowest scores are evicted, the same number per row
and head. Scores that need attention come from :func:`vlm_accel.llm.attention.row_attention` (a few query rows
recomputed from the layer's own projections and rotary embedding, against the cached keys), so every press works
under ``eager``, ``sdpa`` and flash attention alike.

Presses are pure functions of tensors plus their options; :mod:`vlm_accel.kv.compress` applies them to a model
(after prefill, and during decoding for ``kv_max``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import methods
from ..kernels import max_min_select
from ..llm.attention import attention_probs, row_attention
from ..methods import register

TEXT_BONUS = 1e4  # vision-aware: every text entry outranks every visual one


@dataclass
class PressInput:
    """What a press may look at for one layer.

    Attributes:
        attn: the layer's attention module.
        hidden: ``[B, L, D]`` the attention input of the prompt (after the input norm), or ``None`` while decoding.
        position_embeddings: ``(cos, sin)`` for ``hidden``'s positions, or ``None``.
        keys: ``[B, H_kv, L, hd]`` cached post-rotary keys.
        values: ``[B, H_kv, L, hd]`` cached values.
        valid: ``[B, L]`` False for padding entries (never kept over a real one).
        visual: ``[B, L]`` True for visual entries, or ``None`` (text-only models).
        query: ``[B, H, q, hd]`` post-rotary queries of the current decoding step, or ``None``.
        keep: ``[B]`` entries each row will keep, or ``None`` (unknown: the score must rank every entry).
    """

    attn: torch.nn.Module
    hidden: torch.Tensor | None
    position_embeddings: tuple | None
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor | None = None
    query: torch.Tensor | None = None
    keep: torch.Tensor | None = None


def _per_kv_head(probs: torch.Tensor, h_kv: int) -> torch.Tensor:
    """``[B, H, R, L]`` -> ``[B, H_kv, L]``: mean over query rows and the heads of each group."""
    b, h, r, n = probs.shape
    return probs.view(b, h_kv, h // h_kv, r, n).mean(dim=(2, 3))


def window_attention(inp: PressInput, window: int) -> torch.Tensor:
    """``[B, H_kv, L]``: attention the last ``window`` prompt tokens pay each entry (prefill), or the attention of
    the current step's queries (decoding)."""
    h_kv, n = inp.keys.shape[1], inp.keys.shape[2]
    if inp.query is not None:
        probs = attention_probs(inp.query, inp.keys, inp.attn.scaling, inp.valid[:, None, :].bool())
        return _per_kv_head(probs, h_kv)
    w = min(window, n)
    rows = torch.arange(n - w, n, device=inp.keys.device).expand(inp.keys.shape[0], w)
    probs = row_attention(inp.attn, inp.hidden, inp.position_embeddings, rows, inp.valid, keys=inp.keys)
    return _per_kv_head(probs, h_kv)


class Press:
    """Base class: ``score(inp) -> [B, H_kv, L]``; higher stays. ``needs_attention`` presses recompute query rows."""

    name = ""
    needs_attention = False

    def score(self, inp: PressInput) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"


class SnapKVPress(Press):
    """SnapKV: the observation window (the last ``window`` prompt tokens, i.e. the question) votes with its attention,
    smoothed over neighbouring entries (``kernel``); the window itself is always kept."""

    name = "snapkv"
    needs_attention = True

    def __init__(self, window: int = 32, kernel: int = 5):
        if window < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"snapkv: window >= 1 and an odd kernel >= 1 required; got {window=}, {kernel=}")
        self.window, self.kernel = window, kernel

    def score(self, inp: PressInput) -> torch.Tensor:
        s = _pool(window_attention(inp, self.window), self.kernel)
        if inp.query is None:  # prefill: keep the observation window
            s[..., -min(self.window, s.shape[-1]) :] = float("inf")
        return s


class H2OPress(Press):
    """Heavy hitters (H2O / TOVA): entries that received the most attention, summed over the last ``window``
    prompt rows at prefill (TOVA: ``window=1``) and over every decoding step since (accumulated). At prefill the
    share ``recent`` of the quota goes to the most recent prompt entries (H2O's split: half heavy hitters, half
    recent; ``0``: TOVA), so a question at the end of the prompt is kept."""

    name = "h2o"
    needs_attention = True
    accumulates = True

    def __init__(self, window: int = 1, recent: float = 0.5):
        if window < 1 or not 0.0 <= recent <= 1.0:
            raise ValueError(f"h2o: window >= 1 and recent in [0, 1] required; got {window=}, {recent=}")
        self.window, self.recent = window, recent

    def score(self, inp: PressInput) -> torch.Tensor:
        s = window_attention(inp, self.window)
        if inp.query is None and inp.keep is not None and self.recent > 0:
            n = s.shape[-1]
            n_recent = (inp.keep.float() * self.recent).round().long().to(s.device)  # [B]
            recent = torch.arange(n, device=s.device)[None, :] >= n - n_recent[:, None]  # [B, L] (left padding)
            s = s.masked_fill(recent[:, None, :], float("inf"))
        return s


class StreamingPress(Press):
    """StreamingLLM: the first ``sinks`` entries (attention sinks) and the most recent ones; no attention needed."""

    name = "streaming"

    def __init__(self, sinks: int = 4):
        if sinks < 0:
            raise ValueError(f"streaming: sinks must be >= 0, got {sinks}")
        self.sinks = sinks

    def score(self, inp: PressInput) -> torch.Tensor:
        b, h, n = inp.keys.shape[:3]
        valid = inp.valid.bool()
        rank = valid.long().cumsum(1) - 1  # index among the row's real entries
        s = torch.arange(n, device=valid.device, dtype=torch.float32).expand(b, n).clone()
        s[(rank < self.sinks) & valid] = float("inf")
        return s[:, None, :].expand(b, h, n).clone()


class VisionAwarePress(Press):
    """Keeps the text and spends the eviction on visual entries, keeping their coverage of the image.

    After prefill, per row and KV head: every text entry is kept; of the visual entries still within the quota, the
    share ``relevant`` goes to those the observation window attends to most (SnapKV's score: when the question is in
    the prompt, the entries it asks about), the rest to coverage: greedy max-min selection on the keys (each next
    pick is the visual key farthest, in cosine distance, from every visual key picked so far; DivPrune's rule,
    :func:`vlm_accel.kernels.max_min_select`). Attention concentrates on a few regions (and, with the question not
    yet asked, on the wrong ones); coverage keeps a little of everything the image shows.

    Without a quota or visual positions (decoding under ``kv_max``, text-only models) it ranks by SnapKV's score,
    text first.
    """

    name = "vision"
    needs_attention = True

    def __init__(self, relevant: float = 0.25, window: int = 32, kernel: int = 5):
        if not 0.0 <= relevant <= 1.0:
            raise ValueError(f"vision: relevant must be a share in [0, 1], got {relevant}")
        self.relevant = relevant
        self.snapkv = SnapKVPress(window, kernel)

    def score(self, inp: PressInput) -> torch.Tensor:
        if inp.visual is None or inp.keep is None or inp.query is not None:
            s = self.snapkv.score(inp)
            if inp.visual is None:
                return s
            finite = torch.nan_to_num(s, posinf=TEXT_BONUS / 2).clamp(-TEXT_BONUS / 2, TEXT_BONUS / 2)
            return finite + (~inp.visual.bool()).float()[:, None, :] * TEXT_BONUS
        b, h, n = inp.keys.shape[:3]
        relevance = window_attention(inp, self.snapkv.window)  # [B, H_kv, L], the window not protected
        relevance = _pool(relevance, self.snapkv.kernel)
        valid, visual = inp.valid.bool(), inp.visual.bool()
        # integer tiers (exact in fp32): text by relevance (2n, 3n] > relevant visual picks (n, 2n]
        # > coverage picks [1, n] > the other visual entries by relevance [-n, 0)
        rank = relevance.argsort(-1).argsort(-1).to(relevance.dtype)  # [B, H_kv, L] 0 = least relevant
        out = torch.where(visual[:, None, :], rank - n, rank + 2 * n + 1)
        for r in range(b):
            vis = (visual[r] & valid[r]).nonzero()[:, 0]  # [Nv] positions of the row's visual entries
            text = int((valid[r] & ~visual[r]).sum())
            k_vis = min(max(int(inp.keep[r]) - text, 0), vis.numel())
            k_rel = round(self.relevant * k_vis)
            picked = torch.zeros(h, vis.numel(), dtype=torch.bool, device=vis.device)  # [H_kv, Nv]
            if k_rel:
                top = relevance[r][:, vis].topk(k_rel, dim=-1).indices  # [H_kv, k_rel], best first
                picked.scatter_(1, top, True)
                out[r].scatter_(1, vis[top], _descending(2 * n, k_rel, h, out))
            if k_vis > k_rel:
                x = inp.keys[r][:, vis].float()  # [H_kv, Nv, hd]
                order = max_min_select(x, k_vis - k_rel, init=picked if k_rel else None)  # [H_kv, k], pick order
                out[r].scatter_(1, vis[order], _descending(n, k_vis - k_rel, h, out))
        return out


def _pool(s: torch.Tensor, kernel: int) -> torch.Tensor:
    """``[B, H, L]`` averaged over ``kernel`` neighbouring entries (SnapKV's smoothing)."""
    if kernel <= 1:
        return s
    b, h, n = s.shape
    return F.avg_pool1d(s.reshape(b * h, 1, n), kernel, stride=1, padding=kernel // 2).view(b, h, n)


def _descending(top: int, k: int, heads: int, like: torch.Tensor) -> torch.Tensor:
    """``[heads, k]`` scores ``top, top - 1, ...``: the i-th pick outranks the next."""
    return (top - torch.arange(k, dtype=like.dtype, device=like.device)).expand(heads, k).contiguous()


for _press in (SnapKVPress, H2OPress, StreamingPress, VisionAwarePress):  # the one registry, stage "kv"
    register(_press.name, stage="kv", description=(_press.__doc__ or "").split("\n")[0])(_press)

#: The registered presses by name (a view of the registry's ``"kv"`` stage at import).
PRESSES = {n: methods.get(n, ("kv",)).fn for n in methods.names("kv")}


def get_press(name_or_press) -> Press:
    """A press instance from a registered name (``"snapkv"``, ``"h2o"``, ``"streaming"``, ``"vision"``) or a
    :class:`Press`."""
    if isinstance(name_or_press, Press):
        return name_or_press
    if not isinstance(name_or_press, str) or name_or_press not in methods.names("kv"):
        raise ValueError(f"unknown KV press {name_or_press!r}; available: {methods.names('kv')} or a Press instance")
    return methods.get(name_or_press, ("kv",)).fn()


def select(scores: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries to keep, the same count per head of a row, left-padded across rows.

    Args:
        scores: ``[B, H_kv, L]`` (higher stays).
        valid: ``[B, L]`` False for padding entries (evicted first).
        keep: ``[B]`` entries each row keeps (``<=`` its valid entries).
    Returns:
        ``index [B, H_kv, K]`` (ascending positions per head; padding slots first, pointing at entry 0) and
        ``valid [B, K]`` (False for the padding slots), ``K = keep.max()``.
    """
    b, h, n = scores.shape
    k = int(keep.max())
    s = scores.float().masked_fill(~valid.bool()[:, None, :], float("-inf"))
    top = s.topk(k, dim=-1).indices  # [B, H, K], best first
    rank = torch.arange(k, device=scores.device)
    kept = rank[None, None, :] < keep.to(scores.device)[:, None, None]
    order = torch.where(kept, top, torch.full_like(top, -1)).sort(dim=-1).values
    new_valid = rank[None, :] >= (k - keep.to(scores.device))[:, None]
    return order.clamp_min(0), new_valid


def quota(n_valid: torch.Tensor, kv) -> torch.Tensor:
    """``[B]`` entries kept per row: a fraction of the row's valid entries (at least one) or a count."""
    if isinstance(kv, float):
        return torch.clamp((n_valid.float() * kv).round().long(), min=1).minimum(n_valid)
    return torch.clamp(n_valid, max=int(kv))
