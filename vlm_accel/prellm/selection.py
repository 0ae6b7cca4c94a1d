"""The pre-LLM stage: a method chooses, per image / crop / frame, which visual tokens reach the language model.

One :class:`Selection` per session. Per request it takes what the vision side reported (the inputs' layouts,
:class:`~vlm_accel.adapters.ImageInfo`, and their placeholder masks), asks the controller for each segment's quota,
runs the registered reducer (:mod:`vlm_accel.methods`, batched over equal-sized segments) and marks the kept
positions of the ``[B, L]`` sequence; merging methods also return the weights that fold dropped tokens into kept ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..adapters import ImageInfo, Segment
from ..control.budget import Budget
from ..control.controller import Controller
from ..llm.layout import slots
from ..llm.stages import LMSegment
from ..methods import Context, Method
from ..methods.batch import reduce_segments


@dataclass
class Replay:
    """The last prefill's choice, for forwards that re-run its prompt without re-encoding the images."""

    mask: torch.Tensor  # [B, L] visual placeholders
    keep: torch.Tensor  # [B, L] kept positions (padding not yet dropped)
    merges: list
    embeds: torch.Tensor  # [B, L, D] the prefill's embeddings (detached reference, compared only on replay)

    def matches(self, mask: torch.Tensor, embeds: torch.Tensor) -> bool:
        """Same rows, same placeholders first, no new ones after, same visual embeddings."""
        b, n = self.mask.shape
        if mask.shape[0] != b or mask.shape[1] < n or bool(mask[:, n:].any()):
            return False
        if not torch.equal(mask[:, :n], self.mask.to(mask.device)):
            return False
        vis = self.mask.to(embeds.device)
        return torch.equal(embeds[:, :n][vis], self.embeds.to(embeds.device)[vis])


@dataclass
class Encoded:
    """One image through :meth:`Session.encode_images` with ``detailed=True``."""

    features: torch.Tensor  # [K, D] kept (or merged) tokens in original order
    index: torch.Tensor  # [K] their places among the image's tokens (a merged token: its representative's)
    deepstack: list[torch.Tensor]  # per deepstack layer [K, D] (Qwen3-VL), else empty


def budget_segments(info: ImageInfo, video: str, method: Method) -> list[Segment]:
    """The segments of ``info`` that each get a quota: its per-frame segments, or one clip segment when the budget
    is per clip (``video == "clip"``) or ``method`` works across frames (``"clip"`` in its needs).

    A clip segment counts as one unit for a per-clip budget and as one unit per frame otherwise."""
    per_clip = video == "clip"
    if info.frames < 2 or len(info.segments) < 2 or not (per_clip or "clip" in method.needs):
        return info.segments
    return [
        Segment(
            torch.cat([s.idx for s in info.segments]),
            info.segments[0].grid,
            units=1 if per_clip else sum(s.units for s in info.segments),
            frames=info.frames,
        )
    ]


def apply_merges(x: torch.Tensor, merges) -> torch.Tensor:
    """Write merged values into ``x`` ``[B, L, D]`` at the kept positions (returns a copy if anything merges)."""
    if not merges:
        return x
    x = x.clone()
    for r, c, sr, sc, w in merges:
        x[r, c] = (w.float() @ x[sr, sc].float()).to(x.dtype)
    return x


def take_parts(x: torch.Tensor, parts, order: torch.Tensor) -> torch.Tensor:
    """``x`` ``[n, D]`` (one input's tokens, or a per-token tensor beside them) -> ``[K, D]``: what
    :meth:`Selection.reduce` ``parts`` keep or merge, in original token order (``order`` sorts the kept indices)."""
    vals = [x[k] if w is None else (w.float() @ x[i].float()).to(x.dtype) for i, k, w in parts]
    return torch.cat(vals)[order]


