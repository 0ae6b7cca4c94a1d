"""The KV stage of an accelerated session: what ``Budget(kv=, kv_max=, kv_bits=, kv_important=, memory_gb=)`` does
to the language model's cache, request by request.

``kv_bits`` swaps a prefill's fresh cache for a quantized one (:mod:`vlm_accel.kv.quant`); ``kv`` / ``kv_max`` evict
entries with a press (:class:`~vlm_accel.kv.compress.KVCompressor`); the owner (the session) turns the kept validity
into its decode translation through ``on_evicted``.
"""

from __future__ import annotations

from torch import nn

from ..control.budget import Budget
from ..llm.layout import cache_arg, cache_of
from .compress import KVCompressor
from .quant import MixedPrecisionKVCache, QuantizedKVCache
from .quant import nbytes as kv_nbytes

KV_GROUP, KV_RESIDUAL = 32, 32  # quantized KV: group size, full-precision window of recent entries (KIVI)


def evicts(budget: Budget) -> bool:
    """Whether ``budget`` evicts KV entries (and so needs a press)."""
    b = budget
    return b.kv != 1.0 or isinstance(b.kv, int) or b.kv_max is not None or b.kv_important or b.memory_gb is not None


class KVStage:
    """The KV budget on one language model's layers.

    Args:
        budget: the session's budget.
        press: the press (name or :class:`~vlm_accel.kv.presses.Press`) that ranks entries for eviction.
        layers: the decoder layers.
        on_evicted: ``callback(layer, valid [B, n], evicted)`` after every eviction while decoding.
        hybrid_config: the model config of a decoder with linear-attention layers (their recurrent state passes
            through a quantized cache untouched), else ``None``.
    """

    def __init__(self, budget: Budget, press, layers: nn.ModuleList, on_evicted, hybrid_config=None):
        self.budget = budget
        self.hybrid_config = hybrid_config  # a hybrid decoder's config: its quantized cache is built layer by type
        self.compressor: KVCompressor | None = None
        if evicts(budget):
            self.compressor = KVCompressor(
                press, layers, budget.kv, budget.kv_max, on_valid=on_evicted, important=budget.kv_important
            )

    @property
    def active(self) -> bool:
        """Anything to do at all (eviction or quantization)."""
        return self.compressor is not None or self.budget.kv_bits < 16

    @property
    def decoding(self) -> bool:
        return self.compressor is not None and self.compressor.decoding

    def set_limit(self, kv_max: int | None) -> None:
        """A per-request bound on the entries kept while decoding (the controller's, for ``memory_gb``)."""
        if self.compressor is not None:
            self.compressor.kv_max = kv_max

    def prefill(self, orig, kw: dict, prompt):
        """Run a prefill ``orig(**kw)`` under the KV budget (``prompt(layer) -> (valid, visual)`` of each layer's
        prompt entries). Returns ``(output, {layer: kept validity})``."""
        if self.budget.kv_bits < 16:
            kw = self._quantized_cache(kw)
        if self.compressor is not None:
            _refuse_static(cache_arg(kw))
            self.compressor.begin_prefill(prompt)
        try:
            out = orig(**kw)
        except BaseException:
            self.end_forward()
            raise
        kept = self.compressor.end_prefill(cache_of(out)) if self.compressor is not None else {}
        return out, kept

    def begin_decode(self, cache) -> None:
        if self.compressor is not None:
            self.compressor.begin_decode(cache)

    def end_forward(self) -> None:
        if self.compressor is not None:
            self.compressor.end_forward()

    def remove(self) -> None:
        if self.compressor is not None:
            self.compressor.remove()

    @staticmethod
    def measure(out) -> tuple[int, list[int]]:
        """``(bytes, entries per layer)`` the cache of ``out`` really holds (packed quantized data, scales,
        full-precision window)."""
        cache = cache_of(out)
        entries = [int(layer.get_seq_length()) for layer in getattr(cache, "layers", [])]
        return (kv_nbytes(cache) if cache is not None else 0), entries

    def _quantized_cache(self, kw: dict) -> dict:
        """``Budget(kv_bits=...)``: the prefill's fresh cache replaced by a quantized one (``generate`` carries on
        with the cache the model returns). A cache the caller filled or chose (static, quantized) is left alone."""
        from transformers.cache_utils import DynamicCache

        key = "cache" if "cache" in kw else "past_key_values"
        cache = kw.get(key)
        if cache is None and not kw.get("use_cache", True):
            return kw
        if cache is not None and (type(cache) is not DynamicCache or cache.get_seq_length()):
            return kw
        b = self.budget
        q = dict(group_size=KV_GROUP, residual=KV_RESIDUAL, config=self.hybrid_config)
        if b.kv_important:
            new = MixedPrecisionKVCache(bits=b.kv_bits, high_bits=8, **q)
        else:
            new = QuantizedKVCache(bits=b.kv_bits, **q)
        return dict(kw, **{key: new})


def _refuse_static(cache) -> None:
    layers = getattr(cache, "layers", None) or []
    if any(getattr(layer, "max_cache_len", None) is not None for layer in layers):
        raise ValueError(
            "KV eviction (Budget.kv / kv_max) needs a growing cache; static caches keep their full length "
            "(drop cache_implementation='static')"
        )


__all__ = ["KV_GROUP", "KV_RESIDUAL", "KVStage", "evicts"]
