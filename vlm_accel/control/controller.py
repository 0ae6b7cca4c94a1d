"""One budget controller: user-level targets (tokens, latency, memory) become per-input token quotas.

The controller answers two questions for every prefill:

1. **How many visual tokens may this prompt row keep in total?** ``Budget(tokens=)`` says it directly;
   ``latency_ms=`` through the calibrated cost model (the vision tower's time of this very request is measured, the
   language model's prefill time is predicted from the calibration); ``memory_gb=`` through the KV bytes per token of
   the model's config and an estimate of the prefill activations. Several targets: the strictest wins.
2. **Where do those tokens go?** :func:`allocate` splits a total over the row's images, anyres crops and video frames
   by their information (:func:`information`: feature spread, times what changed since the previous frame), at least
   one token each, never more than a segment has, summing exactly to the total.

Fractions and counts (``Budget(visual=...)``) still give every segment its own quota; a total target caps them.
What was chosen and why is recorded in a :class:`Plan` (``session.plan``, printable).
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .calibration import CostModel, TowerCost

logger = logging.getLogger("vlm_accel")


def information(x: torch.Tensor, previous: torch.Tensor | None = None) -> float:
    """How much a segment's tokens say: ``x`` ``[N, D]`` features, ``previous`` ``[M, D]`` the previous frame's.

    Spread of the token directions (``1 - |mean of unit vectors|``: 0 when every token is the same, near 1 for
    diverse content) times, for a video frame after the first, how much changed: the mean cosine distance of each
    token to the same place in the previous frame (``M == N``), or to its nearest token there (held frames of other
    sizes); 0 for a frame where nothing changed. Returned as a Python float in [0, 1]."""
    u = torch.nn.functional.normalize(x.detach().float(), dim=-1)
    spread = float(1.0 - u.mean(0).norm().clamp(max=1.0))
    if previous is None or previous.shape[-1] != x.shape[-1] or previous.numel() == 0:
        return spread
    v = torch.nn.functional.normalize(previous.detach().float(), dim=-1)
    sim = (u * v).sum(-1) if v.shape == u.shape else (u @ v.T).amax(-1)
    change = float((1.0 - sim).clamp(min=0.0, max=1.0).mean())
    return spread * change


def allocate(total: int, sizes: list[int], weights: list[float], floor: int = 1) -> list[int]:
    """Split ``total`` tokens over segments of ``sizes`` tokens in proportion to ``weights``.

    Every segment gets at least ``min(floor, size)`` and at most ``size``; the quotas sum exactly to
    ``min(total, sum(sizes))`` (``ValueError`` when ``total`` cannot give every segment its floor). Water-filling:
    shares above a segment's size are capped and the rest redistributed; integer rounding by largest remainder."""
    if len(sizes) != len(weights):
        raise ValueError(f"allocate: {len(sizes)} sizes and {len(weights)} weights")
    floors = [min(floor, s) for s in sizes]
    if total < sum(floors):
        raise ValueError(f"a total of {total} tokens cannot give {len(sizes)} inputs {floor} token(s) each")
    total = min(total, sum(sizes))
    share = [float(f) for f in floors]
    room = [s - f for s, f in zip(sizes, floors, strict=True)]
    left = float(total - sum(floors))
    w = [max(float(x), 0.0) if math.isfinite(x) else 0.0 for x in weights]
    if sum(w[i] for i in range(len(w)) if room[i] > 0) <= 0:
        w = [1.0] * len(w)  # no information anywhere: an even split
    active = [i for i in range(len(sizes)) if room[i] > 0]
    while left > 1e-9 and active:
        wsum = sum(w[i] for i in active) or float(len(active))
        capped = []
        for i in active:
            give = left * (w[i] / wsum if wsum else 1.0 / len(active))
            if give >= room[i]:
                capped.append(i)
        if not capped:
            for i in active:
                give = left * (w[i] / wsum)
                share[i] += give
                room[i] -= give
            left = 0.0
            break
        for i in capped:
            share[i] += room[i]
            left -= room[i]
            room[i] = 0.0
        active = [i for i in active if room[i] > 0 and w[i] > 0] or [i for i in active if room[i] > 0]
    out = [int(math.floor(s + 1e-9)) for s in share]
    rest = total - sum(out)
    order = sorted(range(len(out)), key=lambda i: (share[i] - out[i], w[i]), reverse=True)
    for i in order:
        if rest <= 0:
            break
        if out[i] < sizes[i]:
            out[i] += 1
            rest -= 1
    return out


