"""KV-cache compression: eviction presses and quantized / mixed-precision cache layers (transformers Cache API).

- :mod:`vlm_accel.kv.presses`: one small class per eviction rule (``snapkv``, ``h2o``, ``streaming``, ``vision``).
- :mod:`vlm_accel.kv.compress`: applying a press to a decoder (after prefill, while decoding); :class:`KVPress` is
  the stand-alone context manager for any transformers decoder.
- :mod:`vlm_accel.kv.quant`: KIVI-style 2/4/8-bit caches, mixed precision, byte accounting.

Inside ``accelerate()`` all of it is driven by ``Budget(kv=..., kv_max=..., kv_bits=..., kv_important=...)``.
"""

from .compress import KVCompressor, KVPress
from .presses import PRESSES, H2OPress, Press, SnapKVPress, StreamingPress, VisionAwarePress, get_press
from .quant import (
    MixedPrecisionKVCache,
    MixedPrecisionKVLayer,
    QuantizedKVCache,
    QuantizedKVLayer,
    dense_nbytes,
    entries,
    layer_stats,
    nbytes,
    topk_mask,
)

__all__ = [
    "PRESSES",
    "H2OPress",
    "KVCompressor",
    "KVPress",
    "MixedPrecisionKVCache",
    "MixedPrecisionKVLayer",
    "Press",
    "QuantizedKVCache",
    "QuantizedKVLayer",
    "SnapKVPress",
    "StreamingPress",
    "VisionAwarePress",
    "dense_nbytes",
    "entries",
    "get_press",
    "layer_stats",
    "nbytes",
    "topk_mask",
]
