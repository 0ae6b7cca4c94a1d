"""Selection kernels: one dispatch function per op, a Triton kernel on CUDA and a plain torch reference elsewhere.

Ops (all batched over segments with a leading ``B`` axis):

- :func:`sim_argmax`: best cosine match of every row of ``a`` among the rows of ``b``, without materialising the
  ``M x P`` similarity (ToMe matching, VisionZip's contextual assignment, relevance's initial distances).
- :func:`max_min_select`: greedy max-min diverse selection (DivPrune), one fused launch per pick for every segment.
- :func:`patch_similarity`: row-wise cosine / mean absolute difference (frame and patch differences for temporal
  merging and the frame cache).
- :func:`attention_scores`: attention each key receives from a few query rows (softmax over keys, averaged over rows
  and heads) without materialising ``[B, H, R, L]`` (CLS / feature importance, FastV / SnapKV scores under SDPA).

Dispatch: ``backend=None`` runs the Triton kernel when the tensor is on CUDA and triton imports, the reference
otherwise; ``backend="torch"`` / ``"triton"`` forces one (``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1`` in
the environment before the first kernel call: tests only). The environment variable ``VLM_ACCEL_KERNELS=torch``
turns the kernels off everywhere; ``VLM_ACCEL_KERNELS=triton`` makes ``backend=None`` use them wherever they can run
(with ``TRITON_INTERPRET=1``, on CPU tensors too: how the tests run whole methods through the kernels). Triton is
imported lazily, on the first CUDA call: ``import vlm_accel`` never needs it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

from . import reference

logger = logging.getLogger(__name__)

__all__ = ["attention_scores", "max_min_select", "patch_similarity", "sim_argmax", "triton_available"]

BACKENDS = (None, "torch", "triton")


@functools.cache
def _triton_module():
    """The Triton kernels module, or ``None`` when triton is missing or fails to import (logged once)."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        from . import triton_ops
    except Exception as e:  # a broken triton install must not break selection: fall back to torch
        logger.warning("triton is installed but its kernels failed to load (%s); using the torch references", e)
        return None
    return triton_ops


def triton_available() -> bool:
    """Whether the Triton kernels can be used (triton importable and the kernels compiled to its language)."""
    return _triton_module() is not None


def _use_triton(t: torch.Tensor, backend: str | None) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None (automatic), 'torch' or 'triton'; got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before Python starts")
        return True
    forced = os.environ.get("VLM_ACCEL_KERNELS", "").lower()
    if forced == "torch":
        return False
    if forced == "triton":  # kernels everywhere they can run (CPU tensors: interpreter only; tests)
        return triton_available() and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
    return t.is_cuda and triton_available()


def _batched(t: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    if t.dim() == 2:
        return t.unsqueeze(0), True
    if t.dim() != 3:
        raise ValueError(f"{name} must be [N, D] or [B, N, D], got shape {tuple(t.shape)}")
    return t, False


def sim_argmax(
    a: torch.Tensor, b: torch.Tensor, b_len: torch.Tensor | None = None, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine match in ``b`` of every row of ``a``: ``(values, index)``.

    ``a`` ``[B, M, D]`` (or ``[M, D]``), ``b`` ``[B, P, D]`` (or ``[P, D]``), ``b_len`` ``[B]`` valid rows of ``b``
    per segment. Returns ``values`` ``[B, M]`` fp32 (max cosine similarity) and ``index`` ``[B, M]`` long (first
    candidate reaching it); without a batch axis in, none out. See :func:`reference.sim_argmax`.
    """
    a3, squeeze = _batched(a, "a")
    b3, _ = _batched(b, "b")
    if a3.shape[0] != b3.shape[0] or a3.shape[2] != b3.shape[2]:
        raise ValueError(f"sim_argmax: a {tuple(a.shape)} and b {tuple(b.shape)} need the same batch and width")
    if b3.shape[1] == 0:
        raise ValueError("sim_argmax: b has no rows to match")
    fn = _triton_module().sim_argmax if _use_triton(a3, backend) else reference.sim_argmax
    v, i = fn(a3, b3, b_len)
    return (v[0], i[0]) if squeeze else (v, i)


def max_min_select(
    x: torch.Tensor,
    k: int,
    lengths: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Greedy max-min diverse selection: ``x`` ``[B, N, D]`` (or ``[N, D]``) -> ``[B, k]`` (or ``[k]``) indices in
    selection order. ``lengths`` ``[B]`` valid tokens per segment; ``init`` ``[B, N]`` (or ``[N]``) bool tokens
    already chosen. See :func:`reference.max_min_select`."""
    x3, squeeze = _batched(x, "x")
    if init is not None and init.dim() == 1:
        init = init.unsqueeze(0)
    avail = x3.shape[1] if lengths is None else int(lengths.min())
    taken = 0 if init is None else int(init.sum(-1).max())
    if k < 1 or k > avail - taken:
        raise ValueError(f"max_min_select: k={k} must be in 1..{avail - taken} (tokens left to choose)")
    fn = _triton_module().max_min_select if _use_triton(x3, backend) else reference.max_min_select
    out = fn(x3, k, lengths, init)
    return out[0] if squeeze else out


def patch_similarity(
    a: torch.Tensor, b: torch.Tensor, metric: str = "cosine", *, backend: str | None = None
) -> torch.Tensor:
    """Row-wise ``cosine`` similarity or ``l1`` mean absolute difference of ``a`` and ``b`` ``[..., D]`` ->
    ``[...]`` fp32. See :func:`reference.patch_similarity`."""
    if a.shape != b.shape:
        raise ValueError(f"patch_similarity: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if metric not in ("cosine", "l1"):
        raise ValueError(f"patch_similarity: metric must be 'cosine' or 'l1', got {metric!r}")
    lead = a.shape[:-1]
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    fn = _triton_module().patch_similarity if _use_triton(a2, backend) else reference.patch_similarity
    return fn(a2, b2, metric).view(lead)


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    allowed: torch.Tensor | None = None,
    reduce: str = "mean",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention each key receives from the query rows, averaged over rows (and heads for ``reduce="mean"``).

    ``q`` ``[B, H, R, hd]``, ``k`` ``[B, H_kv, L, hd]``, ``allowed`` ``[B, R, L]`` bool (or broadcastable to it, e.g.
    ``[B, 1, L]`` key validity) or ``None`` -> ``[B, L]``
    (``"mean"``) or ``[B, H, L]`` (``"head"``), fp32. Equals ``attention_probs(q, k, scaling, allowed)`` of
    :mod:`vlm_accel.llm.attention` averaged over its row (and head) axes; see :func:`reference.attention_scores`.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention_scores: q [B, H, R, hd] and k [B, H_kv, L, hd], got {q.shape} and {k.shape}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention_scores: {q.shape[1]} query heads is not a multiple of {k.shape[1]} key heads")
    if allowed is not None:
        want = (q.shape[0], q.shape[2], k.shape[2])
        if allowed.dim() != 3 or any(a not in (1, w) for a, w in zip(allowed.shape, want, strict=True)):
            raise ValueError(f"attention_scores: allowed must be [B, R, L] (or broadcast to it), got {allowed.shape}")
        allowed = allowed.expand(want)
    if reduce not in ("mean", "head"):
        raise ValueError(f"attention_scores: reduce must be 'mean' or 'head', got {reduce!r}")
    fn = _triton_module().attention_scores if _use_triton(q, backend) else reference.attention_scores
    return fn(q, k, float(scaling), allowed, reduce)
