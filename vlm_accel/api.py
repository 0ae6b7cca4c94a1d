"""``accelerate()`` and the :class:`Session`: the door of the pipeline.

The session installs and restores the patches, serialises requests, keeps ``stats`` / ``plan`` / ``trace``, and runs
each request through the stages, each of which owns its per-request state:

    vision tower  ─ :class:`~vlm_accel.tower.capture.TowerCapture` (layouts, CLS attention; a tower merge or frame
                    cache around the tower: :mod:`vlm_accel.tower`)
    pre-LLM       ─ :class:`~vlm_accel.prellm.Selection` (quotas from the controller, the method, merges)
    LLM           ─ the reduced layout (:mod:`vlm_accel.llm.layout`), in-LLM stages (:mod:`vlm_accel.llm.stages`)
    KV cache      ─ :class:`~vlm_accel.kv.stage.KVStage` (quantized cache, eviction with a press)
    decoding      ─ :class:`~vlm_accel.llm.decode.Decoding` (the caller's positions over a shorter cache)
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from .adapters import Adapter, adapter_for
from .control.budget import Budget
from .control.controller import Controller, Plan
from .control.resolve import Resolved, is_full, resolve
from .kv.presses import get_press
from .kv.stage import KV_GROUP, KV_RESIDUAL, KVStage  # noqa: F401  (KV_* importable from here)
from .llm.decode import Decode, Decoding
from .llm.layout import (
    cache_arg,
    cache_of,
    compose,
    fit_to,
    gather_masks,
    labels_follow,
    padding_mask,
    reduced_layout,
    take,
)
from .llm.stages import LLMStages
from .llm.static_cache import SlotState
from .methods.inllm import mean_tokens
from .prellm.selection import Replay, Selection, apply_merges, budget_segments  # noqa: F401
from .tower.capture import Pending, TowerCapture, expand_infos
from .tower.frame_cache import check_threshold
from .tower.merge import TowerMerge
from .tower.steering import TowerSteering

logger = logging.getLogger(__name__)

_SESSION_ATTR = "_vlm_accel_session"
_MISSING = object()


@dataclass
class Stats:
    """What the last prefill did (summed over the batch).

    ``visual_tokens_kept`` is what the last LLM layer processed; ``visual_tokens_per_layer`` what each LLM layer
    processed and ``visual_tokens_mean`` their mean, the number to compare methods at equal compute (a pre-LLM
    method keeps the same count in every layer; an in-LLM method more in the layers before its stages)."""

    visual_tokens_in: int = 0
    visual_tokens_kept: int = 0
    seq_len_in: int = 0
    seq_len_kept: int = 0
    kv_bytes: int = 0
    selection_ms: float = 0.0
    frames_in: int = 0
    frames_encoded: int = 0
    frames_partial: int = 0  # per-patch frame cache: frames encoded on their changed patches only
    patches_in: int = 0
    patches_encoded: int = 0
    visual_tokens_per_layer: list = field(default_factory=list)
    visual_tokens_mean: float = 0.0
    kv_entries_per_layer: list = field(default_factory=list)


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
        stages: in-LLM stages: ``(layer, index [B, n], valid [B, n])``, the slots of the language model's input that
            layers ``layer..`` processed.
        output_index / output_valid: ``[B, L'']`` original position of each slot the returned logits cover.
    """

    index: torch.Tensor
    valid: torch.Tensor
    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    extra: dict = field(default_factory=dict)
    stages: list = field(default_factory=list)
    output_index: torch.Tensor | None = None
    output_valid: torch.Tensor | None = None


