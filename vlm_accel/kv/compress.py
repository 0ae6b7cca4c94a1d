"""Applying a press to a decoder: evict KV entries after prefill (``kv``) and while decoding (``kv_max``).

Forward hooks on every layer's attention module: the pre-hook keeps the attention input (for presses that recompute
query rows), the post-hook evicts from that layer's cache right after the layer attended with it, so the prompt's
own outputs are exact and only later tokens see the compressed cache. Every row keeps the same number of entries
per head (left-padded with masked slots across rows), so one validity mask per layer describes the cache; the owner
(``Session`` or :class:`KVPress`) turns it into the attention masks of later steps.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..llm.attention import project_queries
from ..llm.decode import Decode, Decoding
from ..llm.layout import cache_arg, cache_of
from .presses import Press, PressInput, get_press, quota, select


def _layer_cache(cache, i: int):
    layers = getattr(cache, "layers", None)
    return layers[i] if layers is not None and i < len(layers) else None


def _set_entries(layer, index: torch.Tensor) -> None:
    """Keep ``index`` ``[B, H_kv, K]`` of a cache layer's entries (per row and head)."""
    keep = getattr(layer, "keep_entries", None)
    if keep is not None:  # quantized / mixed-precision layers know their own storage
        keep(index)
        return
    idx = index[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
    layer.keys = layer.keys.gather(2, idx)
    layer.values = layer.values.gather(2, idx.expand(-1, -1, -1, layer.values.shape[-1]))


def _entries(layer) -> tuple[torch.Tensor, torch.Tensor]:
    get = getattr(layer, "full_entries", None)
    return get() if get is not None else (layer.keys, layer.values)


class KVCompressor:
    """Evicts KV entries of ``layers`` with ``press``.

    Args:
        press: a :class:`Press` or its name.
        layers: the decoder layers (each with ``self_attn``).
        kv: after prefill, entries kept per layer and row: a fraction of the prompt's (float in (0, 1]) or a count.
        kv_max: during decoding, at most this many entries per layer and row (``None``: no bound).
        on_valid: ``callback(layer, valid [B, n], evicted)`` after every eviction: ``valid`` covers the layer's first
            ``n`` cache entries (later entries are decoded tokens, all valid), ``evicted`` how many left each row.
        important: mixed precision: this fraction of each row's kept prompt entries, by press score, is flagged
            important on cache layers that support it (:class:`vlm_accel.kv.quant.MixedPrecisionKVLayer`).
    """

    def __init__(
        self, press, layers: nn.ModuleList, kv=1.0, kv_max: int | None = None, on_valid=None, important: float = 0.0
    ):
        self.press: Press = get_press(press)
        self.kv, self.kv_max, self.important = kv, kv_max, important
        self.on_valid = on_valid
        self.layers = layers
        self.prompt: dict | None = None  # layer -> (valid, visual) while a prefill runs
        self.valid: dict[int, torch.Tensor] = {}  # layer -> validity of its first n entries
        self.kept: dict[int, torch.Tensor] = {}  # layer -> [B, H_kv, K] prompt entries kept by the last prefill
        self.decoding = False
        self.cache: weakref.ref | None = None
        self._captured: dict[int, tuple] = {}
        self._accumulated: dict[int, torch.Tensor] = {}
        self._hooks = []
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            self._hooks.append(attn.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self._hooks.append(attn.register_forward_hook(self._post(i), with_kwargs=True))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # --- driven by the owner ------------------------------------------------------------------------------------
    def begin_prefill(self, prompt) -> None:
        """``prompt(layer) -> (valid [B, n], visual [B, n] | None)`` for the prompt entries each layer will cache."""
        self.prompt, self.decoding = prompt, False
        self.valid, self.kept, self._accumulated = {}, {}, {}

    def end_prefill(self, cache) -> dict[int, torch.Tensor]:
        """After the prefill forward: per layer, the validity of its kept entries."""
        self.prompt = None
        self.cache = weakref.ref(cache) if cache is not None else None
        return dict(self.valid)

    def begin_decode(self, cache) -> bool:
        """Before a decoding forward; True when ``cache`` is the one this compressor manages."""
        self.decoding = self.cache is not None and self.cache() is cache and bool(self.valid)
        return self.decoding

    def end_forward(self) -> None:
        self.decoding = False
        self.prompt = None

    # --- hooks --------------------------------------------------------------------------------------------------
    def _pre(self, i: int):
        def hook(attn, args, kwargs):
            if self.prompt is None and not (self.decoding and self.kv_max is not None):
                return None  # nothing to evict in this forward: keep nothing
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self._captured[i] = (hidden, kwargs.get("position_embeddings"))
            return None

        return hook

    def _post(self, i: int):
        def hook(attn, args, kwargs, output):
            captured = self._captured.pop(i, None)
            if captured is None:
                return None
            cache = cache_arg(kwargs)
            layer = _layer_cache(cache, i)
            if layer is None:
                return None
            with torch.no_grad():
                if self.prompt is not None:
                    self._compress_prompt(i, attn, layer, *captured)
                elif self.decoding and self.kv_max is not None:
                    self._bound(i, attn, layer, *captured)
            return None

        return hook

    def _compress_prompt(self, i, attn, layer, hidden, pe) -> None:
        valid, visual = self.prompt(i)
        keys, values = _entries(layer)
        n = keys.shape[2]
        valid = valid.bool()
        target = quota(valid.sum(1), self.kv)
        if self.kv_max is not None:
            target = target.clamp(max=self.kv_max)
        inp = PressInput(attn, hidden, pe, keys, values, valid, visual, keep=target)
        marks = self.important > 0 and hasattr(layer, "set_important")
        if bool((target >= valid.sum(1)).all()) and bool(valid.all()) and not marks:
            self.valid[i] = valid
            self.kept[i] = torch.arange(n, device=keys.device).expand(keys.shape[0], keys.shape[1], n)
            return
        scores = self.press.score(inp)
        index, new_valid = select(scores, valid, target)
        self.kept[i] = index
        kept_scores = scores.gather(2, index).masked_fill(~new_valid[:, None, :], float("-inf"))
        if getattr(self.press, "accumulates", False):  # entries kept outright (+inf) start as the heaviest hitters
            heaviest = kept_scores.masked_fill(torch.isinf(kept_scores), float("-inf")).amax(-1, keepdim=True)
            self._accumulated[i] = torch.where(torch.isposinf(kept_scores), heaviest.clamp_min(0), kept_scores)
        if index.shape[2] < n or not bool(valid.all()):
            _set_entries(layer, index)
        self.valid[i] = new_valid
        if marks:  # the entries a press protects outright (score +inf: SnapKV's window) are exact already
            k = max(1, round(self.important * index.shape[2]))
            ranked = kept_scores.masked_fill(torch.isinf(kept_scores), float("-inf"))
            top = ranked.topk(k, dim=-1).indices
            flags = torch.zeros_like(kept_scores, dtype=torch.bool).scatter_(2, top, True) & new_valid[:, None, :]
            layer.set_important(flags)
        if self.on_valid is not None:
            self.on_valid(i, new_valid, n - index.shape[2])

    def _bound(self, i, attn, layer, hidden, pe) -> None:
        keys, values = _entries(layer)
        n_all = keys.shape[2]
        if n_all <= self.kv_max:
            return
        valid = self.valid.get(i)
        bsz = keys.shape[0]
        if valid is None:
            valid = torch.ones(bsz, 0, dtype=torch.bool, device=keys.device)
        full = torch.cat([valid, valid.new_ones(bsz, n_all - valid.shape[1])], 1)
        query = None
        if self.press.needs_attention and hidden is not None:
            q = hidden.shape[1]
            rows = torch.arange(hidden.shape[1], device=hidden.device).expand(bsz, q)
            query = project_queries(attn, hidden, pe, rows)
        target = torch.clamp(full.sum(1), max=self.kv_max)
        scores = self.press.score(PressInput(attn, None, None, keys, values, full, None, query, keep=target))
        if getattr(self.press, "accumulates", False) and i in self._accumulated:
            acc = self._accumulated[i]
            acc = torch.cat([acc, acc.new_zeros(*acc.shape[:2], n_all - acc.shape[2])], 2)
            scores = acc + scores.masked_fill(torch.isinf(scores), 0)
        index, new_valid = select(scores, full, target)
        if getattr(self.press, "accumulates", False):
            self._accumulated[i] = scores.gather(2, index)
        _set_entries(layer, index)
        self.valid[i] = new_valid
        if self.on_valid is not None:
            self.on_valid(i, new_valid, n_all - index.shape[2])


class KVPress:
    """A press as a context manager on any transformers decoder, VLM or text-only::

        with KVPress(model, "snapkv", kv=0.25):
            model.generate(**inputs)

    For accelerated VLMs use ``accelerate(model, budget=Budget(kv=...))`` instead (it also maps masks of padded
    batches). Here batches must be unpadded (or pass no attention mask): a padded batch raises ``ValueError``.
    """

    def __init__(self, model, press="snapkv", kv=0.25, kv_max: int | None = None):
        lm = _decoder(model)
        self.model, self.lm = model, lm
        self.decoding = Decoding()  # the same decode translation as an accelerated session's
        self.compressor = KVCompressor(press, lm.layers, kv=kv, kv_max=kv_max, on_valid=self._evicted)
        self._orig = lm.forward
        lm.forward = self._forward

    def _evicted(self, layer: int, valid: torch.Tensor, evicted: int) -> None:
        if layer == 0 and self.compressor.decoding:
            self.decoding.evicted(valid, evicted)

    def _forward(self, *args, **kwargs):
        cache = cache_arg(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        mask = kwargs.get("attention_mask")
        comp = self.compressor
        if torch.is_tensor(mask) and mask.dim() == 2 and not bool(mask.bool().all()):
            raise ValueError("KVPress: padded batches are not supported here; use vlm_accel.accelerate(Budget(kv=))")
        if not past:
            embeds = kwargs.get("inputs_embeds")
            ids = kwargs.get("input_ids", args[0] if args else None)
            bsz, n = (embeds.shape[:2]) if embeds is not None else ids.shape
            dev = (embeds if embeds is not None else ids).device
            comp.begin_prefill(lambda i: (torch.ones(bsz, n, dtype=torch.bool, device=dev), None))
            self.decoding.current = None
            out = self._orig(*args, **kwargs)
            comp.end_prefill(cache_of(out))
            held = comp.valid.get(0)
            if held is not None:
                self.decoding.current = Decode(held, n - held.shape[1])
            return out
        st = self.decoding.current
        if comp.begin_decode(cache) and st is not None:
            try:
                return self._orig(*args, **st.translate(kwargs, past))
            finally:
                comp.end_forward()
        return self._orig(*args, **kwargs)

    def restore(self) -> None:
        self.compressor.remove()
        if self.lm.__dict__.get("forward") == self._forward:
            del self.lm.forward

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def _decoder(model) -> nn.Module:
    """The module that owns ``layers`` (a text decoder, or a VLM's language model)."""
    for path in ("model.language_model", "language_model", "model", ""):
        mod = model
        for part in filter(None, path.split(".")):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if mod is not None and isinstance(getattr(mod, "layers", None), nn.ModuleList):
            return mod
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__}")
