"""Attention evidence under any attention implementation, written once for every user of attention scores.

SDPA and FlashAttention never materialise attention weights, and switching a model to eager attention to get them
costs the speed that pruning is meant to win. Methods that rank tokens by the attention they receive (FastV,
PyramidDrop, the KV presses) only need a few *query rows* (the last text tokens, an observation window) against all
keys: :func:`row_attention` recomputes exactly those rows from the decoder layer's own projections, q/k norms and
rotary embedding, so the numbers equal the eager attention weights while the layer itself runs as it was loaded.

Works for decoder attention modules shaped like transformers' Llama / Qwen2 / Qwen2-VL / Qwen2.5-VL / Qwen3(-VL)
attention: ``q_proj`` / ``k_proj`` projections, optional ``q_norm`` / ``k_norm`` on the head dimension, the module's
``apply_rotary_pos_emb`` with ``(cos, sin)`` position embeddings, ``scaling`` and ``head_dim``.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _rope(attn: nn.Module):
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if fn is None:
        raise TypeError(
            f"{type(attn).__name__} has no apply_rotary_pos_emb in its module; attention scores can be recomputed "
            "for Llama / Qwen2 / Qwen2-VL / Qwen2.5-VL / Qwen3-VL style decoders"
        )
    return fn


def _heads(attn: nn.Module, x: torch.Tensor, proj: str, norm: str) -> torch.Tensor:
    """``x`` ``[B, L, D]`` -> ``[B, heads, L, head_dim]`` through ``attn.<proj>`` (and ``attn.<norm>`` if present)."""
    y = getattr(attn, proj)(x)
    y = y.view(*x.shape[:-1], -1, attn.head_dim)
    if getattr(attn, norm, None) is not None:
        y = getattr(attn, norm)(y)
    return y.transpose(1, 2)


def _rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``t`` ``[B, L, C]`` (or ``[1, L, C]``) at ``rows`` ``[B, R]`` -> ``[B, R, C]``."""
    t = t.expand(rows.shape[0], *t.shape[1:])
    return t.gather(1, rows[..., None].expand(-1, -1, t.shape[-1]))


def project_queries(attn: nn.Module, hidden: torch.Tensor, position_embeddings, rows: torch.Tensor) -> torch.Tensor:
    """Post-rotary queries of a few rows.

    Args:
        attn: a decoder layer's attention module.
        hidden: ``[B, L, D]`` the attention module's input (after the layer's input norm).
        position_embeddings: ``(cos, sin)`` each ``[B|1, L, head_dim]``, as the layer received them.
        rows: ``[B, R]`` positions (indices into ``L``) of the query rows.
    Returns:
        ``[B, H, R, head_dim]``.
    """
    q = _heads(attn, _rows(hidden, rows), "q_proj", "q_norm")
    cos, sin = (_rows(p, rows) for p in position_embeddings)
    return _rope(attn)(q, q, cos, sin)[0]


def project_keys(attn: nn.Module, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Post-rotary keys of every position: ``[B, L, D]`` -> ``[B, H_kv, L, head_dim]`` (what the KV cache holds)."""
    k = _heads(attn, hidden, "k_proj", "k_norm")
    cos, sin = position_embeddings
    return _rope(attn)(k, k, cos, sin)[1]


def attention_probs(q: torch.Tensor, k: torch.Tensor, scaling: float, allowed: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of query rows over keys, in fp32, grouped-query aware.

    Args:
        q: ``[B, H, R, hd]`` queries.
        k: ``[B, H_kv, L, hd]`` keys (``H`` a multiple of ``H_kv``).
        scaling: the softmax scale (``attn.scaling``).
        allowed: ``[B, R, L]`` bool, False where a row may not attend (causality, padding), or ``None``.
    Returns:
        ``[B, H, R, L]`` probabilities (rows with no allowed key are all zero).
    """
    b, h, r, d = q.shape
    hkv = k.shape[1]
    qg = q.float().view(b, hkv, h // hkv, r, d)
    logits = torch.einsum("bgnrd,bgld->bgnrl", qg, k.float()) * scaling
    logits = logits.reshape(b, h, r, -1)
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def causal_allowed(rows: torch.Tensor, key_valid: torch.Tensor | None, length: int) -> torch.Tensor:
    """``[B, R, L]`` bool: row at index ``rows[b, r]`` may see keys ``0..rows[b, r]`` that are valid.

    Args:
        rows: ``[B, R]`` query positions (indices into the sequence).
        key_valid: ``[B, L]`` bool / 0-1, False for padding keys, or ``None``.
        length: ``L``.
    """
    ar = torch.arange(length, device=rows.device)
    allowed = ar[None, None, :] <= rows[..., None]
    if key_valid is not None:
        allowed = allowed & key_valid.bool()[:, None, :]
    return allowed


def row_attention(
    attn: nn.Module,
    hidden: torch.Tensor,
    position_embeddings,
    rows: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """What ``attn`` pays from the query ``rows`` to every key, as eager attention with ``output_attentions`` would
    report it, without computing the other rows.

    Args:
        attn: a decoder layer's attention module.
        hidden: ``[B, L, D]`` the module's input (after the layer's input norm).
        position_embeddings: ``(cos, sin)`` as the layer received them.
        rows: ``[B, R]`` query positions.
        key_valid: ``[B, L]`` False for padding keys, or ``None``.
        keys: ``[B, H_kv, L, hd]`` post-rotary keys if already at hand (e.g. read from the KV cache).
    Returns:
        ``[B, H, R, L]`` fp32 attention probabilities (causal: a row sees keys up to its own position).
    """
    with torch.no_grad():
        q = project_queries(attn, hidden, position_embeddings, rows)
        k = project_keys(attn, hidden, position_embeddings) if keys is None else keys
        return attention_probs(q, k, attn.scaling, causal_allowed(rows, key_valid, k.shape[2]))