class Session:
    """An accelerated model. Use :meth:`restore` (or ``with``) to return the model to exactly what it was.

    Built by :func:`accelerate` from a :class:`~vlm_accel.control.resolve.Resolved` configuration."""

    def __init__(
        self,
        model,
        budget: Budget,
        config: Resolved,
        adapter: Adapter,
        seed: int = 0,
        frame_cache: float | None = None,
        kv_press="vision",
        frame_cache_patches: bool = False,
    ):
        self.model, self.budget, self.adapter, self.config = model, budget, adapter, config
        self.method_name = config.name
        self.method = config.selector
        self.llm_method = config.llm
        self.options = config.options
        self.kv_press = kv_press
        self.controller = Controller(budget, model, adapter.language_model)
        self.selection = Selection(self.method, config.pre_budget, budget.video, config.steered, self.controller, seed)
        self.decoding = Decoding()
        self.plan: Plan | None = None  # what the controller chose for the last prefill
        self.stages: LLMStages | None = None
        self.kv: KVStage | None = None
        self.tower: TowerMerge | None = None
        self.steering: TowerSteering | None = None
        self.stats = Stats()
        self.trace: Trace | None = None
        self._entered = False
        self._outer: Session | None = None
        self._patched: list[tuple[object, str, object]] = []  # (object, attribute, previous instance value)
        self._lock = threading.RLock()  # one top-level call (forward, generate, encode_images) at a time
        self._depth = 0  # nesting of top-level calls in this thread (generate calls forward)
        self.frame_cache = _frame_cache(adapter, frame_cache, frame_cache_patches)
        self.capture = TowerCapture(adapter, "importance" in self.method.needs, frame_cache=self.frame_cache)
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
        try:
            self._install_stages()
        except BaseException:  # nothing half-installed stays on the model
            self._unpatch()
            raise

    def _install_stages(self) -> None:
        cfg, b = self.config, self.budget
        inner, lm = self.adapter.inner, self.adapter.language_model
        self.tower = None
        if cfg.tower is not None and (not is_full(cfg.tower_share) or b.latency_ms is not None):
            self.tower = TowerMerge.install(self.adapter, cfg.tower_share, cfg.tower_options, self._patch)
        self.steering = None
        if self.tower is not None and b.latency_ms is not None:
            self.steering = TowerSteering(self.tower, self.controller, self.model, self.adapter)
        self.capture.tower, self.capture.steering = self.tower, self.steering
        self.capture.install(self._patch)
        self._patch(lm, "forward", self._wrap_lm_forward(lm.forward))
        # the model's loss (``labels``) reads reduced logits: labels follow the kept tokens
        loss = labels_follow(self.model.loss_function, lambda: self.trace)
        self._patch(self.model, "_loss_function", loss, keep_previous=True)
        gen_inputs = self.decoding.wrap_generation_inputs(self.model.prepare_inputs_for_generation)
        self._patch(self.model, "prepare_inputs_for_generation", gen_inputs)
        if "_prepare_position_ids_for_generation" in type(self.model).__dict__:  # Qwen3-VL: continuation positions
            prep = self.decoding.wrap_generation_positions(self.model._prepare_position_ids_for_generation)
            self._patch(self.model, "_prepare_position_ids_for_generation", prep)
        steered = b.has_target and cfg.steered[0] == "in-LLM"
        self.stages = None
        if cfg.llm is not None and (steered or not is_full(cfg.llm_budget)):
            self.stages = LLMStages(cfg.llm, self.options, lm, self._patch, self.adapter.scoring_layers)
        hybrid = self.model.config if "linear_attention" in self.adapter.layer_types else None
        kv = KVStage(b, self.kv_press, lm.layers, self._kv_evicted, hybrid)
        self.kv = kv if kv.active else None
        # nothing to do at all (budget 1.0): compiled decoding steps go straight through, so they guard on nothing
        self._inert = b.is_full and not self._stateful and self.tower is None
        if hasattr(inner, "compute_3d_position_ids"):  # M-RoPE families derive decode positions from the cache
            pos = self.decoding.wrap_positions(inner.compute_3d_position_ids, self._inert)
            self._patch(inner, "compute_3d_position_ids", pos)
        # threads: whole calls are serialised, so one request's state never mixes with another's; a request that
        # fails leaves nothing behind for the next (_abandon)
        forward, generate = self.model.forward, self._uncompiled_stages(self.model.generate)
        if self.steering is not None:
            forward, generate = self.steering.noting_prompt(forward), self.steering.noting_prompt(generate)
        self._patch(self.model, "forward", self._request(forward), keep_previous=True)
        self._patch(self.model, "generate", self._request(generate), keep_previous=True)
        # copies and pickles of an accelerated model: a clean unaccelerated copy / a clear error, never wrappers bound
        # to this model's modules
        self._patch(self.model, "__deepcopy__", self._deepcopy)
        self._patch(self.model, "__reduce_ex__", _refuse_pickle)
        setattr(self.model, _SESSION_ATTR, self)

    def _deepcopy(self, memo):
        """``copy.deepcopy(model)``: the model as it is without acceleration (this session stays on the original)."""
        import copy

        self._unpatch()
        try:
            return copy.deepcopy(self.model, memo)
        finally:
            self._install()

    def restore(self) -> None:
        """Remove every patch; the model is bit-exact what it was before :func:`accelerate`."""
        self._unpatch()
        self.capture.clear()
        self.decoding.clear()
        self.selection.clear()

    def _unpatch(self) -> None:
        if self.stages is not None:
            self.stages.remove()
        if self.kv is not None:
            self.kv.remove()
        for obj, name, previous in reversed(self._patched):
            if previous is not _MISSING:
                setattr(obj, name, previous)
            elif name in vars(obj):
                delattr(obj, name)
        self._patched.clear()
        if getattr(self.model, _SESSION_ATTR, None) is self:
            delattr(self.model, _SESSION_ATTR)

    @property
    def active(self) -> bool:
        return bool(self._patched)

    @property
    def _stateful(self) -> bool:
        """In-LLM stages or KV eviction: per-step Python state while decoding (never compiled)."""
        return self.stages is not None or (self.kv is not None and self.kv.compressor is not None)

    def __enter__(self) -> Session:
        self._entered = True
        return self

    def __exit__(self, *exc) -> None:
        """Leaving a ``with`` block restores the model; when this session displaced one whose ``with`` block is still
        open (nested blocks), that outer session is put back on, so the rest of its block stays accelerated."""
        self._entered = False
        self.restore()
        outer, self._outer = self._outer, None
        if (
            outer is not None
            and outer._entered
            and not outer.active
            and getattr(self.model, _SESSION_ATTR, None) is None
        ):
            outer._install()

    # --- the request's lifecycle ------------------------------------------------------------------------------
    def _request(self, orig):
        """One top-level call (``forward``, ``generate``): serialised with the others; the vision side's report
        starts empty, and a call that fails leaves no per-request state behind (the next request runs as on a fresh
        session)."""

        @functools.wraps(orig)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():  # a compiled step runs inside a call that holds the lock already
                return orig(*args, **kwargs)
            with self._lock:
                outermost = self._depth == 0
                if outermost:
                    self.capture.clear()
                self._depth += 1
                try:
                    return orig(*args, **kwargs)
                except BaseException:
                    if outermost:
                        self._abandon()
                    raise
                finally:
                    self._depth -= 1

        return call

    def _abandon(self) -> None:
        """Drop the per-request state of a request that failed mid-way."""
        self.capture.clear()
        self.selection.quotas = {}
        if self.stages is not None:
            self.stages.run = None
        if self.kv is not None:
            self.kv.end_forward()

    def _uncompiled_stages(self, orig):
        """In-LLM stages and KV eviction keep per-step Python state, so their decoding steps cannot be compiled:
        ``generate`` asked to compile them (``compile_config``) is refused; transformers' automatic compilation of
        static-cache decoding (on GPUs) is turned off for them (``disable_compile``)."""

        @functools.wraps(orig)
        def generate(*args, **kwargs):
            if not self._stateful:
                return orig(*args, **kwargs)
            config = kwargs.get("generation_config")
            if kwargs.get("compile_config") is not None or getattr(config, "compile_config", None) is not None:
                raise ValueError(
                    f"vlm_accel: {self.method_name!r} (in-LLM stages / KV eviction) cannot decode under torch.compile; "
                    "drop compile_config, or compile a pre-LLM method"
                )
            kwargs.setdefault("disable_compile", True)
            return orig(*args, **kwargs)

        return generate

    def _wrap_lm_forward(self, orig):
        """The language model's forward: a prefill with images to reduce, a replay of the last prefill, a decoding
        step over a reduced cache, or a plain call."""

        @functools.wraps(orig)
        def forward(*args, **kwargs):
            if args or (self._inert and torch.compiler.is_compiling()):  # keywords only; see _inert
                return orig(*args, **kwargs)
            cache = cache_arg(kwargs)
            if torch.compiler.is_compiling() and not self.capture.pending.masks:
                if self._stateful:
                    raise RuntimeError(
                        "vlm_accel: in-LLM stages and KV eviction do not run under torch.compile; compile only "
                        "pre-LLM methods (or generate without compile_config)"
                    )
                # a decoding step compiled by torch.compile (static cache + compile_config): tensor arithmetic on
                # fixed shapes only, from the slot state kept on the static cache (one graph for every prompt)
                return orig(**SlotState.decode_kwargs(kwargs, cache))
            pending = self.capture.take()
            past = cache.get_seq_length() if cache is not None else 0
            if cache is not None and not past:
                SlotState.forget(cache)  # a reused static cache: the previous request's slots are stale
            if self.stages is not None:
                self.stages.run = None
            if past and not any(bool(m.any()) for m in pending.masks.values()):
                pending = Pending()  # images re-encoded for a continuation whose new tokens hold no placeholder
            if pending.ready():
                if not past:
                    return self._prefill(orig, kwargs, pending)
                logger.warning("vlm_accel: images after a non-empty cache are not reduced")
                self.decoding.current = None
            elif past:
                return self._decode_step(orig, kwargs, cache, past)
            if not past and pending.masks and self.selection.replay is not None:
                return self._prefill(orig, kwargs, pending, replay=self.selection.replay)
            if not past:
                self.decoding.current = None
                if self.kv is not None:
                    return self._plain_prefill(orig, kwargs)
            return orig(**kwargs)

        return forward

    def _decode_step(self, orig, kwargs: dict, cache, past: int):
        made, st = self.decoding.made_by(cache)
        if made is not None and made != self.decoding.prefills and self._stateful:
            raise RuntimeError(
                "vlm_accel: this cache comes from an earlier prefill of this session; with in-LLM stages or "
                "KV eviction only the latest prefill's cache can be continued (finish one request before "
                "starting the next, e.g. use generate, or one accelerated model per request stream)"
            )
        if st is not None:
            self.decoding.current = st
        if self.stages is not None:
            self.stages.begin_decode(cache)
        if self.kv is not None:
            self.kv.begin_decode(cache)
        try:
            out = orig(**st.translate(kwargs, past)) if st is not None else orig(**kwargs)
            if self.kv is not None:
                self._kv_stats(out)
            return out
        finally:
            if self.stages is not None:
                self.stages.run = None
            if self.kv is not None:
                self.kv.end_forward()

    # --- prefill ----------------------------------------------------------------------------------------------
    def _prefill(self, orig, kwargs: dict, pending: Pending, replay: Replay | None = None):
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
            self.decoding.current = None
            return orig(**kwargs)
        if replay is None:
            for m in modalities:
                infos = expand_infos(pending.infos[m], masks[m])
                if infos is None:
                    logger.warning("vlm_accel: %s features and placeholders disagree; running unreduced", m)
                    return orig(**kwargs)
                pending.infos[m] = infos
        t0 = time.perf_counter()
        attn = padding_mask(kwargs.get("attention_mask"), seq)
        keep = ~mask
        merges = []
        if replay is None:
            self.plan = self.selection.select(embeds, masks, pending, attn, keep, merges)
            if self.kv is not None and self.budget.memory_gb is not None:
                self.kv.set_limit(self.plan.kv_max)
            self.selection.replay = Replay(mask, keep.clone(), merges, embeds.detach())
        else:
            keep[:, : replay.keep.shape[1]] = replay.keep
            merges = replay.merges
        n_in = bsz * seq if attn is None else int(attn.sum())
        self.stats = Stats(visual_tokens_in=n_vis, seq_len_in=n_in)
        if self.frame_cache is not None:
            for name in ("frames_in", "frames_encoded", "frames_partial", "patches_in", "patches_encoded"):
                setattr(self.stats, name, getattr(self.frame_cache.stats, name, 0))
        if bool(keep.all()):  # nothing dropped before the LLM: the language model gets exactly its input
            self.stats.visual_tokens_kept, self.stats.seq_len_kept = n_vis, n_in
            self.stats.selection_ms = (time.perf_counter() - t0) * 1e3
            self.decoding.current = None
            index = torch.arange(seq, device=embeds.device).expand(bsz, seq)
            valid = torch.ones_like(mask) if attn is None else attn.bool()
            self.trace = Trace(index, valid, embeds, kwargs.get("position_ids"), kwargs.get("attention_mask"))
            return self._run_lm(orig, dict(kwargs), pending, masks, mask, keep, replay is not None, t0)
        if attn is not None:
            keep &= attn.bool()
        kw, index, valid = _reduced_inputs(kwargs, keep, merges, attn)
        self.stats.visual_tokens_kept = int((mask & keep).sum())  # images and videos
        self.stats.seq_len_kept = int(valid.sum())
        self.stats.selection_ms = (time.perf_counter() - t0) * 1e3
        extra = {k: kw[k] for k in ("visual_pos_masks", "deepstack_visual_embeds") if k in kw}
        self.trace = Trace(index, valid, kw["inputs_embeds"], kw["position_ids"], kw["attention_mask"], extra)
        self.decoding.current = Decode(kw["attention_mask"], seq - kw["attention_mask"].shape[1])
        prepared = kwargs.get("attention_mask")
        run_kw = dict(kw, attention_mask=gather_masks(prepared, index, valid) or fit_to(kw["attention_mask"], prepared))
        return self._run_lm(orig, run_kw, pending, masks, mask, keep, replay is not None, t0)

    def _run_lm(self, orig, run_kw: dict, pending: Pending, masks, mask, keep, replay: bool, t0: float):
        """Run the language model on its (possibly reduced) input ``run_kw``, with the in-LLM stages if any, and
        account for what every layer processed."""
        tr = self.trace
        n_layers = len(self.adapter.language_model.layers)
        stages = self.stages
        vis = mask.gather(1, tr.index) & tr.valid
        if stages is not None:
            segments = []
            if not replay:
                segments = self.selection.lm_segments(
                    masks, pending.infos, keep, tr.index, tr.valid, self.config.llm_budget
                )
            stages.begin_prefill(segments, tr.valid, vis, replay=replay)
        prompt = functools.partial(self._prompt_entries, tr.valid, vis)
        out, kept = self._prefill_with_kv(orig, run_kw, prompt, mask.shape[1])
        run = stages.end(out) if stages is not None else None
        if run is not None:
            run.cache_valid.update({i: v for i, v in kept.items() if i >= stages.starts[0]})
        tr.output_index, tr.output_valid = tr.index, tr.valid
        per_layer = [self.stats.visual_tokens_kept] * n_layers
        if run is not None and run.stages:
            tr.stages = run.stages
            tr.output_index, tr.output_valid = compose((tr.index, tr.valid), run.layout)
            per_layer = stages.visual_per_layer(run)
            self.stats.visual_tokens_kept = per_layer[-1]
            self.stats.seq_len_kept = int(tr.output_valid.sum())
            self.stats.selection_ms = (time.perf_counter() - t0) * 1e3
        self.stats.visual_tokens_per_layer = per_layer
        self.stats.visual_tokens_mean = mean_tokens(per_layer)
        self._record_cache(out)
        return out

    def _plain_prefill(self, orig, kwargs: dict):
        """A prefill that brings no images to reduce (text only, or embeddings prepared by the caller, e.g. a
        stream's held frames): only the KV budget applies. Visual entries are those of ``visual_pos_masks`` when
        given (Qwen3-VL), else unknown (the vision-aware press then ranks every entry alike)."""
        x = kwargs.get("inputs_embeds")
        x = kwargs.get("input_ids") if x is None else x
        bsz, seq = x.shape[:2]
        attn = padding_mask(kwargs.get("attention_mask"), seq)
        valid = torch.ones(bsz, seq, dtype=torch.bool, device=x.device) if attn is None else attn.bool()
        vis = kwargs.get("visual_pos_masks")
        vis = vis.to(x.device).bool() if vis is not None and tuple(vis.shape) == (bsz, seq) else None
        out, _ = self._prefill_with_kv(orig, dict(kwargs), lambda layer: (valid, vis), seq)
        self._record_cache(out)
        return out

    def _prefill_with_kv(self, orig, kw: dict, prompt, full_len: int):
        """Run a prefill under the KV budget (``prompt(layer) -> (valid, visual)`` of each layer's prompt entries);
        when layer 0 kept fewer entries than the decode translation assumed, its kept validity becomes the new
        prefix (``full_len``: the caller's length). Returns ``(output, {layer: kept validity})``."""
        if self.kv is None:
            return orig(**kw), {}
        try:
            out, kept = self.kv.prefill(orig, kw, prompt)
        except BaseException:
            if self.stages is not None:
                self.stages.run = None
            raise
        if 0 in kept:
            self.decoding.kept(kept[0], full_len)
        return out, kept

    def _prompt_entries(self, valid: torch.Tensor, vis: torch.Tensor, layer: int):
        """``(valid [B, n], visual [B, n])`` of the prompt entries layer ``layer`` caches (its in-LLM stage's layout,
        or the language model's input)."""
        run = self.stages.run if self.stages is not None else None
        lay = run.layout_of(layer) if run is not None else None
        if lay is None:
            return valid, vis
        return lay[1], run.vis.gather(1, lay[0]) & lay[1]

    def _kv_evicted(self, layer: int, valid: torch.Tensor, evicted: int) -> None:
        """A decoding step evicted ``evicted`` entries per row of ``layer``'s cache (``kv_max``)."""
        if self.kv is None or not self.kv.decoding:
            return
        if layer == 0:
            self.decoding.evicted(valid, evicted)
        last = self.stages.last if self.stages is not None else None
        if last is not None and layer >= self.stages.starts[0]:
            last.cache_valid[layer] = valid

    def _kv_stats(self, out) -> None:
        """KV bytes really held and entries per layer, after the prefill and after every decoding step."""
        self.stats.kv_bytes, self.stats.kv_entries_per_layer = KVStage.measure(out)

    def _record_cache(self, out) -> None:
        self._kv_stats(out)
        self.decoding.record(cache_of(out))

    # --- outside a forward ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, detailed: bool = False, **vision_inputs) -> list:
        """Vision tower + projector + this session's reduction, outside a forward (e.g. for streaming).

        Takes what the processor returns for images (``pixel_values``, ``image_sizes``, ``image_grid_thw`` ...).
        Returns per image its kept (or merged) features ``[K_i, D]`` in original token order; with ``detailed``, per
        image an :class:`~vlm_accel.prellm.Encoded` (features, the kept tokens' places among the image's tokens,
        deepstack features)."""
        with self._lock:
            self.capture.clear()
            try:
                out = self.adapter.inner.get_image_features(**vision_inputs)
            finally:
                pending = self.capture.take()
            if pending.tower is not None:  # a steered tower: its measured time corrects the next prediction
                self.controller.observe_tower(pending.tower, pending.encode_ms)
            deep = getattr(out, "deepstack_features", None) or []
            encoded = self.selection.encode(out.pooler_output, pending.infos.pop("image"), deep)
            return encoded if detailed else [e.features for e in encoded]


