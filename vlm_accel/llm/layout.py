"""Reduced sequence layouts, shared by pre-LLM reduction, in-LLM pruning and KV eviction.

A *layout* is what survives of a sequence: ``index`` ``[B, L']`` (for each slot of the reduced sequence, the position
it came from) and ``valid`` ``[B, L']`` (False for slots that only pad a shorter row). Kept tokens stay in their
original order and rows are left-padded to the longest, so the last slot of every row is its last real token.
"""

from __future__ import annotations

import functools

import torch


def reduced_layout(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``keep`` ``[B, L]`` bool -> ``(index [B, L'], valid [B, L'])``, ``L'`` = the most kept in any row."""
    seq = keep.shape[1]
    new_len = int(keep.sum(1).max()) if keep.numel() else 0
    index = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, seq - new_len :]
    return index, keep.gather(1, index)


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the sequence axis at ``index`` ``[B, L']``.

    ``x``: ``[B, L, D]`` (or ``[1, L, D]``, broadcast over rows), or ``[..., B|1, L]`` (masks, position ids,
    M-RoPE ``[3, B, L]``)."""
    bsz, new_len = index.shape
    if x.dim() == 3 and x.shape[0] in (1, bsz) and x.shape[1] != bsz:
        x = x.expand(bsz, *x.shape[1:])
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
    x = x.expand(*x.shape[:-2], bsz, x.shape[-1])
    return x.gather(-1, index.expand(*x.shape[:-2], bsz, new_len))


def compose(outer: tuple[torch.Tensor, torch.Tensor], inner: tuple[torch.Tensor, torch.Tensor]):
    """Layout of a layout: ``inner`` indexes ``outer``'s slots; the result indexes ``outer``'s source."""
    o_idx, o_valid = outer
    i_idx, i_valid = inner
    return o_idx.gather(1, i_idx), o_valid.gather(1, i_idx) & i_valid


def _fill(mask: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``mask`` with ``where`` set to 'may not attend' (False for bool masks, the dtype's min for additive ones)."""
    if mask.dtype == torch.bool:
        return mask & ~where
    return mask.masked_fill(where, torch.finfo(mask.dtype).min)


def _allow(mask: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask | where
    return mask.masked_fill(where, 0.0)


def slots(index: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of a layout: ``[B, length]`` slot of each original position in ``index`` ``[B, L']``, ``-1`` where
    the position is not in the layout."""
    out = torch.full((index.shape[0], length), -1, dtype=torch.long, device=index.device)
    return out.scatter_(1, index, torch.arange(index.shape[1], device=index.device).expand_as(index))


def gather_mask(mask, index: torch.Tensor, valid: torch.Tensor, width: int | None = None):
    """A prepared attention mask for a prefill over a reduced layout (queries and keys are the same slots).

    Args:
        mask: what the decoder layers received: ``None`` (causal, no padding), a 2-D ``[B, KV]`` key mask
            (flash attention) or a 4-D ``[B, 1, Q, KV]`` bool / additive mask.
        index: ``[B, n]`` the original position of each slot.
        valid: ``[B, n]`` False for padding slots: never attended, and attending only to themselves (so no row is
            empty and no NaN reaches the valid rows).
        width: pad the key axis with masked columns to this width (static caches keep their full length).
    Returns:
        A mask of the same kind for the reduced slots, or ``None`` when the reduced set is still plainly causal.
    """
    bsz, n = index.shape
    if mask is None:
        if bool(valid.all()) and width is None:
            return None
        # causal over original order, padding slots masked
        m = (index[:, None, None, :] <= index[:, None, :, None]) & valid[:, None, None, :]  # [B, 1, n, n]
        m = m | (torch.eye(n, dtype=torch.bool, device=m.device) & ~valid[:, None, :, None])
        return _pad_keys(m, width)
    if mask.dim() == 2:
        out = mask.gather(1, index) * valid.to(mask.dtype)
        return out if width is None else torch.nn.functional.pad(out, (0, max(0, width - out.shape[-1])))
    m = mask.expand(bsz, *mask.shape[1:])
    m = m.gather(2, index[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[3]))
    m = m.gather(3, index[:, None, None, :].expand(-1, m.shape[1], m.shape[2], -1))
    m = _fill(m, ~valid[:, None, None, :])
    if not bool(valid.all()):
        eye = torch.eye(n, dtype=torch.bool, device=m.device).expand(bsz, 1, n, n)
        m = _allow(m, eye & ~valid[:, None, :, None])
    return _pad_keys(m, width)


def _pad_keys(m: torch.Tensor, width: int | None) -> torch.Tensor:
    """Masked key columns appended up to ``width``."""
    if width is None or width <= m.shape[-1]:
        return m
    fill = False if m.dtype == torch.bool else torch.finfo(m.dtype).min
    return torch.cat([m, torch.full((*m.shape[:-1], width - m.shape[-1]), fill, dtype=m.dtype, device=m.device)], -1)


def decode_mask(base, prefix_valid: torch.Tensor, extra: int, q: int, width: int | None = None):
    """The mask of a decoding step for a layer whose cache holds its own prefix.

    Args:
        base: the mask the decoder layers received this step (``None``, 2-D ``[B, KV]`` or 4-D ``[B, 1, q, KV]`` bool /
            additive); only its kind and dtype are used.
        prefix_valid: ``[B, n]`` which of the layer's ``n`` cached prompt entries may be attended.
        extra: decoded entries in the layer's cache after this step (this step's ``q`` queries are the last ``q``).
        q: queries this step.
        width: pad the key axis with masked columns to this width (static caches).
    Returns:
        A mask of ``base``'s kind over ``n + extra`` keys (``None`` when plain causal attention is right).
    """
    bsz, n = prefix_valid.shape
    dev = prefix_valid.device
    if base is None and width is None and bool(prefix_valid.all()):
        return None
    if torch.is_tensor(base) and base.dim() == 2:
        out = torch.cat([prefix_valid.to(base.dtype), base.new_ones(bsz, extra)], 1)
        return out if width is None else torch.nn.functional.pad(out, (0, max(0, width - out.shape[1])))
    new = torch.arange(extra, device=dev)[None, :] <= torch.arange(extra - q, extra, device=dev)[:, None]  # [q, extra]
    m = torch.cat([prefix_valid.bool()[:, None, :].expand(bsz, q, n), new[None].expand(bsz, q, extra)], -1)[:, None]
    m = _pad_keys(m, width)
    if torch.is_tensor(base) and base.dtype != torch.bool:
        return torch.zeros(m.shape, dtype=base.dtype, device=dev).masked_fill(~m, torch.finfo(base.dtype).min)
    return m


def cache_arg(kwargs: dict):
    """The KV cache a language-model call was given (``cache``, or ``past_key_values`` as transformers named it
    before), or ``None``: the one place that knows both names."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def prepared_mask(mask):
    """The 4-D mask out of ``generate``'s per-layer-type dict (the full-attention one: the longest keys)."""
    if isinstance(mask, dict):
        return mask.get("full_attention", next((m for m in mask.values() if m is not None), None))
    return mask


def padding_mask(mask, length: int) -> torch.Tensor | None:
    """The ``[B, length]`` 0/1 key mask of a prefill, from a 2-D mask or from the 4-D / per-layer-type dict masks
    ``generate`` prepares for static caches (the last query row sees every earlier key that is not padding).
    ``None`` stays ``None``."""
    if mask is None or (torch.is_tensor(mask) and mask.dim() == 2):
        return mask
    mask = prepared_mask(mask)
    if mask is None:
        return None
    if not torch.is_tensor(mask) or mask.dim() != 4:
        raise ValueError(f"vlm_accel: unsupported attention_mask {type(mask).__name__}; pass a 2-D [B, L] mask")
    row = mask[:, 0, -1, :length]
    return (row if row.dtype == torch.bool else row == 0).long()


def fit_to(mask: torch.Tensor, prepared) -> torch.Tensor:
    """A reduced 2-D mask, zero-padded to the key length of the 4-D / dict mask ``generate`` prepared for a static
    cache (the LM builds its own mask from it; static caches need it as long as the cache)."""
    prepared = prepared_mask(prepared)
    if not torch.is_tensor(prepared) or prepared.dim() != 4 or prepared.shape[-1] <= mask.shape[1]:
        return mask
    return torch.nn.functional.pad(mask, (0, prepared.shape[-1] - mask.shape[1]))


def cache_of(out):
    """The cache a model output carries (``cache`` or ``past_key_values``), or ``None``."""
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def labels_follow(orig, trace):
    """The model's loss function, for a forward with ``labels`` ``[B, L]``: when the logits are reduced (``[B, L',
    V]``), the labels are gathered at the kept positions of ``trace()`` (the session's last
    :class:`~vlm_accel.api.Trace`; padding → -100), so the loss is next-token prediction over the kept sequence."""

    @functools.wraps(orig)
    def loss_function(*args, **kwargs):
        logits = kwargs["logits"] if "logits" in kwargs else args[0]
        labels = kwargs["labels"] if "labels" in kwargs else args[1]
        tr = trace()
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


def gather_masks(prepared, index: torch.Tensor, valid: torch.Tensor):
    """The model's own prefill masks for the kept slots, or ``None`` when it passed none of its own.

    Families that build 4-D masks before the language model (Gemma 3's bidirectional image block, sliding windows)
    pass them (a tensor ``[B, 1, L, L]`` or a dict per layer type); the kept slots ``index`` ``[B, L']`` keep exactly
    the pattern they had among themselves (rows and columns gathered). Padding slots (``valid`` False) see only
    themselves. Masks prepared for a static cache (keys longer than the prompt) return ``None`` (the 2-D path)."""
    if isinstance(prepared, dict):
        out = {k: gather_masks(m, index, valid) for k, m in prepared.items()}
        return None if any(v is None for k, v in out.items() if prepared[k] is not None) else out
    if not torch.is_tensor(prepared) or prepared.dim() != 4 or prepared.shape[-1] != prepared.shape[-2]:
        return None
    bsz, n = index.shape
    m = prepared.expand(bsz, *prepared.shape[1:])
    heads = m.shape[1]
    rows = index[:, None, :, None].expand(bsz, heads, n, m.shape[-1])
    m = m.gather(2, rows)
    m = m.gather(3, index[:, None, None, :].expand(bsz, heads, n, n))
    pad = (~valid)[:, None, :, None] | (~valid)[:, None, None, :]
    eye = torch.eye(n, dtype=torch.bool, device=m.device)[None, None]
    m = _fill(m, pad)
    return _allow(m, pad & eye)
