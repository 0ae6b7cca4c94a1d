"""``accelerate()``: patch a VLM instance so its LLM runs on the visual tokens that matter; ``Session.restore()``
undoes it."""

from __future__ import annotations

import functools
import inspect
import logging
import time
import weakref
from dataclasses import dataclass, field

import torch

from . import methods as _methods
from .adapters import Adapter, ImageInfo, Segment, adapter_for
from .adapters.base import cls_attention
from .budget import Budget
from .methods import Context

logger = logging.getLogger(__name__)

_SESSION_ATTR = "_vlm_accel_session"
_MISSING = object()


@dataclass
class Stats:
    """What the last prefill did (summed over the batch)."""

    visual_tokens_in: int = 0
    visual_tokens_kept: int = 0
    seq_len_in: int = 0
    seq_len_kept: int = 0
    kv_bytes: int = 0
    selection_ms: float = 0.0
    frames_in: int = 0
    frames_encoded: int = 0


@dataclass
class Trace:
    """The last reduced prefill, for tests and debugging.

    Attributes:
        index: ``[B, L']`` original sequence position of each slot of the reduced sequence.
        valid: ``[B, L']`` False where the slot is padding added by the reduction.
        inputs_embeds: ``[B, L', D]`` embeddings the language model received.
        position_ids: position ids the language model received (``[B, L']`` or ``[3|4, B, L']``).
        attention_mask: ``[B, L']`` 2-D mask the language model received.
        extra: other reduced per-position inputs (Qwen3-VL ``visual_pos_masks``, ``deepstack_visual_embeds``).
    """

    index: torch.Tensor
    valid: torch.Tensor
    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    extra: dict = field(default_factory=dict)


@dataclass
class _Decode:
    """Translation from the full-length sequence the caller sees to the reduced KV cache."""

    full_len: int
    prefix_mask: torch.Tensor  # [B, L'] reduced attention mask of the prefill
    cache: weakref.ref | None = None

    @property
    def delta(self) -> int:
        return self.full_len - self.prefix_mask.shape[1]


@dataclass
class _Replay:
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
class _Pending:
    """What the vision side of one forward reported: per modality (``"image"``, ``"video"``) the layouts of its
    inputs in placeholder order and the ``[B, L]`` placeholder mask."""

    infos: dict[str, list[ImageInfo]] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def ready(self) -> list[str]:
        return [m for m in self.masks if self.infos.get(m)]


@dataclass
class Encoded:
    """One image through :meth:`Session.encode_images` with ``detailed=True``."""

    features: torch.Tensor  # [K, D] kept (or merged) tokens in original order
    index: torch.Tensor  # [K] their places among the image's tokens (a merged token: its representative's)
    deepstack: list[torch.Tensor]  # per deepstack layer [K, D] (Qwen3-VL), else empty


def _expand_infos(infos: list[ImageInfo], mask: torch.Tensor) -> list[ImageInfo] | None:
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


