"""A reduced prompt in a static cache, for decoding steps compiled by ``torch.compile``.

transformers compiles every decoding step after the prefill when ``generate`` runs with a static cache and a
``compile_config``. A reduced prompt holds fewer cache slots than the caller's sequence has tokens, so a decoding
step needs the slots' validity and the position offset; here they are fixed-shape tensors kept on the cache object,
so a compiled graph reads them as inputs, branches on no data and guards only on their shapes: one graph serves every
prompt at any budget.
"""

from __future__ import annotations

import torch


class SlotState:
    """What a compiled decoding step needs of a reduced prompt held in a static cache.

    ``valid`` ``[B, max_cache_len]`` bool: the prompt's kept, non-padding slots; ``start`` ``[]``: the first slot of
    decoded tokens (the reduced prompt's length); ``delta`` ``[]``: caller position - cache slot."""

    ATTR = "_vlm_accel_slots"

    def __init__(self, valid: torch.Tensor, start: torch.Tensor, delta: torch.Tensor):
        self.valid, self.start, self.delta = valid, start, delta

    def keys(self, end: torch.Tensor) -> torch.Tensor:
        """``[B, max_cache_len]`` bool: the keys a query may see once ``end`` slots are written."""
        slot = torch.arange(self.valid.shape[1], device=self.valid.device)
        return self.valid | ((slot >= self.start) & (slot < end))

    @classmethod
    def of(cls, cache) -> SlotState | None:
        return None if cache is None else getattr(cache, cls.ATTR, None)

    @classmethod
    def record(cls, cache, prefix_mask: torch.Tensor, delta: int) -> None:
        """After a reduced prefill into a static cache: ``prefix_mask`` ``[B, n]`` validity of its first ``n`` slots,
        ``delta`` the caller's positions minus the slots. A growing cache needs none (never compiled here)."""
        length = static_length(cache)
        if length is None:
            return
        prefix = prefix_mask.bool()
        bsz, n = prefix.shape
        valid = torch.zeros(bsz, length, dtype=torch.bool, device=prefix.device)
        valid[:, :n] = prefix
        dev = prefix.device
        setattr(cache, cls.ATTR, cls(valid, torch.tensor(n, device=dev), torch.tensor(delta, device=dev)))

    @classmethod
    def forget(cls, cache) -> None:
        """A static cache reused for a new request: the previous request's slots are stale."""
        if getattr(cache, cls.ATTR, None) is not None:
            delattr(cache, cls.ATTR)

    @classmethod
    def decode_kwargs(cls, kwargs: dict, cache) -> dict:
        """The language model's keyword arguments for one decoding step over ``cache``: the attention mask over every
        slot (``[B, max_cache_len]``) and, when the caller gave none, the caller's positions. Only tensor arithmetic
        (traceable as one graph). A cache no reduced prefill filled: ``kwargs`` unchanged."""
        slots = cls.of(cache)
        if slots is None:
            return kwargs
        x = kwargs.get("inputs_embeds")
        x = kwargs["input_ids"] if x is None else x
        bsz, q = x.shape[:2]
        past = cache.get_seq_length()  # [] tensor: slots written (the reduced prompt + decoded tokens)
        kw = dict(kwargs, attention_mask=slots.keys(past + q).to(torch.long))
        if kwargs.get("position_ids") is None:
            pos = torch.arange(q, device=slots.valid.device) + past + slots.delta
            kw["position_ids"] = pos[None].expand(bsz, q)
        return kw


def static_length(cache) -> int | None:
    """``max_cache_len`` of a static cache (every layer fixed-size), else ``None``."""
    layers = getattr(cache, "layers", None) or []
    lengths = {getattr(layer, "max_cache_len", None) for layer in layers}
    if not layers or None in lengths or len(lengths) != 1:
        return None
    return lengths.pop()
