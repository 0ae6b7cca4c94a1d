"""KV-cache compression: eviction presses and quantized / mixed-precision cache layers (transformers Cache API)."""