class Selection:
    """The pre-LLM method of a session and its per-request state (the quotas of the last prefill, its replay).

    Args:
        method: the pre-LLM method (a keep-all stand-in when the session has none).
        budget: its per-segment budget.
        video: ``Budget.video`` (``"frame"`` or ``"clip"``).
        steered: ``(stage name, budget)`` of the stage a total target steers.
        controller: turns targets into quotas per request.
        seed: seed of stochastic methods.
    """

    def __init__(self, method: Method, budget: Budget, video: str, steered, controller: Controller, seed: int = 0):
        self.method, self.budget, self.video = method, budget, video
        self.steered = steered
        self.controller = controller
        self.generator = torch.Generator().manual_seed(seed)
        self.quotas: dict[int, list[int]] = {}  # id(info) -> per-segment quotas of the last prefill
        self.replay: Replay | None = None

    def clear(self) -> None:
        self.quotas = {}
        self.replay = None

    def segments(self, info: ImageInfo) -> list[Segment]:
        return budget_segments(info, self.video, self.method)

    def alive_segments(self, info: ImageInfo) -> list[Segment]:
        """The budgeted segments of ``info``, restricted to the tokens a tower merge left (``info.alive``)."""
        segments = self.segments(info)
        if info.alive is None:
            return segments
        alive = info.alive.to(segments[0].idx.device) if segments else info.alive
        return [dataclasses.replace(s, idx=s.idx[alive[s.idx]]) for s in segments]

    def select(self, embeds, masks: dict, pending, attn, keep: torch.Tensor, merges: list):
        """Run the method on every segment of every input (per modality, ``pending.infos[m]`` are the inputs behind
        ``masks[m]``, in placeholder order), under the quotas the controller sets; returns the controller's plan.

        Marks kept positions in ``keep`` ``[B, L]`` and appends merge ops ``(rows, cols, src_rows, src_cols,
        weights [K, n])`` to ``merges``, to be applied to any per-position tensor (:func:`apply_merges`)."""
        located = []  # per input in placeholder order: (modality, number, info, rows [n], cols [n], features [n, D])
        for m, mask in masks.items():
            rows, cols = mask.nonzero(as_tuple=True)
            feats = embeds[mask]  # [N, D] in placeholder order
            off = 0
            for j, info in enumerate(pending.infos[m]):
                sl = slice(off, off + info.n_tokens)
                off += info.n_tokens
                located.append((m, j, info, rows[sl], cols[sl], feats[sl]))
        # generate's copies of one prompt share its infos: allocated and reduced once (the first copy), same result
        distinct: dict[int, tuple] = {}
        for x in located:
            distinct.setdefault(id(x[2]), x)
        self.quotas = self.controller.quotas(
            list(distinct.values()), self.alive_segments, self.steered, pending.encode_ms, attn, masks, pending.tower
        )
        pre_quotas = self.quotas if self.steered[0] == "pre-LLM" else {}
        done: dict[int, list | None] = {}
        for m, _, info, r, c, feats in located:
            if id(info) not in done:
                query = _query(embeds, masks[m], attn, int(r[0])) if "query" in self.method.needs else None
                done[id(info)] = self.reduce(feats, info, query, pre_quotas.get(id(info)))
            parts = done[id(info)]
            if parts is None:
                keep[r, c] = True  # nothing to reduce: structural tokens stay too
                continue
            for idx, kept, weights in parts:
                keep[r[kept], c[kept]] = True
                if weights is not None:
                    merges.append((r[kept], c[kept], r[idx], c[idx], weights))
        return self.controller.plan

    def reduce(self, x: torch.Tensor, info: ImageInfo, query: torch.Tensor | None = None, quotas=None):
        """Apply the method to each segment of one input ``x`` ``[n_tokens, D]`` (``quotas``: per segment, from the
        controller; ``None``: each segment's own budget).

        Returns ``None`` when the budget keeps everything, else per segment ``(idx [n], kept [K], weights [K, n] |
        None)`` with indices into ``x``. Tokens a tower merge folded away (``info.alive``) never reach the method."""
        segments = self.alive_segments(info)
        if quotas is None:
            quotas = [self.budget.visual_quota(s.idx.numel(), s.units) for s in segments]
        if info.alive is None and all(q >= s.idx.numel() for q, s in zip(quotas, segments, strict=True)):
            return None
        todo = [i for i, (q, s) in enumerate(zip(quotas, segments, strict=True)) if q < s.idx.numel()]
        imp = None if info.importance is None else info.importance.to(x.device)
        idxs = [s.idx.to(x.device) for s in segments]
        ctxs = [
            Context(
                grid=segments[i].grid,
                frames=segments[i].frames,
                importance=None if imp is None else imp[idxs[i]],
                query=query,
                generator=self.generator,
            )
            for i in todo
        ]
        found = reduce_segments(self.method, [x[idxs[i]] for i in todo], [quotas[i] for i in todo], ctxs)
        reds = dict(zip(todo, found, strict=True))
        parts = []
        for i, idx in enumerate(idxs):
            red = reds.get(i)
            parts.append((idx, idx, None) if red is None else (idx, idx[red.keep], red.weights))
        return parts

    def encode(self, features, infos: list[ImageInfo], deep: list) -> list[Encoded]:
        """Per image, its reduced features (``features``: per image ``[n_i, D]``; ``deep``: per deepstack layer, per
        image ``[n_i, D]``)."""
        result = []
        for j, (f, info) in enumerate(zip(features, infos, strict=True)):
            parts = self.reduce(f, info)
            if parts is None:
                result.append(Encoded(f, torch.arange(f.shape[0], device=f.device), [d[j] for d in deep]))
                continue
            kept = torch.cat([k for _, k, _ in parts])
            order = kept.argsort()
            result.append(
                Encoded(take_parts(f, parts, order), kept[order], [take_parts(d[j], parts, order) for d in deep])
            )
        return result

    def lm_segments(self, masks, infos, keep, index, valid, llm_budget: Budget) -> list[LMSegment]:
        """The budgeted segments (image / crop / frame) of every row, at their kept positions in the language
        model's input, with the in-LLM stage's final quota."""
        seq = keep.shape[1]
        where = slots(index, seq).masked_fill(~keep, -1)
        slot_ok = torch.zeros_like(keep)
        slot_ok.scatter_(1, index, valid)
        out = []
        for m, mask in masks.items():
            rows, cols = mask.nonzero(as_tuple=True)
            off = 0
            for info in infos[m]:
                r, c = rows[off : off + info.n_tokens], cols[off : off + info.n_tokens]
                off += info.n_tokens
                alloc = self.quotas.get(id(info)) if self.steered[0] == "in-LLM" else None
                for j, seg in enumerate(self.segments(info)):
                    sr, sc = r[seg.idx.to(r.device)], c[seg.idx.to(c.device)]
                    ok = (where[sr, sc] >= 0) & slot_ok[sr, sc]
                    pos = where[sr, sc][ok]
                    if pos.numel():
                        final = llm_budget.visual_quota(pos.numel(), seg.units)
                        if alloc is not None:
                            final = min(final, alloc[j])
                        out.append(LMSegment(int(sr[0]), pos, final))
        return out


def _query(embeds, mask, attn, row: int) -> torch.Tensor:
    """``[T, D]`` the text-token embeddings of one prompt row (the question, for ``"query"`` methods)."""
    text = ~mask[row]
    if attn is not None:
        text &= attn[row].bool()
    return embeds[row][text]
