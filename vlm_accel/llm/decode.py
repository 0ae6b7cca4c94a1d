"""Decode translation: the caller sees the full-length sequence, the KV cache holds fewer entries.

After a reduced prefill (pre-LLM pruning, KV eviction) layer 0's cache is shorter than the sequence the caller
(``generate``, a hand-written loop) believes it holds. Every later step is translated: its attention mask covers the
cache's real entries (``prefix_mask`` for the prompt's, every later entry a decoded token) and its positions are the
caller's (``delta`` = caller positions - cache slots, grown by evictions while decoding). One :class:`Decoding` per
owner — the accelerated :class:`~vlm_accel.api.Session` or a :class:`~vlm_accel.kv.compress.KVPress` — remembers which
cache came from which prefill, so a cache can be continued (multi-turn) with its own translation.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch

from .layout import cache_arg, fit_to
from .static_cache import SlotState


@dataclass
class Decode:
    """Translation from the caller's sequence to the shorter KV cache of layer 0 (and every layer that holds as many
    entries): ``prefix_mask`` ``[B, n]`` covers the cache's first ``n`` entries, every later entry is a decoded token;
    ``delta`` = caller positions - cache slots."""

    prefix_mask: torch.Tensor
    delta: int
    cache: weakref.ref | None = None

    def translate(self, kwargs: dict, past: int) -> dict:
        """The language model's keyword arguments for a step over a cache holding ``past`` entries: the attention
        mask over the real entries and, when the caller gave none, the caller's positions."""
        kw = dict(kwargs)
        x = kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        q = x.shape[1]
        attn = kwargs.get("attention_mask")
        bsz, n = self.prefix_mask.shape
        new = self.prefix_mask.new_ones(bsz, int(past) + q - n)  # decoded entries after this step: never padding
        if attn is not None and not (torch.is_tensor(attn) and attn.dim() == 2):
            # prepared for a static cache (from the reduced cache length): rebuild it
            kw["attention_mask"] = fit_to(torch.cat([self.prefix_mask, new], dim=1), attn)
        elif attn is not None and attn.shape[1] >= past + self.delta + q:
            kw["attention_mask"] = torch.cat([self.prefix_mask, new], dim=1).to(attn.dtype)
        if kwargs.get("position_ids") is None:
            pos = torch.arange(q, device=self.prefix_mask.device) + past + self.delta
            kw["position_ids"] = pos[None].expand(bsz, q)
        return kw


class Decoding:
    """The decode translation of one owner: the current request's :class:`Decode` (``None`` when its prefill kept
    every entry) and, per cache a prefill of this owner made, ``(number of that prefill, its Decode)``."""

    def __init__(self):
        self.current: Decode | None = None
        self._caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.prefills = 0

    def clear(self) -> None:
        self.current = None
        self._caches = weakref.WeakKeyDictionary()

    def made_by(self, cache) -> tuple[int | None, Decode | None]:
        """``(number of the prefill that made cache, its Decode when it reduced the prompt)``; ``(None, None)`` for a
        cache no prefill of this owner made."""
        return (None, None) if cache is None else self._caches.get(cache, (None, None))

    def of(self, cache) -> Decode | None:
        return self.made_by(cache)[1]

    def kept(self, valid: torch.Tensor, full_len: int) -> None:
        """After a prefill's KV eviction: layer 0 kept ``valid`` ``[B, n]`` of a caller sequence of ``full_len``."""
        expected = full_len if self.current is None else self.current.prefix_mask.shape[1]
        if valid.shape[1] != expected:
            self.current = Decode(valid, full_len - valid.shape[1])

    def evicted(self, valid: torch.Tensor, evicted: int) -> None:
        """A decoding step evicted ``evicted`` entries per row of layer 0, which now holds ``valid``."""
        if self.current is not None:
            self.current.prefix_mask = valid
            self.current.delta += evicted

    def record(self, cache) -> None:
        """After a prefill that made ``cache``: remember its translation (and write it on a static cache for
        compiled steps)."""
        if cache is None:
            return
        if self.current is not None:
            self.current.cache = weakref.ref(cache)
            SlotState.record(cache, self.current.prefix_mask, self.current.delta)
        self.prefills += 1
        self._caches[cache] = (self.prefills, self.current)

    # --- generate's own bookkeeping, shown the cache as the caller's sequence ----------------------------------
    def wrap_generation_inputs(self, orig):
        """``generate(input_ids=previous.sequences, past_key_values=previous_cache)`` (multi-turn continuation) feeds
        the tokens past ``cache.get_seq_length()``; a reduced cache is shorter than the sequence it stands for by
        ``delta``, so the new tokens start ``delta`` later."""

        @functools.wraps(orig)
        def prepare(input_ids, *args, next_sequence_length=None, is_first_iteration=False, **kwargs):
            cache = cache_arg(kwargs)
            st = self.of(cache)
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

    def wrap_generation_positions(self, orig):
        """``generate`` continuing from a reduced cache: the model compares the cache length with the caller's token
        types to find new images; the cache is ``delta`` shorter than the sequence it stands for, so its images would
        look new (and lose their M-RoPE positions). The types are shown as the cache sees them."""

        @functools.wraps(orig)
        def prepare(inputs_tensor, model_kwargs, *args, **kwargs):
            cache = cache_arg(model_kwargs)
            st = self.of(cache)
            types = model_kwargs.get("mm_token_type_ids")
            if st is not None and st.delta > 0 and torch.is_tensor(types) and types.dim() == 2:
                past = cache.get_seq_length()
                if past and not bool(types[:, past + st.delta :].any()):
                    model_kwargs = dict(model_kwargs, mm_token_type_ids=types[:, st.delta :])
            return orig(inputs_tensor, model_kwargs, *args, **kwargs)

        return prepare

    def wrap_positions(self, orig, inert: bool):
        """Without an attention mask, M-RoPE models number decode tokens from the cache length, which is shorter
        than the caller's sequence by what was pruned: shift them back to the caller's positions (``inert``: the
        session reduces nothing, so compiled steps go straight through)."""

        @functools.wraps(orig)
        def compute_3d_position_ids(*args, **kwargs):
            pos = orig(*args, **kwargs)
            if inert and torch.compiler.is_compiling():
                return pos
            cache = cache_arg(kwargs)
            if torch.compiler.is_compiling():
                slots = SlotState.of(cache)
                if pos is None or kwargs.get("attention_mask") is not None or slots is None:
                    return pos
                return torch.where(cache.get_seq_length() > 0, pos + slots.delta, pos)
            st = self.of(cache)
            if pos is not None and kwargs.get("attention_mask") is None and st is not None and cache.get_seq_length():
                pos = pos + st.delta
            return pos

        return compute_3d_position_ids