@dataclass
class PlanEntry:
    """One budgeted input of a prompt row: an image, a crop or a frame."""

    row: int
    input: str  # e.g. "image 0", "image 1 crop 3", "video 0 frame 5"
    tokens_in: int
    kept: int
    weight: float  # information weight the split used (nan without a total target)
    stage: str  # "pre-LLM" / "in-LLM"


@dataclass
class Plan:
    """What the controller chose for the last prefill and why. ``str(plan)`` is a table."""

    entries: list[PlanEntry] = field(default_factory=list)
    totals: dict[int, int] = field(default_factory=dict)  # row -> visual tokens allowed in total
    reasons: list[str] = field(default_factory=list)
    kv_bits: int = 16
    kv_max: int | None = None
    predicted_ms: float | None = None
    kv_bytes_limit: int | None = None

    def __str__(self) -> str:
        lines = [f"plan: KV {self.kv_bits}-bit" + (f", at most {self.kv_max} entries per layer" if self.kv_max else "")]
        lines += [f"  {r}" for r in self.reasons]
        if self.predicted_ms is not None:
            lines.append(f"  predicted prefill {self.predicted_ms:.1f} ms")
        lines.append(f"  {'row':>3} {'input':<24} {'in':>6} {'kept':>6} {'weight':>7}  stage")
        for e in self.entries:
            lines.append(f"  {e.row:>3} {e.input:<24} {e.tokens_in:>6} {e.kept:>6} {e.weight:>7.3f}  {e.stage}")
        return "\n".join(lines)