class Session:
    """An accelerated model. Use :meth:`restore` (or ``with``) to return the model to exactly what it was."""

    def __init__(
        self, model, budget: Budget, method: str, adapter: Adapter, seed: int = 0, frame_cache: float | None = None
    ):
        self.model = model
        self.budget = budget
        self.adapter = adapter
        self.method_name = method
        self.method = _methods.get(method)
        self.stats = Stats()
        self.trace: Trace | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._patched: list[tuple[object, str, object]] = []  # (object, attribute, previous instance value)
        self._pending = _Pending()
        self._decode: _Decode | None = None
        self._replay: _Replay | None = None
        self._encoding = False
        self.frame_cache = None
        if frame_cache is not None:
            from .video.cache import FrameCache

            if not adapter.has_video:
                raise ValueError(f"frame_cache: {adapter.family} has no video input path")
            self.frame_cache = FrameCache(adapter, frame_cache)
        self._install()

    def __repr__(self) -> str:
        return f"Session({self.adapter.family}, method={self.method_name!r}, budget={self.budget})"

    # --- patching ---------------------------------------------------------------------------------------------
    def _patch(self, obj, name: str, wrapper, keep_previous: bool = False) -> None:
        """Set ``obj.name = wrapper`` on the instance; ``restore`` deletes it again (or puts back the previous
        instance value when ``keep_previous``, for attributes users may set themselves)."""
        previous = vars(obj).get(name, _MISSING)
        if previous is not _MISSING and not keep_previous:
            raise RuntimeError(f"{type(obj).__name__}.{name} is already overridden on the instance; not patching")
        setattr(obj, name, wrapper)
        self._patched.append((obj, name, previous))

    def _install(self) -> None:
        inner = self.adapter.inner
        lm = self.adapter.language_model
        self._patch(inner, "get_image_features", self._wrap_features(inner.get_image_features, "image"))
        if hasattr(inner, "get_video_features"):
            video = inner.get_video_features
            if self.frame_cache is not None:
                video = self.frame_cache.wrap(video)
            self._patch(inner, "get_video_features", self._wrap_features(video, "video"))
        self._patch(inner, "get_placeholder_mask", self._wrap_placeholder_mask(inner.get_placeholder_mask))
        self._patch(lm, "forward", self._wrap_lm_forward(lm.forward))
        # the model's loss (``labels``) reads reduced logits: labels follow the kept tokens
        self._patch(self.model, "_loss_function", self._wrap_loss(self.model.loss_function), keep_previous=True)
        if hasattr(inner, "compute_3d_position_ids"):  # M-RoPE families derive decode positions from the cache
            self._patch(inner, "compute_3d_position_ids", self._wrap_positions(inner.compute_3d_position_ids))
        setattr(self.model, _SESSION_ATTR, self)

    def restore(self) -> None:
        """Remove every patch; the model is bit-exact what it was before :func:`accelerate`."""
        for obj, name, previous in reversed(self._patched):
            if previous is not _MISSING:
                setattr(obj, name, previous)
            elif name in vars(obj):
                delattr(obj, name)
        self._patched.clear()
        if getattr(self.model, _SESSION_ATTR, None) is self:
            delattr(self.model, _SESSION_ATTR)
        self._pending = _Pending()
        self._decode = None
        self._replay = None

    @property
    def active(self) -> bool:
        return bool(self._patched)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    # --- wrappers ---------------------------------------------------------------------------------------------
    def _wrap_features(self, orig, modality: str):
        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def get_features(*args, **kwargs):
            if self._encoding:  # e.g. Qwen3-VL's get_video_features calls get_image_features
                return orig(*args, **kwargs)
            call = sig.bind_partial(*args, **kwargs).arguments
            call.update(call.pop("kwargs", {}))
            layer = self.adapter.importance_layer(call) if "importance" in self.method.needs else None
            captured = {}
            handle = None
            if layer is not None:

                def grab(mod, a, kw):
                    captured["hidden"] = a[0] if a else kw["hidden_states"]

                handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
            self._encoding = True
            try:
                out = orig(*args, **kwargs)
            finally:
                self._encoding = False
                if handle is not None:
                    handle.remove()
            cls_attn = None
            if "hidden" in captured:
                with torch.no_grad():
                    cls_attn = cls_attention(layer, captured["hidden"])
            feats = out.pooler_output if hasattr(out, "pooler_output") else out[-1]
            describe = self.adapter.describe if modality == "image" else self.adapter.describe_video
            self._pending.infos.setdefault(modality, []).extend(describe(list(feats), call, cls_attn))
            return out

        return get_features

    def _wrap_placeholder_mask(self, orig):
        @functools.wraps(orig)
        def get_placeholder_mask(*args, **kwargs):
            returned = orig(*args, **kwargs)
            self._pending.masks.update(self.adapter.placeholder_masks(returned, kwargs))
            return returned

        return get_placeholder_mask

    def _wrap_lm_forward(self, orig):
        @functools.wraps(orig)
        def forward(*args, **kwargs):
            if args:  # the families call the language model with keywords only
                return orig(*args, **kwargs)
            pending, self._pending = self._pending, _Pending()
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            if pending.ready():
                if past:
                    logger.warning("vlm_accel: images after a non-empty cache are not reduced")
                    self._decode = None
                else:
                    return self._prefill(orig, kwargs, pending)
            elif past and self._decode is not None and self._decode.cache is not None:
                if self._decode.cache() is cache:
                    return orig(**self._translate_decode(kwargs, past))
            if not past and pending.masks and self._replay is not None:
                return self._prefill(orig, kwargs, pending, replay=self._replay)
            if not past:
                self._decode = None
            return orig(**kwargs)

        return forward

    def _wrap_positions(self, orig):
        """Without an attention mask, M-RoPE models number decode tokens from the cache length, which is shorter
        than the caller's sequence by what was pruned: shift them back to the caller's positions."""

        @functools.wraps(orig)
        def compute_3d_position_ids(*args, **kwargs):
            pos = orig(*args, **kwargs)
            st, cache = self._decode, kwargs.get("cache", kwargs.get("past_key_values"))
            if (
                pos is not None
                and kwargs.get("attention_mask") is None
                and cache is not None
                and st is not None
                and st.cache is not None
                and st.cache() is cache
                and cache.get_seq_length() > 0
            ):
                pos = pos + st.delta
            return pos

        return compute_3d_position_ids

    def _wrap_loss(self, orig):
        """Forward with ``labels`` ``[B, L]``: when the logits are reduced (``[B, L', V]``), the labels are gathered
        at the kept positions (padding → -100), so the loss is next-token prediction over the kept sequence."""

        @functools.wraps(orig)
        def loss_function(*args, **kwargs):
            logits = kwargs["logits"] if "logits" in kwargs else args[0]
            labels = kwargs["labels"] if "labels" in kwargs else args[1]
            tr = self.trace
            if labels is not None and labels.shape[1] != logits.shape[1]:
                if tr is None or tuple(tr.index.shape) != tuple(logits.shape[:2]):
                    raise ValueError(
                        "vlm_accel: labels cover the full sequence but the logits are reduced and no matching "
                        "reduction was recorded; pass labels to the same forward call as the images"
                    )
                dev = labels.device
                labels = labels.gather(1, tr.index.to(dev)).masked_fill(~tr.valid.to(dev), -100)
                if "labels" in kwargs:
                    kwargs["labels"] = labels
                else:
                    args = (args[0], labels, *args[2:])
            return orig(*args, **kwargs)

        return loss_function

    # --- prefill ----------------------------------------------------------------------------------------------
    def _prefill(self, orig, kwargs: dict, pending: _Pending, replay: _Replay | None = None):
        """Reduce and run a prefill. ``replay``: a forward whose images were encoded earlier (``generate`` without
        cache re-runs the whole prompt + generated tokens): the last prefill's choice, if the same visual tokens come
        first, extended by the new tokens; anything else runs unreduced."""
        embeds = kwargs["inputs_embeds"]
        modalities = list(pending.masks) if replay is not None else pending.ready()
        masks = {m: pending.masks[m].to(embeds.device) for m in modalities}
        mask = torch.stack(list(masks.values())).any(0)
        bsz, seq = mask.shape
        n_vis = int(mask.sum())
        if replay is not None and not replay.matches(mask, embeds):
            self._decode = None
            return orig(**kwargs)
        if replay is None:
            for m in modalities:
                infos = _expand_infos(pending.infos[m], masks[m])
                if infos is None:
                    logger.warning("vlm_accel: %s features and placeholders disagree; running unreduced", m)
                    return orig(**kwargs)
                pending.infos[m] = infos
        t0 = time.perf_counter()
        attn = _padding_mask(kwargs.get("attention_mask"), seq)
        keep = ~mask
        merges = []
        if replay is None:
            for m in modalities:
                self._select(embeds, masks[m], pending.infos[m], attn, keep, merges)
            self._replay = _Replay(mask, keep.clone(), merges, embeds.detach())
        else:
            keep[:, : replay.keep.shape[1]] = replay.keep
            merges = replay.merges
        n_in = bsz * seq if attn is None else int(attn.sum())
        self.stats = Stats(visual_tokens_in=n_vis, seq_len_in=n_in)
        if self.frame_cache is not None:
            self.stats.frames_in = self.frame_cache.stats.frames_in
            self.stats.frames_encoded = self.frame_cache.stats.frames_encoded
        if bool(keep.all()):  # nothing dropped: the model runs exactly as unpatched
            self.stats.visual_tokens_kept = n_vis
            self.stats.seq_len_kept = n_in
            self.stats.selection_ms = (time.perf_counter() - t0) * 1e3
            out = orig(**kwargs)
            self._decode = None
            self._record_cache(out)
            return out

        # reduced layout: per row, kept tokens in order (padding dropped too), left-padded to the longest row
        if attn is not None:
            keep &= attn.bool()
        new_len = int(keep.sum(1).max())
        index = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, seq - new_len :]
        valid = keep.gather(1, index)

        def take(x: torch.Tensor) -> torch.Tensor:  # [..., B, L(, D)] -> [..., B, L'(, D)]
            if x.dim() == 3 and x.shape[:2] == (bsz, seq):
                return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
            return x.gather(-1, index.expand(*x.shape[:-2], bsz, new_len))

        kw = dict(kwargs)
        kw["inputs_embeds"] = take(_apply_merges(embeds, merges))
        attn = torch.ones(bsz, seq, dtype=torch.long, device=embeds.device) if attn is None else attn
        kw["attention_mask"] = take(attn) * valid.to(attn.dtype)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(seq, device=embeds.device).expand(bsz, seq)
        kw["position_ids"] = take(pos.expand(*pos.shape[:-2], bsz, seq))
        if kwargs.get("visual_pos_masks") is not None:  # Qwen3-VL deepstack, pruned in step
            vpm = kwargs["visual_pos_masks"].to(embeds.device)
            new_vpm = take(vpm) & valid
            deep = []
            for e in kwargs.get("deepstack_visual_embeds") or []:
                full = e.new_zeros(bsz, seq, e.shape[-1])
                full[vpm] = e
                deep.append(take(_apply_merges(full, merges))[new_vpm])
            kw["visual_pos_masks"], kw["deepstack_visual_embeds"] = new_vpm, deep
        kept_vis = int((mask & keep).sum())  # images and videos
        self.stats.visual_tokens_kept = kept_vis
        self.stats.seq_len_kept = int(valid.sum())
        self.stats.selection_ms = (time.perf_counter() - t0) * 1e3
        extra = {k: kw[k] for k in ("visual_pos_masks", "deepstack_visual_embeds") if k in kw}
        self.trace = Trace(index, valid, kw["inputs_embeds"], kw["position_ids"], kw["attention_mask"], extra)
        out = orig(**dict(kw, attention_mask=_fit_to(kw["attention_mask"], kwargs.get("attention_mask"))))
        self._decode = _Decode(seq, kw["attention_mask"])
        self._record_cache(out)
        return out

    def _record_cache(self, out) -> None:
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        self.stats.kv_bytes = _cache_bytes(cache)
        if self._decode is not None and cache is not None:
            self._decode.cache = weakref.ref(cache)

    def _select(self, embeds, mask, infos: list[ImageInfo], attn, keep, merges) -> None:
        """Run the method on every segment of ``infos`` (the inputs behind ``mask``, in placeholder order).

        Marks kept positions in ``keep`` ``[B, L]`` and appends merge ops ``(rows, cols, src_rows, src_cols,
        weights [K, n])`` to ``merges``, to be applied to any per-position tensor."""
        rows, cols = mask.nonzero(as_tuple=True)
        feats = embeds[mask]  # [N, D] in placeholder order
        off = 0
        done: dict[int, list | None] = {}  # generate's copies of one prompt share its infos: reduce once, same result
        for info in infos:
            sl = slice(off, off + info.n_tokens)
            r, c = rows[sl], cols[sl]
            off += info.n_tokens
            if id(info) in done:
                parts = done[id(info)]
            else:
                query = self._query(embeds, mask, attn, int(r[0])) if "query" in self.method.needs else None
                parts = done[id(info)] = self._reduce(feats[sl], info, query)
            if parts is None:
                keep[r, c] = True  # nothing to reduce: structural tokens stay too
                continue
            for idx, kept, weights in parts:
                keep[r[kept], c[kept]] = True
                if weights is not None:
                    merges.append((r[kept], c[kept], r[idx], c[idx], weights))

    def _reduce(self, x: torch.Tensor, info: ImageInfo, query: torch.Tensor | None = None):
        """Apply the method to each segment of one input ``x`` ``[n_tokens, D]``.

        Returns ``None`` when the budget keeps everything, else per segment ``(idx [n], kept [K], weights [K, n] |
        None)`` with indices into ``x``."""
        segments = self._segments(info)
        quotas = [self.budget.visual_quota(s.idx.numel(), s.units) for s in segments]
        if all(q >= s.idx.numel() for q, s in zip(quotas, segments, strict=True)):
            return None
        parts = []
        for seg, k in zip(segments, quotas, strict=True):
            idx = seg.idx.to(x.device)
            ctx = Context(
                grid=seg.grid,
                frames=seg.frames,
                importance=None if info.importance is None else info.importance.to(x.device)[idx],
                query=query,
                generator=self._generator,
            )
            red = self.method(x[idx], k, ctx)
            parts.append((idx, idx[red.keep], red.weights))
        return parts

    @torch.no_grad()
    def encode_images(self, detailed: bool = False, **vision_inputs) -> list:
        """Vision tower + projector + this session's reduction, outside a forward (e.g. for streaming).

        Takes what the processor returns for images (``pixel_values``, ``image_sizes``, ``image_grid_thw`` ...).
        Returns per image its kept (or merged) features ``[K_i, D]`` in original token order; with ``detailed``, per
        image an :class:`Encoded` (features, the kept tokens' places among the image's tokens, deepstack features)."""
        self._pending = _Pending()
        out = self.adapter.inner.get_image_features(**vision_inputs)
        infos = self._pending.infos.pop("image")
        self._pending = _Pending()
        deep = getattr(out, "deepstack_features", None) or []
        result = []
        for j, (f, info) in enumerate(zip(out.pooler_output, infos, strict=True)):
            parts = self._reduce(f, info)
            if parts is None:
                enc = Encoded(f, torch.arange(f.shape[0], device=f.device), [d[j] for d in deep])
            else:
                kept = torch.cat([k for _, k, _ in parts])
                order = kept.argsort()
                enc = Encoded(
                    _take_parts(f, parts, order), kept[order], [_take_parts(d[j], parts, order) for d in deep]
                )
            result.append(enc if detailed else enc.features)
        return result

    def _segments(self, info: ImageInfo) -> list[Segment]:
        """Per-frame segments, or one clip segment when the budget is per clip or the method works across frames.

        A clip segment counts as one unit for a per-clip budget and as one unit per frame otherwise."""
        per_clip = self.budget.video == "clip"
        if info.frames < 2 or len(info.segments) < 2 or not (per_clip or "clip" in self.method.needs):
            return info.segments
        return [
            Segment(
                torch.cat([s.idx for s in info.segments]),
                info.segments[0].grid,
                units=1 if per_clip else sum(s.units for s in info.segments),
                frames=info.frames,
            )
        ]

    @staticmethod
    def _query(embeds, mask, attn, row: int) -> torch.Tensor:
        text = ~mask[row]
        if attn is not None:
            text &= attn[row].bool()
        return embeds[row][text]

    # --- decode -----------------------------------------------------------------------------------------------
    def _translate_decode(self, kwargs: dict, past: int) -> dict:
        st = self._decode
        kw = dict(kwargs)
        q = (
            kwargs["inputs_embeds"].shape[1]
            if kwargs.get("inputs_embeds") is not None
            else kwargs["input_ids"].shape[1]
        )
        attn = kwargs.get("attention_mask")
        if attn is not None and not (torch.is_tensor(attn) and attn.dim() == 2):
            # prepared for a static cache (from the reduced cache length): rebuild it; new tokens are never padding
            new = st.prefix_mask.new_ones(st.prefix_mask.shape[0], int(past) + q - st.prefix_mask.shape[1])
            kw["attention_mask"] = _fit_to(torch.cat([st.prefix_mask, new], dim=1), attn)
        elif attn is not None and attn.shape[1] >= st.full_len:
            kw["attention_mask"] = torch.cat([st.prefix_mask.to(attn.dtype), attn[:, st.full_len :]], dim=1)
        if kwargs.get("position_ids") is None:
            dev = st.prefix_mask.device
            kw["position_ids"] = (torch.arange(q, device=dev) + past + st.delta)[None].expand(
                st.prefix_mask.shape[0], q
            )
        return kw


