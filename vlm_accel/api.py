"""``accelerate()``: patch a VLM instance so its LLM runs on the visual tokens that matter; ``Session.restore()``
undoes it."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from . import methods as _methods
from .adapters import Adapter, ImageInfo, Segment, adapter_for
from .adapters.base import call_arguments, cls_attention
from .control.budget import Budget
from .control.controller import Controller, Plan, TowerChoice
from .kv.compress import KVCompressor
from .kv.presses import get_press
from .kv.quant import nbytes as kv_nbytes
from .llm.layout import cache_arg, compose, reduced_layout, slots
from .llm.layout import take as _take
from .llm.stages import LLMStages, LMSegment
from .llm.static_cache import SlotState
from .methods import Context, Method
from .methods.batch import reduce_segments
from .methods.inllm import mean_tokens
from .tower.merge import ENCODER_METHODS, NEEDS_FULL_GRID, TowerMerge
from .tower.steering import TowerSteering

logger = logging.getLogger(__name__)

_SESSION_ATTR = "_vlm_accel_session"
KV_GROUP, KV_RESIDUAL = 32, 32  # quantized KV: group size, full-precision window of recent entries (KIVI)
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


@dataclass
class _Decode:
    """Translation from the full-length sequence the caller sees to the shorter KV cache of layer 0 (and every layer
    that holds as many entries): ``prefix_mask`` covers the cache's first entries, every later entry is a decoded
    token; ``delta`` = caller positions - cache slots (grows when decoding evicts entries)."""

    prefix_mask: torch.Tensor  # [B, n] validity of the cache's first n entries
    delta: int
    cache: weakref.ref | None = None


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
    encode_ms: float = 0.0  # the vision tower's time in this forward
    tower: TowerChoice | None = None  # the merge chosen for this request's tower (latency_ms steering a tome_vit)

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
        self,
        model,
        budget: Budget,
        method: str,
        adapter: Adapter,
        seed: int = 0,
        frame_cache: float | None = None,
        method_options: dict | None = None,
        kv_press="vision",
        frame_cache_patches: bool = False,
    ):
        self.model = model
        self.budget = budget
        self.adapter = adapter
        self.method_name = method
        pre, llm = _split_method(method)
        self.method = pre or _KEEP_ALL
        self.llm_method = llm
        self.options = (llm or pre).resolve(method_options)
        self._pre_budget, self._llm_budget = _split_budget(budget, pre, llm)
        # the stage a total target steers (the pre-LLM method when there is one, else the in-LLM stages), with that
        # stage's own per-segment budget
        in_llm = pre is None and llm is not None
        self._steered = ("in-LLM", self._llm_budget) if in_llm else ("pre-LLM", self._pre_budget)
        if pre is not None and pre.stage == "encoder":  # a tower merge alone: latency_ms steers the tower only
            self._steered = ("tower", self._pre_budget)
        self.controller = Controller(budget, model, adapter.language_model)
        self.plan: Plan | None = None  # what the controller chose for the last prefill
        self._quotas: dict[int, list[int]] = {}  # id(info) -> per-segment quotas of the last prefill
        self.stages: LLMStages | None = None
        self.kv: KVCompressor | None = None
        self._entered = False
        self._outer: Session | None = None
        self.kv_press = kv_press
        self.stats = Stats()
        self.trace: Trace | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._patched: list[tuple[object, str, object]] = []  # (object, attribute, previous instance value)
        self._pending = _Pending()
        self._decode: _Decode | None = None  # the current request's (the cache being decoded, or the last prefill)
        # cache -> (number of the prefill that made it, that prefill's _Decode or None when it kept everything)
        self._caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._prefills = 0
        self._lock = threading.RLock()  # one top-level call (forward, generate, encode_images) at a time
        self._replay: _Replay | None = None
        self._encoding = False
        self.frame_cache = None
        if frame_cache is not None:
            from .tower.frame_cache import FrameCache

            if not adapter.has_video:
                raise ValueError(f"frame_cache: {adapter.family} has no video input path")
            if frame_cache_patches:
                from .tower.patch_cache import PatchCache

                self.frame_cache = PatchCache(adapter, frame_cache)
            else:
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
        self._patch(
            self.model,
            "prepare_inputs_for_generation",
            self._wrap_generation_inputs(self.model.prepare_inputs_for_generation),
        )
        if "_prepare_position_ids_for_generation" in type(self.model).__dict__:  # Qwen3-VL: continuation positions
            prep = self.model._prepare_position_ids_for_generation
            self._patch(self.model, "_prepare_position_ids_for_generation", self._wrap_generation_positions(prep))
        if hasattr(inner, "compute_3d_position_ids"):  # M-RoPE families derive decode positions from the cache
            self._patch(inner, "compute_3d_position_ids", self._wrap_positions(inner.compute_3d_position_ids))
        steered = self.budget.has_target and self._steered[0] == "in-LLM"
        if self.llm_method is not None and (steered or not _full(self._llm_budget)):
            self.stages = LLMStages(self.llm_method, self.options, lm, self._patch)
        self.tower = _tower_merge(self.method_name, self.budget, self.options, self.adapter, self._patch)
        self.steering = None
        if self.tower is not None and self.budget.latency_ms is not None:
            self.steering = TowerSteering(self.tower, self.controller, self.model, self.adapter)
        b = self.budget
        if b.kv != 1.0 or isinstance(b.kv, int) or b.kv_max is not None or b.kv_important or b.memory_gb is not None:
            self.kv = KVCompressor(
                self.kv_press, lm.layers, b.kv, b.kv_max, on_valid=self._kv_evicted, important=b.kv_important
            )
        # nothing to do at all (budget 1.0): compiled decoding steps go straight through, so they guard on nothing
        self._inert = self.budget.is_full and self.stages is None and self.kv is None and self.tower is None
        # copies and pickles of an accelerated model: a clean unaccelerated copy / a clear error, never wrappers bound
        # to this model's modules
        # threads: whole calls are serialised, so one request's pending / decode state never mixes with another's
        forward, generate = self.model.forward, self._uncompiled_stages(self.model.generate)
        if self.steering is not None:
            forward, generate = self._noting_prompt(forward), self._noting_prompt(generate)
        self._patch(self.model, "forward", self._locked(forward), keep_previous=True)
        self._patch(self.model, "generate", self._locked(generate), keep_previous=True)
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
        self._pending = _Pending()
        self._decode = None
        self._caches = weakref.WeakKeyDictionary()
        self._replay = None

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

    # --- wrappers ---------------------------------------------------------------------------------------------
    def _wrap_features(self, orig, modality: str):
        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def get_features(*args, **kwargs):
            if self._encoding:  # e.g. Qwen3-VL's get_video_features calls get_image_features
                return orig(*args, **kwargs)
            call = call_arguments(sig, args, kwargs)
            layer = self.adapter.importance_layer(call) if "importance" in self.method.needs else None
            captured = {}
            handle = None
            if layer is not None:

                def grab(mod, a, kw):
                    captured["hidden"] = a[0] if a else kw["hidden_states"]

                handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
            returns = kwargs.get("return_dict")
            if returns is None:  # the decorator's default: the config's return_dict
                returns = getattr(getattr(orig, "__self__", self.adapter.inner).config, "return_dict", True)
            tuple_out = returns is False  # computed as a dict, handed back as the caller's tuple
            if tuple_out:
                kwargs = dict(kwargs, return_dict=True)
            self._encoding = True
            t0 = time.perf_counter()
            try:
                if self.steering is not None:  # latency_ms: this request's merge, chosen before the tower runs
                    self._pending.tower = self.steering.before_tower(call)
                if self.tower is not None:  # merging inside the vision tower, for this call only
                    self.tower.begin(call, modality)
                out = orig(*args, **kwargs)
            finally:
                self._encoding = False
                run = self.tower.end() if self.tower is not None else None
                if handle is not None:
                    handle.remove()
            cls_attn = None
            if "hidden" in captured:
                with torch.no_grad():
                    cls_attn = cls_attention(layer, captured["hidden"])
            self._pending.encode_ms += (time.perf_counter() - t0) * 1e3
            feats = out.pooler_output if hasattr(out, "pooler_output") else out[-1]
            describe = self.adapter.describe if modality == "image" else self.adapter.describe_video
            infos = describe(list(feats), call, cls_attn)
            if run is not None:
                self.tower.fill_alive(run, infos, call)
            self._pending.infos.setdefault(modality, []).extend(infos)
            return out.to_tuple() if tuple_out else out

        return get_features

    def _noting_prompt(self, orig):
        """``Budget(latency_ms=...)`` with a merge inside the vision tower: a request's prompt is noted when it
        starts, for the merge chosen right before its tower runs (:class:`~vlm_accel.tower.steering.TowerSteering`)."""

        @functools.wraps(orig)
        def call(*args, **kwargs):
            if not torch.compiler.is_compiling():
                self.steering.note_prompt(kwargs)
            return orig(*args, **kwargs)

        return call

    def _uncompiled_stages(self, orig):
        """In-LLM stages and KV eviction keep per-step Python state, so their decoding steps cannot be compiled:
        ``generate`` asked to compile them (``compile_config``) is refused; transformers' automatic compilation of
        static-cache decoding (on GPUs) is turned off for them (``disable_compile``)."""

        @functools.wraps(orig)
        def generate(*args, **kwargs):
            if self.stages is None and self.kv is None:
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

    def _locked(self, orig):
        @functools.wraps(orig)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():  # a compiled step runs inside a call that holds the lock already
                return orig(*args, **kwargs)
            with self._lock:
                return orig(*args, **kwargs)

        return call

    def _made_by(self, cache) -> tuple[int | None, _Decode | None]:
        """``(number of the prefill that made cache, its decode state when it reduced the prompt)``; ``(None, None)``
        for a cache no prefill of this session made."""
        return (None, None) if cache is None else self._caches.get(cache, (None, None))

    def _decode_for(self, cache) -> _Decode | None:
        return self._made_by(cache)[1]

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
            if args or (self._inert and torch.compiler.is_compiling()):  # keywords only; see _inert
                return orig(*args, **kwargs)
            cache = cache_arg(kwargs)
            if torch.compiler.is_compiling() and not self._pending.masks:
                return self._compiled_decode(orig, kwargs, cache)
            pending, self._pending = self._pending, _Pending()
            past = cache.get_seq_length() if cache is not None else 0
            if cache is not None and not past:
                SlotState.forget(cache)  # a reused static cache: the previous request's slots are stale
            stages = self.stages
            if stages is not None:
                stages.run = None
            if past and not any(bool(m.any()) for m in pending.masks.values()):
                pending = _Pending()  # images re-encoded for a continuation whose new tokens hold no placeholder
            if pending.ready():
                if past:
                    logger.warning("vlm_accel: images after a non-empty cache are not reduced")
                    self._decode = None
                else:
                    return self._prefill(orig, kwargs, pending)
            elif past:
                made, st = self._made_by(cache)
                if made is not None and made != self._prefills and (stages is not None or self.kv is not None):
                    raise RuntimeError(
                        "vlm_accel: this cache comes from an earlier prefill of this session; with in-LLM stages or "
                        "KV eviction only the latest prefill's cache can be continued (finish one request before "
                        "starting the next, e.g. use generate, or one accelerated model per request stream)"
                    )
                if st is not None:
                    self._decode = st
                if stages is not None:
                    stages.begin_decode(cache)
                if self.kv is not None:
                    self.kv.begin_decode(cache)
                try:
                    if st is not None:
                        out = orig(**self._translate_decode(kwargs, past))
                    else:
                        out = orig(**kwargs)
                    if self.kv is not None or self.budget.kv_bits < 16:
                        self._kv_stats(out)
                    return out
                finally:
                    if stages is not None:
                        stages.run = None
                    if self.kv is not None:
                        self.kv.end_forward()
            if not past and pending.masks and self._replay is not None:
                return self._prefill(orig, kwargs, pending, replay=self._replay)
            if not past:
                self._decode = None
                if self.kv is not None or self.budget.kv_bits < 16:
                    return self._plain_prefill(orig, kwargs)
            return orig(**kwargs)

        return forward

    def _wrap_generation_inputs(self, orig):
        """``generate(input_ids=previous.sequences, past_key_values=previous_cache)`` (multi-turn continuation) feeds
        the tokens past ``cache.get_seq_length()``; a reduced cache is shorter than the sequence it stands for by
        ``delta``, so the new tokens start ``delta`` later."""

        @functools.wraps(orig)
        def prepare(input_ids, *args, next_sequence_length=None, is_first_iteration=False, **kwargs):
            cache = cache_arg(kwargs)
            st = self._decode_for(cache)
            if (
                is_first_iteration
                and next_sequence_length is not None
                and st is not None
                and next_sequence_length == input_ids.shape[1] - cache.get_seq_length()
            ):
                next_sequence_length -= st.delta
            kwargs.update(next_sequence_length=next_sequence_length, is_first_iteration=is_first_iteration)
            return orig(input_ids, *args, **kwargs)

        return prepare

    def _wrap_generation_positions(self, orig):
        """``generate`` continuing from a reduced cache: the model compares the cache length with the caller's token
        types to find new images; the cache is ``delta`` shorter than the sequence it stands for, so its images would
        look new (and lose their M-RoPE positions). The types are shown as the cache sees them."""

        @functools.wraps(orig)
        def prepare(inputs_tensor, model_kwargs, *args, **kwargs):
            cache = cache_arg(model_kwargs)
            st = self._decode_for(cache)
            types = model_kwargs.get("mm_token_type_ids")
            if st is not None and st.delta > 0 and torch.is_tensor(types) and types.dim() == 2:
                past = cache.get_seq_length()
                if past and not bool(types[:, past + st.delta :].any()):
                    model_kwargs = dict(model_kwargs, mm_token_type_ids=types[:, st.delta :])
            return orig(inputs_tensor, model_kwargs, *args, **kwargs)

        return prepare

    def _wrap_positions(self, orig):
        """Without an attention mask, M-RoPE models number decode tokens from the cache length, which is shorter
        than the caller's sequence by what was pruned: shift them back to the caller's positions."""

        @functools.wraps(orig)
        def compute_3d_position_ids(*args, **kwargs):
            pos = orig(*args, **kwargs)
            if self._inert and torch.compiler.is_compiling():
                return pos
            cache = cache_arg(kwargs)
            if torch.compiler.is_compiling():
                slots = SlotState.of(cache)
                if pos is None or kwargs.get("attention_mask") is not None or slots is None:
                    return pos
                return torch.where(cache.get_seq_length() > 0, pos + slots.delta, pos)
            st = self._decode_for(cache)
            if (
                pos is not None
                and kwargs.get("attention_mask") is None
                and st is not None
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
                if tr is None or tuple(tr.output_index.shape) != tuple(logits.shape[:2]):
                    raise ValueError(
                        "vlm_accel: labels cover the full sequence but the logits are reduced and no matching "
                        "reduction was recorded; pass labels to the same forward call as the images"
                    )
                dev = labels.device
                labels = labels.gather(1, tr.output_index.to(dev)).masked_fill(~tr.output_valid.to(dev), -100)
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
            self._select(embeds, masks, pending, attn, keep, merges)
            self._replay = _Replay(mask, keep.clone(), merges, embeds.detach())
        else:
            keep[:, : replay.keep.shape[1]] = replay.keep
            merges = replay.merges
        n_in = bsz * seq if attn is None else int(attn.sum())
        self.stats = Stats(visual_tokens_in=n_vis, seq_len_in=n_in)
        if self.frame_cache is not None:
            for name in ("frames_in", "frames_encoded", "frames_partial", "patches_in", "patches_encoded"):
                setattr(self.stats, name, getattr(self.frame_cache.stats, name, 0))
        if bool(keep.all()):  # nothing dropped before the LLM: the language model gets exactly its input
            self.stats.visual_tokens_kept = n_vis
            self.stats.seq_len_kept = n_in
            self.stats.selection_ms = (time.perf_counter() - t0) * 1e3
            self._decode = None
            index = torch.arange(seq, device=embeds.device).expand(bsz, seq)
            valid = torch.ones_like(mask) if attn is None else attn.bool()
            kw = dict(kwargs)
            self.trace = Trace(index, valid, embeds, kwargs.get("position_ids"), kwargs.get("attention_mask"))
            return self._run_lm(orig, kw, kw, pending, masks, mask, keep, replay is not None, t0)

        # reduced layout: per row, kept tokens in order (padding dropped too), left-padded to the longest row
        if attn is not None:
            keep &= attn.bool()
        index, valid = reduced_layout(keep)

        def take(x: torch.Tensor) -> torch.Tensor:  # [..., B, L(, D)] -> [..., B, L'(, D)]
            return _take(x, index)

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
        self._decode = _Decode(kw["attention_mask"], seq - kw["attention_mask"].shape[1])
        run_kw = dict(kw, attention_mask=_fit_to(kw["attention_mask"], kwargs.get("attention_mask")))
        return self._run_lm(orig, run_kw, kw, pending, masks, mask, keep, replay is not None, t0)

    def _run_lm(self, orig, run_kw: dict, kw: dict, pending, masks, mask, keep, replay: bool, t0: float):
        """Run the language model on its (possibly reduced) input ``run_kw``, with the in-LLM stages if any, and
        account for what every layer processed."""
        tr = self.trace
        n_layers = len(self.adapter.language_model.layers)
        stages = self.stages
        vis = mask.gather(1, tr.index) & tr.valid
        if stages is not None:
            segments = [] if replay else self._lm_segments(masks, pending.infos, keep, tr.index, tr.valid)
            stages.begin_prefill(segments, tr.valid, vis, replay=replay)
        out, kept = self._prefill_with_kv(
            orig, run_kw, functools.partial(self._prompt_entries, tr.valid, vis), mask.shape[1]
        )
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
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        bsz, seq = (embeds if embeds is not None else ids).shape[:2]
        dev = (embeds if embeds is not None else ids).device
        attn = _padding_mask(kwargs.get("attention_mask"), seq)
        valid = torch.ones(bsz, seq, dtype=torch.bool, device=dev) if attn is None else attn.bool()
        vis = kwargs.get("visual_pos_masks")
        vis = vis.to(dev).bool() if vis is not None and tuple(vis.shape) == (bsz, seq) else None
        out, _ = self._prefill_with_kv(orig, dict(kwargs), lambda layer: (valid, vis), seq)
        self._record_cache(out)
        return out

    def _prefill_with_kv(self, orig, kw: dict, prompt, full_len: int):
        """Run a prefill under the KV budget: quantized cache (``kv_bits``), eviction (``kv`` / ``kv_max``; ``prompt(
        layer) -> (valid, visual)`` of each layer's prompt entries). When the kept cache is shorter than what the
        decode translation assumed, layer 0's kept validity becomes the new prefix (``full_len``: the caller's
        length). Returns ``(output, {layer: kept validity})``."""
        if self.budget.kv_bits < 16:
            kw = self._quantized_cache(kw)
        if self.kv is not None:
            _refuse_static(cache_arg(kw))
            self.kv.begin_prefill(prompt)
        try:
            out = orig(**kw)
        except BaseException:
            if self.stages is not None:
                self.stages.run = None
            if self.kv is not None:
                self.kv.end_forward()
            raise
        kept = self.kv.end_prefill(_cache_of(out)) if self.kv is not None else {}
        expected = full_len if self._decode is None else self._decode.prefix_mask.shape[1]
        if 0 in kept and kept[0].shape[1] != expected:
            self._decode = _Decode(kept[0], full_len - kept[0].shape[1])
        return out, kept

    def _quantized_cache(self, kw: dict) -> dict:
        """``Budget(kv_bits=...)``: the prefill's fresh cache replaced by a quantized one (``generate`` carries on
        with the cache the model returns). A cache the caller filled or chose (static, quantized) is left alone."""
        from transformers.cache_utils import DynamicCache

        from .kv.quant import MixedPrecisionKVCache, QuantizedKVCache

        key = "cache" if "cache" in kw else "past_key_values"
        cache = kw.get(key)
        if cache is None and not kw.get("use_cache", True):
            return kw
        if cache is not None and (type(cache) is not DynamicCache or cache.get_seq_length()):
            return kw
        b = self.budget
        q = dict(group_size=KV_GROUP, residual=KV_RESIDUAL)
        if b.kv_important:
            new = MixedPrecisionKVCache(bits=b.kv_bits, high_bits=8, **q)
        else:
            new = QuantizedKVCache(bits=b.kv_bits, **q)
        return dict(kw, **{key: new})

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
        if layer == 0 and self._decode is not None:
            self._decode.prefix_mask = valid
            self._decode.delta += evicted
        last = self.stages.last if self.stages is not None else None
        if last is not None and layer >= self.stages.starts[0]:
            last.cache_valid[layer] = valid

    def _lm_segments(self, masks, infos, keep, index, valid) -> list[LMSegment]:
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
                alloc = self._quotas.get(id(info)) if self._steered[0] == "in-LLM" else None
                for j, seg in enumerate(self._segments(info)):
                    sr, sc = r[seg.idx.to(r.device)], c[seg.idx.to(c.device)]
                    ok = (where[sr, sc] >= 0) & slot_ok[sr, sc]
                    pos = where[sr, sc][ok]
                    if pos.numel():
                        final = self._llm_budget.visual_quota(pos.numel(), seg.units)
                        if alloc is not None:
                            final = min(final, alloc[j])
                        out.append(LMSegment(int(sr[0]), pos, final))
        return out

    def _kv_stats(self, out) -> None:
        """KV bytes really held (packed quantized data, scales, full-precision window) and entries per layer, after
        the prefill and after every decoding step."""
        cache = _cache_of(out)
        self.stats.kv_bytes = kv_nbytes(cache) if cache is not None else 0
        self.stats.kv_entries_per_layer = [int(layer.get_seq_length()) for layer in getattr(cache, "layers", [])]

    def _record_cache(self, out) -> None:
        cache = _cache_of(out)
        self._kv_stats(out)
        if cache is None:
            return
        if self._decode is not None:
            self._decode.cache = weakref.ref(cache)
            SlotState.record(cache, self._decode.prefix_mask, self._decode.delta)
        self._prefills += 1
        self._caches[cache] = (self._prefills, self._decode)

    def _select(self, embeds, masks: dict, pending: _Pending, attn, keep, merges) -> None:
        """Run the method on every segment of every input (per modality, ``pending.infos[m]`` are the inputs behind
        ``masks[m]``, in placeholder order), under the quotas the controller sets.

        Marks kept positions in ``keep`` ``[B, L]`` and appends merge ops ``(rows, cols, src_rows, src_cols,
        weights [K, n])`` to ``merges``, to be applied to any per-position tensor."""
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
        self._quotas = self.controller.quotas(
            list(distinct.values()), self._alive_segments, self._steered, pending.encode_ms, attn, masks, pending.tower
        )
        self.plan = self.controller.plan
        if self.kv is not None and self.budget.memory_gb is not None:
            self.kv.kv_max = self.plan.kv_max
        pre_quotas = self._quotas if self._steered[0] == "pre-LLM" else {}
        done: dict[int, list | None] = {}
        for m, _, info, r, c, feats in located:
            if id(info) not in done:
                query = self._query(embeds, masks[m], attn, int(r[0])) if "query" in self.method.needs else None
                done[id(info)] = self._reduce(feats, info, query, pre_quotas.get(id(info)))
            parts = done[id(info)]
            if parts is None:
                keep[r, c] = True  # nothing to reduce: structural tokens stay too
                continue
            for idx, kept, weights in parts:
                keep[r[kept], c[kept]] = True
                if weights is not None:
                    merges.append((r[kept], c[kept], r[idx], c[idx], weights))

    def _alive_segments(self, info: ImageInfo) -> list[Segment]:
        """The budgeted segments of ``info``, restricted to the tokens a tower merge left (``info.alive``)."""
        segments = self._segments(info)
        if info.alive is None:
            return segments
        alive = info.alive.to(segments[0].idx.device) if segments else info.alive
        return [dataclasses.replace(s, idx=s.idx[alive[s.idx]]) for s in segments]

    def _reduce(self, x: torch.Tensor, info: ImageInfo, query: torch.Tensor | None = None, quotas=None):
        """Apply the method to each segment of one input ``x`` ``[n_tokens, D]`` (``quotas``: per segment, from the
        controller; ``None``: each segment's own budget).

        Returns ``None`` when the budget keeps everything, else per segment ``(idx [n], kept [K], weights [K, n] |
        None)`` with indices into ``x``. Tokens a tower merge folded away (``info.alive``) never reach the method."""
        segments = self._alive_segments(info)
        if quotas is None:
            quotas = [self._pre_budget.visual_quota(s.idx.numel(), s.units) for s in segments]
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
                generator=self._generator,
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

    @torch.no_grad()
    def encode_images(self, detailed: bool = False, **vision_inputs) -> list:
        """Vision tower + projector + this session's reduction, outside a forward (e.g. for streaming).

        Takes what the processor returns for images (``pixel_values``, ``image_sizes``, ``image_grid_thw`` ...).
        Returns per image its kept (or merged) features ``[K_i, D]`` in original token order; with ``detailed``, per
        image an :class:`Encoded` (features, the kept tokens' places among the image's tokens, deepstack features)."""
        with self._lock:
            return self._encode_images(detailed, vision_inputs)

    def _encode_images(self, detailed: bool, vision_inputs: dict) -> list:
        self._pending = _Pending()
        out = self.adapter.inner.get_image_features(**vision_inputs)
        infos = self._pending.infos.pop("image")
        if self._pending.tower is not None:  # a steered tower: its measured time corrects the next prediction
            self.controller.observe_tower(self._pending.tower, self._pending.encode_ms)
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
        return budget_segments(info, self.budget.video, self.method)

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
        n_new = int(past) + q - st.prefix_mask.shape[1]  # decoded entries after this step: never padding
        new = st.prefix_mask.new_ones(st.prefix_mask.shape[0], n_new)
        if attn is not None and not (torch.is_tensor(attn) and attn.dim() == 2):
            # prepared for a static cache (from the reduced cache length): rebuild it
            kw["attention_mask"] = _fit_to(torch.cat([st.prefix_mask, new], dim=1), attn)
        elif attn is not None and attn.shape[1] >= past + st.delta + q:
            kw["attention_mask"] = torch.cat([st.prefix_mask, new], dim=1).to(attn.dtype)
        if kwargs.get("position_ids") is None:
            dev = st.prefix_mask.device
            kw["position_ids"] = (torch.arange(q, device=dev) + past + st.delta)[None].expand(
                st.prefix_mask.shape[0], q
            )
        return kw

    def _compiled_decode(self, orig, kwargs: dict, cache):
        """A decoding step traced by ``torch.compile`` (``generate(cache_implementation="static", compile_config=
        ...)`` compiles every step after the prefill): tensor arithmetic on fixed shapes only, from the reduced
        prompt's slot state kept on the static cache (:mod:`vlm_accel.llm.static_cache`), so one graph serves every
        prompt at any budget. In-LLM stages and KV eviction need per-step Python state: they run only uncompiled."""
        if self.stages is not None or self.kv is not None:
            raise RuntimeError(
                "vlm_accel: in-LLM stages and KV eviction do not run under torch.compile; compile only pre-LLM "
                "methods (or generate without compile_config)"
            )
        return orig(**SlotState.decode_kwargs(kwargs, cache))


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


def _cache_of(out):
    """The cache a model output carries (``cache`` or ``past_key_values``), or ``None``."""
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def _refuse_pickle(*args, **kwargs):
    raise TypeError(
        "an accelerated model cannot be pickled (torch.save / pickle): call session.restore() first, or pickle "
        "copy.deepcopy(model), which is an unaccelerated copy"
    )


def _refuse_static(cache) -> None:
    layers = getattr(cache, "layers", None) or []
    if any(getattr(layer, "max_cache_len", None) is not None for layer in layers):
        raise ValueError(
            "KV eviction (Budget.kv / kv_max) needs a growing cache; static caches keep their full length "
            "(drop cache_implementation='static')"
        )


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


def _keep_all(x, k, ctx):  # never called: the pre-LLM budget of an in-LLM-only session keeps everything
    raise RuntimeError("no pre-LLM method")


_KEEP_ALL = Method("none", _keep_all)


def _find_method(name: str) -> Method:
    """A registered method, or a method acting inside the vision tower (``tome_vit``)."""
    if isinstance(name, str) and name in ENCODER_METHODS:
        return ENCODER_METHODS[name]
    return _methods.get(name)


def _split_method(name: str) -> tuple[Method | None, Method | None]:
    """``"visionzip"`` / ``"fastv"`` / ``"visionzip+fastv"`` / ``"tome_vit+visionzip"`` -> (pre-LLM method, in-LLM
    method). A vision-tower method (stage ``"encoder"``) without a pre-LLM method stands in for it: it selects
    nothing after the tower (every token that leaves the tower alive reaches the LLM)."""
    if not isinstance(name, str):
        _methods.get(name)  # raises TypeError naming the methods
    parts = [p.strip() for p in name.split("+")]
    found = [_find_method(p) for p in parts]
    pre = [m for m in found if m.stage == "pre"]
    llm = [m for m in found if m.stage == "llm"]
    enc = [m for m in found if m.stage == "encoder"]
    if len(pre) > 1 or len(llm) > 1 or len(enc) > 1:
        raise ValueError(
            f"method {name!r}: combine at most one vision-tower method, one pre-LLM method and one in-LLM method, "
            f"e.g. 'visionzip+fastv' or 'tome_vit+visionzip' "
            f"(tower: {sorted(ENCODER_METHODS)}; "
            f"pre-LLM: {[m for m in _methods.names() if _methods.get(m).stage == 'pre']}; "
            f"in-LLM: {[m for m in _methods.names() if _methods.get(m).stage == 'llm']})"
        )
    if enc and pre and pre[0].name in NEEDS_FULL_GRID:
        raise ValueError(
            f"method {name!r}: {pre[0].name} needs every token of the image's grid, but {enc[0].name} has merged "
            "tokens inside the vision tower; combine it with a method that selects among tokens (visionzip, "
            "divprune, tome, random, relevance)"
        )
    return (pre[0] if pre else (enc[0] if enc else None)), (llm[0] if llm else None)


def _split_budget(budget: Budget, pre: Method | None, llm: Method | None) -> tuple[Budget, Budget]:
    """(budget of the pre-LLM method, budget of the in-LLM stages), each read through ``visual_quota``. A
    vision-tower method standing in for the pre-LLM one keeps everything after the tower (its own share:
    :func:`_encoder_budget`)."""
    full = Budget(video=budget.video)
    tower_only = pre is not None and pre.stage == "encoder"
    if tower_only:
        pre = None
    if llm is None:
        if budget.llm != 1.0:
            raise ValueError("Budget.llm is the in-LLM share of a composite method such as 'visionzip+fastv'")
        return (full if tower_only else budget), full
    if pre is None:
        if budget.llm != 1.0 and budget.visual != 1.0:
            raise ValueError(
                f"{llm.name} alone takes one budget: pass Budget(visual=...) (the share kept after its last stage)"
            )
        share = budget.llm if budget.llm != 1.0 else budget.visual
        return full, Budget(visual=share, video=budget.video)
    return Budget(visual=budget.visual, video=budget.video), Budget(visual=budget.llm, video=budget.video)


def _encoder_budget(budget: Budget, name: str) -> tuple[Method | None, Budget | None]:
    """(the vision-tower method of ``name`` or ``None``, what leaves the tower per image / crop): ``Budget.visual``
    for the tower method alone, ``Budget.encoder`` in a composite (``"tome_vit+visionzip"``, ``"tome_vit+fastv"``)."""
    parts = [_find_method(p.strip()) for p in name.split("+")]
    enc = next((m for m in parts if m.stage == "encoder"), None)
    if enc is None:
        if budget.encoder != 1.0:
            raise ValueError(
                "Budget.encoder is the vision tower's share in a composite method such as 'tome_vit+visionzip'"
            )
        return None, None
    if len(parts) == 1:
        if budget.encoder != 1.0:
            raise ValueError(f"{enc.name} alone takes one budget: pass Budget(visual=...) (what leaves the tower)")
        return enc, Budget(visual=budget.visual)
    return enc, Budget(visual=budget.encoder)


def _tower_merge(name: str, budget: Budget, options: dict, adapter: Adapter, patch) -> TowerMerge | None:
    """Install merging inside the vision tower when ``name`` has a tower method and its budget reduces (its options
    are the session's when it is the only method, its defaults in a composite)."""
    enc, share = _encoder_budget(budget, name)
    if enc is None or (_full(share) and budget.latency_ms is None):  # a latency target steers it per request
        return None
    opts = options if name.strip() == enc.name else enc.resolve(None)
    return TowerMerge.install(adapter, share, opts, patch)


def _full(b: Budget) -> bool:
    return b.visual == 1.0 and not isinstance(b.visual, int)


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
        method: a name from :func:`vlm_accel.methods`, ``"auto"`` for the family's default, or a pre-LLM and an
            in-LLM method joined by ``+`` (``"visionzip+fastv"``: the pre-LLM one spends ``Budget.visual``, the in-LLM
            one ``Budget.llm``). In-LLM methods (``fastv``, ``pdrop``): the budget is what the LLM keeps of each
            image / crop / frame after the last stage; ``stats.visual_tokens_mean`` is the per-layer average.
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
        kv_press: how ``Budget(kv=..., kv_max=...)`` evicts KV entries: ``"vision"`` (text kept; visual entries by
            coverage, max-min on the keys, plus a quarter by SnapKV), ``"snapkv"``, ``"h2o"``, ``"streaming"``, or a
            :class:`vlm_accel.kv.Press`.

    Returns:
        A :class:`Session`; ``session.restore()`` (or leaving a ``with`` block) undoes every patch. Accelerating an
        already accelerated model re-configures it: the previous session is restored first.
    """
    budget = Budget.of(budget)
    adapter = adapter_for(model)
    if frame_cache_patches and frame_cache is None:
        raise ValueError("frame_cache_patches=True refines the frame cache: pass frame_cache= (e.g. 0.0) too")
    name = _auto_method(adapter) if method == "auto" else method
    if isinstance(name, str) and "+" in name:
        name = "+".join(_auto_method(adapter) if p.strip() == "auto" else p.strip() for p in name.split("+"))
    pre, llm = _split_method(name)  # validates
    if budget.latency_ms is not None and pre is None:
        raise ValueError(
            f"Budget(latency_ms=...) steers a pre-LLM method; {name!r} has none: use e.g. 'divprune' or "
            f"'visionzip+{name}' (the in-LLM part then spends Budget.llm)"
        )
    options = (llm or pre).resolve(method_options)
    _split_budget(budget, pre, llm)
    if _encoder_budget(budget, name)[0] is not None:
        adapter.tower_spec()  # ValueError for towers it cannot merge inside
        if (budget.tokens is not None or budget.memory_gb is not None) and pre is not None and pre.stage == "encoder":
            raise ValueError(
                f"Budget tokens / memory_gb targets steer a pre-LLM method; {name!r} has none: use e.g. "
                "'tome_vit+visionzip' (the tower then spends Budget.encoder), or latency_ms, which steers the tower"
            )
    if llm is not None:
        from .methods.inllm import stage_layers

        stage_layers(llm.name, options, len(adapter.language_model.layers))
    get_press(kv_press)  # validates, before the previous session is touched
    previous = getattr(model, _SESSION_ATTR, None)
    if previous is not None:
        logger.info("vlm_accel: model already accelerated (%r); restoring it before re-configuring", previous)
        previous.restore()
    sess = Session(
        model,
        budget,
        name,
        adapter,
        seed=seed,
        frame_cache=frame_cache,
        method_options=method_options,
        kv_press=kv_press,
        frame_cache_patches=frame_cache_patches,
    )
    sess._outer = previous  # put back when this session's ``with`` block ends inside the previous one's
    return sess