class Controller:
    """Turns a :class:`~vlm_accel.control.budget.Budget`'s targets into per-row totals and per-segment quotas.

    ``model`` is the accelerated VLM (for the cost model's calibration and the KV bytes of its config)."""

    def __init__(self, budget, model, language_model):
        self.budget = budget
        self.model = model
        self.lm = language_model
        self._cost: CostModel | None = None
        self.plan: Plan | None = None
        self.tower_scale = 1.0  # measured / calibrated tower time of the steered requests so far (see observe_tower)
        self._tower_ratios: list[float] = []  # measured / predicted of the recent steered requests (warm-up excluded)
        self._tower_seen = 0

    @property
    def cost(self) -> CostModel:
        if self._cost is None:
            from .calibration import calibrated

            self._cost = calibrated(self.model, self.lm)
        return self._cost

    # --- totals -----------------------------------------------------------------------------------------------
    def row_totals(
        self,
        n_text: list[int],
        n_visual: list[int],
        n_segments: list[int],
        encode_ms: float,
        plan: Plan,
        tower_steered: bool = False,
    ) -> list[int]:
        """Visual tokens each row may keep (the strictest target), given per row its text tokens ``n_text``, its
        visual tokens ``n_visual`` and budgeted segments ``n_segments``; ``encode_ms``: the vision tower's time in
        this request. Raises ``ValueError`` naming the nearest reachable value when a target cannot be met even at
        one token per segment — except after a tower merge chosen for this request (``tower_steered``: the target
        was judged reachable before the tower ran), where a tower slower than predicted leaves the language model
        one token per segment and the plan says so."""
        b = self.budget
        bsz = len(n_text)
        totals = list(n_visual)
        if b.tokens is not None:
            floor = max(n_segments)
            if b.tokens < floor:
                raise ValueError(
                    f"Budget(tokens={b.tokens}) is unreachable: this prompt has {floor} images / crops / frames and "
                    f"each keeps at least one token; nearest reachable: tokens={floor}"
                )
            totals = [min(t, b.tokens) for t in totals]
            plan.reasons.append(f"tokens={b.tokens}: at most {b.tokens} visual tokens per prompt")
        if b.latency_ms is not None:
            cost = self.cost
            left = b.latency_ms - encode_ms - cost.overhead_ms
            cap = []
            slow = False  # the steered tower overran: rows left one token per segment
            for t, s, v in zip(n_text, n_segments, n_visual, strict=True):
                least = cost.llm_ms(bsz, t + s)
                if least > left and tower_steered:
                    cap.append(s)
                    slow = True
                    continue
                if least > left:
                    reach = encode_ms + cost.overhead_ms + least
                    raise ValueError(
                        f"Budget(latency_ms={b.latency_ms:g}) is unreachable for this input: the vision tower took "
                        f"{encode_ms:.0f} ms and the language model needs {least:.0f} ms even at one token per image; "
                        f"nearest reachable: latency_ms={math.ceil(reach)}"
                    )
                cap.append(min(v, cost.max_tokens(bsz, left) - t))
            totals = [min(a, c) for a, c in zip(totals, cap, strict=True)]
            if slow:
                plan.reasons.append(
                    f"latency_ms={b.latency_ms:g}: the vision tower took {encode_ms:.0f} ms, more than predicted; "
                    "one token per image / crop / frame left for the language model"
                )
            plan.reasons.append(
                f"latency_ms={b.latency_ms:g}: vision tower {encode_ms:.1f} ms (measured), language model budget "
                f"{left:.1f} ms (calibrated: {cost.describe()})"
            )
            plan.predicted_ms = (
                encode_ms + cost.overhead_ms + max(cost.llm_ms(bsz, t + v) for t, v in zip(n_text, totals, strict=True))
            )
        if b.memory_gb is not None:
            totals = self._memory_totals(n_text, n_segments, totals, plan)
        plan.totals = dict(enumerate(totals))
        return totals

    def _memory_totals(self, n_text, n_segments, totals, plan: Plan) -> list[int]:
        """``memory_gb``: the prefill's activations (estimated from the config) plus the KV cache (exact bytes per
        entry) stay under the target: the visual tokens are cut so the prompt fits, and ``kv_max`` bounds the cache
        while decoding."""
        b = self.budget
        bsz = len(n_text)
        limit = int(b.memory_gb * 1e9)
        per_entry = kv_bytes_per_entry(self.lm)  # one entry of one row, all layers

        def entries(p: int) -> int:  # KV entries per layer and row left beside a prefill of p tokens per row
            return (limit - activation_bytes(self.lm, bsz, p)) // (bsz * per_entry)

        def reserve(e: int) -> int:  # room for the answer before decoding starts evicting
            return max(1, min(64, e // 8))

        least = max(t + s for t, s in zip(n_text, n_segments, strict=True))  # one token per image
        if entries(least) < least + 1:
            reach = (activation_bytes(self.lm, bsz, least) + bsz * per_entry * (least + 1)) / 1e9
            raise ValueError(
                f"Budget(memory_gb={b.memory_gb:g}) is unreachable for this input: even at one token per image the "
                f"prompt's KV cache and activations need {reach:.4g} GB; nearest reachable: memory_gb={reach:.4g}"
            )
        longest = max(least, max(t + v for t, v in zip(n_text, totals, strict=True)))
        # the longest prompt that fits with room for the answer (entries() falls as p grows)
        p = largest(least, longest, lambda p: p + reserve(entries(p)) <= entries(p))
        act = activation_bytes(self.lm, bsz, p)
        kv_max = entries(p)
        totals = [max(s, min(v, p - t)) for t, v, s in zip(n_text, totals, n_segments, strict=True)]
        plan.kv_max = int(kv_max)
        plan.kv_bytes_limit = int(kv_max * bsz * per_entry)
        plan.reasons.append(
            f"memory_gb={b.memory_gb:g}: activations ~{act / 1e6:.1f} MB (estimated), KV {per_entry} B per entry "
            f"and row -> at most {kv_max} entries per layer ({plan.kv_bytes_limit / 1e6:.2f} MB)"
        )
        return totals

    # --- the vision tower (a merge inside it) ------------------------------------------------------------------
    def tower_keep(
        self, n_text: list[int], n_visual: list[int], views: int, per_view: int, tower: TowerCost
    ) -> TowerChoice:
        """Tokens per view the vision tower lets out (``tome_vit``), chosen before the tower runs so that the
        request's predicted prefill meets ``latency_ms``: the most that fit. Predicted: the tower on ``views`` views
        (calibrated ``tower`` cost per view at that merge level, times :attr:`tower_scale`) plus the language model on
        every row's ``n_text`` text tokens and its share of ``n_visual`` visual placeholders left by the merge. The
        choice belongs to the request: its prefill's :meth:`quotas` take it back (reason, prediction, measured time).
        ``ValueError`` with the nearest reachable value when even one token per view does not fit."""
        cost = self.cost
        bsz = len(n_text)
        target = self.budget.latency_ms

        def parts(k: int) -> tuple[float, float]:
            keep = k / per_view
            tower_ms = self.tower_scale * views * tower.view_ms(keep)
            rows = [t + math.ceil(keep * v) for t, v in zip(n_text, n_visual, strict=True)]
            return tower_ms, cost.overhead_ms + cost.llm_ms(bsz, max(rows))

        least = sum(parts(1))
        if least > target:
            raise ValueError(
                f"Budget(latency_ms={target:g}) is unreachable for this input: even with the vision tower merging "
                f"each of its {views} view(s) to one token, the prefill is predicted at {least:.0f} ms; nearest "
                f"reachable: latency_ms={math.ceil(least)}"
            )
        k = largest(1, per_view, lambda k: sum(parts(k)) <= target)
        tower_ms, llm_ms = parts(k)
        reason = (
            f"latency_ms={target:g}: vision tower keeps {k} of {per_view} tokens per view ({tower.schedule} "
            f"schedule, {views} view(s), "
            f"predicted {tower_ms:.1f} ms; calibrated per view {tower.describe()}, x{self.tower_scale:.2f} as "
            f"measured), language model predicted {llm_ms:.1f} ms"
        )
        return TowerChoice(k, views, k / per_view, tower, reason, tower_ms + llm_ms)

    def observe_tower(self, t: TowerChoice, encode_ms: float) -> None:
        """After the tower chosen by ``t`` ran in ``encode_ms``: :attr:`tower_scale` becomes the median of measured /
        predicted over the last :data:`SCALE_WINDOW` steered requests (bounded to 1/4..4), so the next request's
        choice follows this machine's current speed. The first request of a session is a warm-up (kernels chosen,
        caches filled: often several times slower) and is not counted; one outlier cannot move the median far."""
        if encode_ms <= 0:
            return
        predicted = t.views * t.cost.view_ms(t.keep)
        self._tower_seen += 1
        if predicted <= 0 or self._tower_seen == 1:
            return
        self._tower_ratios = [*self._tower_ratios, encode_ms / predicted][-SCALE_WINDOW:]
        self.tower_scale = min(4.0, max(0.25, statistics.median(self._tower_ratios)))

    def quotas(
        self, inputs, segments_of, stage, encode_ms: float, attn, masks, tower: TowerChoice | None = None
    ) -> dict[int, list[int]]:
        """Per input (``id(info)``) the quota of each of its segments for this prefill; records :attr:`plan`.

        ``inputs``: ``(modality, number, info, rows [n], cols [n], features [n, D])`` per distinct input;
        ``segments_of(info)``: its budgeted segments; ``stage``: ``(name, budget)`` of the stage the quotas steer;
        ``attn`` ``[B, L]`` padding mask or ``None``; ``masks``: per modality the ``[B, L]`` placeholder masks;
        ``tower``: the merge :meth:`tower_keep` chose for this request's vision tower, if it was steered."""
        name, own = stage
        plan = Plan(kv_bits=self.budget.kv_bits, kv_max=self.budget.kv_max)
        tower_steered = tower is not None
        if tower_steered:  # the tower's merge was chosen for this request (tower_keep)
            plan.reasons.append(tower.reason)
            plan.predicted_ms = tower.predicted_ms
            self.observe_tower(tower, encode_ms)
        per_row: dict[int, list] = {}  # row -> [(info, its segment count, segment number, plan entry)]
        for m, j, info, rows, _, feats in inputs:
            segs = segments_of(info)
            frames = info.frames > 1 and len(segs) > 1
            prev = None
            for k, seg in enumerate(segs):
                w = math.nan  # information is measured only when a total target is split by it
                if self.budget.has_target and name != "tower":
                    x = feats[seg.idx.to(feats.device)]
                    w, prev = information(x, prev if frames else None), x
                size = seg.idx.numel()
                label = f"{m} {j}" + (f" frame {k}" if frames else f" crop {k}" * (len(segs) > 1))
                entry = PlanEntry(int(rows[0]), label, size, own.visual_quota(size, seg.units), w, name)
                per_row.setdefault(entry.row, []).append((info, len(segs), k, entry))
        out: dict[int, list[int]] = {}
        if self.budget.has_target and per_row and name != "tower":
            vis = torch.stack(list(masks.values())).any(0)
            bsz, seq = vis.shape
            lens = attn.sum(1) if attn is not None else torch.full((bsz,), seq)
            rows = sorted(per_row)
            n_text = [int(lens[r]) - int(vis[r].sum()) for r in rows]
            n_vis = [sum(e.kept for *_, e in per_row[r]) for r in rows]  # kept so far: each input's own cap
            n_seg = [len(per_row[r]) for r in rows]
            totals = self.row_totals(n_text, n_vis, n_seg, encode_ms, plan, tower_steered)
            for r, total in zip(rows, totals, strict=True):
                ents = [e for *_, e in per_row[r]]
                got = self.split(total, [e.tokens_in for e in ents], [e.weight for e in ents], [e.kept for e in ents])
                for (info, n, k, e), q in zip(per_row[r], got, strict=True):
                    out.setdefault(id(info), [0] * n)[k] = q
                    e.kept = q
        plan.entries = [e for _, ents in sorted(per_row.items()) for *_, e in ents]
        self.plan = plan
        return out

    # --- split ------------------------------------------------------------------------------------------------
    @staticmethod
    def split(total: int, sizes: list[int], weights: list[float], caps: list[int] | None = None) -> list[int]:
        """Quotas for one row's segments: ``allocate`` under each segment's own cap (``caps``: its fraction /
        count quota, when the budget also has one)."""
        limits = sizes if caps is None else [min(s, c) for s, c in zip(sizes, caps, strict=True)]
        return allocate(total, limits, weights)


#: How many recent steered requests the tower scale is the median of.
SCALE_WINDOW = 7


class TowerChoice(NamedTuple):
    """The merge :meth:`Controller.tower_keep` chose for one request's tower."""

    tokens: int  # per view, leaving the tower
    views: int
    keep: float  # fraction of each view's tokens leaving the tower
    cost: TowerCost
    reason: str
    predicted_ms: float  # tower + language model


def largest(lo: int, hi: int, ok) -> int:
    """The largest ``n`` in ``[lo, hi]`` with ``ok(n)``, for ``ok`` true up to some point and false after it (``lo``
    when none is)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def kv_bytes_per_entry(lm) -> int:
    """Bytes one KV entry (key + value, one row) takes over all layers of ``lm`` at its dtype."""
    cfg = lm.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(lm.parameters()).element_size()
    return 2 * len(lm.layers) * heads * head_dim * elem


def activation_bytes(lm, batch: int, n: int) -> int:
    """Estimated peak activation bytes of a prefill of ``n`` tokens: a layer's hidden states, MLP intermediate and
    (eager attention only) its score matrix, at the model's dtype."""
    cfg = lm.config
    elem = next(lm.parameters()).element_size()
    inter = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    per_token = 4 * cfg.hidden_size + 3 * inter
    scores = 0
    if getattr(cfg, "_attn_implementation", "eager") == "eager":
        scores = 2 * cfg.num_attention_heads * n * n
    return batch * (n * per_token + scores) * elem