def _prepared(mask):
    """The 4-D mask out of ``generate``'s per-layer-type dict (the full-attention one: the longest keys)."""
    if isinstance(mask, dict):
        return mask.get("full_attention", next((m for m in mask.values() if m is not None), None))
    return mask


def _padding_mask(mask, length: int) -> torch.Tensor | None:
    """The ``[B, length]`` 0/1 key mask of a prefill, from a 2-D mask or from the 4-D / per-layer-type dict masks
    ``generate`` prepares for static caches (the last query row sees every earlier key that is not padding).
    ``None`` stays ``None``."""
    if mask is None or (torch.is_tensor(mask) and mask.dim() == 2):
        return mask
    mask = _prepared(mask)
    if mask is None:
        return None
    if not torch.is_tensor(mask) or mask.dim() != 4:
        raise ValueError(f"vlm_accel: unsupported attention_mask {type(mask).__name__}; pass a 2-D [B, L] mask")
    row = mask[:, 0, -1, :length]
    return (row if row.dtype == torch.bool else row == 0).long()


def _fit_to(mask: torch.Tensor, prepared) -> torch.Tensor:
    """A reduced 2-D mask, zero-padded to the key length of the 4-D / dict mask ``generate`` prepared for a static
    cache (the LM builds its own mask from it; static caches need it as long as the cache)."""
    prepared = _prepared(prepared)
    if not torch.is_tensor(prepared) or prepared.dim() != 4 or prepared.shape[-1] <= mask.shape[1]:
        return mask
    return torch.nn.functional.pad(mask, (0, prepared.shape[-1] - mask.shape[1]))