def _reduced_inputs(kwargs: dict, keep: torch.Tensor, merges: list, attn):
    """The language model's keyword arguments for the kept positions ``keep`` ``[B, L]``: per row, kept tokens in
    order (padding dropped too), left-padded to the longest row; merged values written first. Returns ``(kwargs,
    index [B, L'], valid [B, L'])``."""
    embeds = kwargs["inputs_embeds"]
    bsz, seq = keep.shape
    index, valid = reduced_layout(keep)
    kw = dict(kwargs)
    kw["inputs_embeds"] = take(apply_merges(embeds, merges), index)
    attn = torch.ones(bsz, seq, dtype=torch.long, device=embeds.device) if attn is None else attn
    kw["attention_mask"] = take(attn, index) * valid.to(attn.dtype)
    pos = kwargs.get("position_ids")
    if pos is None:
        pos = torch.arange(seq, device=embeds.device).expand(bsz, seq)
    kw["position_ids"] = take(pos.expand(*pos.shape[:-2], bsz, seq), index)
    if kwargs.get("visual_pos_masks") is not None:  # Qwen3-VL deepstack, pruned in step
        vpm = kwargs["visual_pos_masks"].to(embeds.device)
        new_vpm = take(vpm, index) & valid
        deep = []
        for e in kwargs.get("deepstack_visual_embeds") or []:
            full = e.new_zeros(bsz, seq, e.shape[-1])
            full[vpm] = e
            deep.append(take(apply_merges(full, merges), index)[new_vpm])
        kw["visual_pos_masks"], kw["deepstack_visual_embeds"] = new_vpm, deep
    return kw, index, valid