def _take_parts(x: torch.Tensor, parts, order: torch.Tensor) -> torch.Tensor:
    """``x`` ``[n, D]`` (one input's tokens, or a per-token tensor beside them) -> ``[K, D]``: what
    :meth:`Session._reduce` ``parts`` keep or merge, in original token order (``order`` sorts the kept indices)."""
    vals = [x[k] if w is None else (w.float() @ x[i].float()).to(x.dtype) for i, k, w in parts]
    return torch.cat(vals)[order]


def _apply_merges(x: torch.Tensor, merges) -> torch.Tensor:
    """Write merged values into ``x`` ``[B, L, D]`` at the kept positions (returns a copy if anything merges)."""
    if not merges:
        return x
    x = x.clone()
    for r, c, sr, sc, w in merges:
        x[r, c] = (w.float() @ x[sr, sc].float()).to(x.dtype)
    return x


def _cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _auto_method(adapter: Adapter) -> str:
    """Default per family: CLS-attention importance (VisionZip) where the vision tower has a CLS token (CLIP and
    DINOv2 LLaVA models), diversity (DivPrune) elsewhere. On the embedded default model (DINOv2) visionzip keeps
    99.6 / 99.3 / 96.8 % of full accuracy at 0.33 / 0.22 / 0.11, divprune 98.2 / 97.8 / 97.1 %
    (``eval/results/vqa_default``)."""
    try:
        has_cls = adapter.importance_layer({}) is not None
    except (KeyError, TypeError, AttributeError):
        has_cls = False
    return "visionzip" if has_cls else "divprune"


def accelerate(model, budget=0.25, method: str = "auto", *, seed: int = 0, frame_cache: float | None = None) -> Session:
    """Patch ``model`` in place so its language model runs only on the visual tokens that matter.

    Args:
        model: a ``transformers`` VLM (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
            ``LlavaOnevisionForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``,
            ``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``).
        budget: float in (0, 1] (fraction of visual tokens kept per image / crop), int >= 1 (tokens kept per image
            / crop) or a :class:`Budget`. ``1.0`` leaves the outputs bit-identical.
        method: a name from :func:`vlm_accel.methods`, or ``"auto"`` for the family's default.
        seed: seed of stochastic methods (``random``).
        frame_cache: reuse the vision encoder's features for video frames whose pixels changed by at most this
            mean absolute difference since the last encoded frame (``0.0``: exact repeats only; ``None``: off).
            ``session.stats.frames_in`` / ``frames_encoded`` count the frames seen and encoded.

    Returns:
        A :class:`Session`; ``session.restore()`` (or leaving a ``with`` block) undoes every patch. Accelerating an
        already accelerated model re-configures it: the previous session is restored first.
    """
    budget = Budget.of(budget)
    if budget.kv != 1.0:
        raise NotImplementedError("KV-cache compression (Budget.kv < 1) is not available yet; use kv=1.0")
    adapter = adapter_for(model)
    name = _auto_method(adapter) if method == "auto" else method
    _methods.get(name)  # validates
    previous = getattr(model, _SESSION_ATTR, None)
    if previous is not None:
        logger.info("vlm_accel: model already accelerated (%r); restoring it before re-configuring", previous)
        previous.restore()
    return Session(model, budget, name, adapter, seed=seed, frame_cache=frame_cache)