def _frame_cache(adapter: Adapter, threshold: float | None, patches: bool):
    if threshold is None:
        return None
    if not adapter.has_video:
        raise ValueError(f"frame_cache: {adapter.family} has no video input path")
    if patches:
        from .tower.patch_cache import PatchCache

        return PatchCache(adapter, threshold)
    from .tower.frame_cache import FrameCache

    return FrameCache(adapter, threshold)


def _refuse_pickle(*args, **kwargs):
    raise TypeError(
        "an accelerated model cannot be pickled (torch.save / pickle): call session.restore() first, or pickle "
        "copy.deepcopy(model), which is an unaccelerated copy"
    )


def accelerate(
    model,
    budget=0.25,
    method: str = "auto",
    *,
    seed: int = 0,
    frame_cache: float | None = None,
    method_options: dict | None = None,
    kv_press="vision",
    frame_cache_patches: bool = False,
) -> Session:
    """Patch ``model`` in place so its language model runs only on the visual tokens that matter.

    Args:
        model: a ``transformers`` VLM (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
            ``LlavaOnevisionForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``,
            ``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``).
        budget: float in (0, 1] (fraction of visual tokens kept per image / crop), int >= 1 (tokens kept per image
            / crop) or a :class:`Budget`. ``1.0`` leaves the outputs bit-identical.
        method: a name from :func:`vlm_accel.methods`, ``"auto"`` for the family's default, or methods of different
            stages joined by ``+`` (``"visionzip+fastv"``: the pre-LLM one spends ``Budget.visual``, the in-LLM
            one ``Budget.llm``; ``"tome_vit+visionzip"``: the tower spends ``Budget.encoder``). In-LLM methods
            (``fastv``, ``pdrop``): the budget is what the LLM keeps of each image / crop / frame after the last
            stage; ``stats.visual_tokens_mean`` is the per-layer average.
        seed: seed of stochastic methods (``random``).
        frame_cache: reuse the vision encoder's features for video frames whose pixels changed by at most this
            mean absolute difference since the last encoded frame (``0.0``: exact repeats only; ``None``: off).
            ``session.stats.frames_in`` / ``frames_encoded`` count the frames seen and encoded.
        frame_cache_patches: compare frames patch by patch instead (LLaVA-OneVision with a CLIP / SigLIP / DINOv2
            tower): a frame with few changed patches runs the tower on those only, attending to the last fully
            encoded frame's keys / values (``stats.frames_partial``, ``patches_in`` / ``patches_encoded``); at
            ``frame_cache=0.0`` exact, above it an approximation (see the README's frame-cache section).
        method_options: options of the method (of its in-LLM part for a composite), e.g. ``{"layer": 2}`` for
            ``fastv``; ``vlm-accel methods`` lists them. Unknown names or bad values raise ``ValueError``.
        kv_press: how ``Budget(kv=..., kv_max=...)`` evicts KV entries: a name from ``vlm_accel.methods("kv")``
            (``"vision"``: text kept; visual entries by coverage, max-min on the keys, plus a quarter by SnapKV;
            ``"snapkv"``, ``"h2o"``, ``"streaming"``) or a :class:`vlm_accel.kv.Press`.

    Returns:
        A :class:`Session`; ``session.restore()`` (or leaving a ``with`` block) undoes every patch. Accelerating an
        already accelerated model re-configures it: the previous session is restored first.
    """
    budget = Budget.of(budget)
    adapter = adapter_for(model)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int (the seed of stochastic methods), got {type(seed).__name__} {seed!r}")
    check_threshold(frame_cache)
    if frame_cache_patches and frame_cache is None:
        raise ValueError("frame_cache_patches=True refines the frame cache: pass frame_cache= (e.g. 0.0) too")
    config = resolve(adapter, budget, method, method_options)
    get_press(kv_press)  # validates, before the previous session is touched
    previous = getattr(model, _SESSION_ATTR, None)
    if previous is not None:
        logger.info("vlm_accel: model already accelerated (%r); restoring it before re-configuring", previous)
        previous.restore()
    sess = Session(
        model,
        budget,
        config,
        adapter,
        seed=seed,
        frame_cache=frame_cache,
        kv_press=kv_press,
        frame_cache_patches=frame_cache_patches,
    )
    sess._outer = previous  # put back when this session's ``with`` block ends inside the previous one's
    return sess
