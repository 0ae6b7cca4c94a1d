"""Triton kernels of the ops in :mod:`vlm_accel.kernels.reference` (imported lazily by the dispatch functions).

Conventions: loads are cast to fp32 and dots use ``input_precision="ieee"`` (no TF32: an arg-max must not flip on
rounding the reference does not do); block sizes are fixed (autotune does not run in the interpreter); every kernel
handles ragged tails with masks, so any ``N`` / ``D`` works. Launchers take contiguous last dimensions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference

EPS = tl.constexpr(reference.EPS)  # kernels may read globals only when they are constexpr
NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))


# --- fused normalised similarity + arg-max ------------------------------------------------------------------------
@triton.jit
def _sim_argmax_kernel(
    a_ptr,
    b_ptr,
    blen_ptr,
    val_ptr,
    idx_ptr,
    M,
    P,
    D,
    s_ab,
    s_am,
    s_bb,
    s_bp,
    s_ob,
    HAS_LEN: tl.constexpr,
    BM: tl.constexpr,
    BP: tl.constexpr,
    BD: tl.constexpr,
):
    """One program: ``BM`` rows of ``a`` of one segment against every row of ``b``; running max / first arg-max."""
    sb = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    m_ok = offs_m < M
    p_lim = P
    if HAS_LEN:
        p_lim = tl.minimum(tl.load(blen_ptr + sb).to(tl.int32), P)
    a_base = a_ptr + sb * s_ab
    b_base = b_ptr + sb * s_bb
    best_v = tl.full([BM], NEG_INF, tl.float32)
    best_i = tl.zeros([BM], tl.int32)
    for p0 in range(0, P, BP):
        offs_p = p0 + tl.arange(0, BP)
        p_ok = offs_p < p_lim
        acc = tl.zeros([BM, BP], tl.float32)
        na = tl.zeros([BM], tl.float32)
        nb = tl.zeros([BP], tl.float32)
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            d_ok = offs_d < D
            av = tl.load(
                a_base + offs_m[:, None] * s_am + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0
            ).to(tl.float32)
            bv = tl.load(
                b_base + offs_p[:, None] * s_bp + offs_d[None, :], mask=p_ok[:, None] & d_ok[None, :], other=0.0
            ).to(tl.float32)
            acc += tl.dot(av, tl.trans(bv), input_precision="ieee")
            na += tl.sum(av * av, 1)
            nb += tl.sum(bv * bv, 1)
        inv_a = 1.0 / tl.maximum(tl.sqrt(na), EPS)
        inv_b = 1.0 / tl.maximum(tl.sqrt(nb), EPS)
        sim = acc * inv_a[:, None] * inv_b[None, :]
        sim = tl.where(p_ok[None, :], sim, NEG_INF)
        blk_v = tl.max(sim, 1)
        blk_i = tl.argmax(sim, 1).to(tl.int32) + p0
        upd = blk_v > best_v  # strict: an earlier block keeps a tie (first index wins, like torch)
        best_v = tl.where(upd, blk_v, best_v)
        best_i = tl.where(upd, blk_i, best_i)
    tl.store(val_ptr + sb * s_ob + offs_m, best_v, mask=m_ok)
    tl.store(idx_ptr + sb * s_ob + offs_m, best_i.to(tl.int64), mask=m_ok)


def sim_argmax(a: torch.Tensor, b: torch.Tensor, b_len: torch.Tensor | None):
    a, b = a.contiguous(), b.contiguous()
    bsz, m, d = a.shape
    p = b.shape[1]
    val = torch.empty(bsz, m, dtype=torch.float32, device=a.device)
    idx = torch.empty(bsz, m, dtype=torch.long, device=a.device)
    blen = b_len.to(a.device).contiguous() if b_len is not None else val  # unused pointer when HAS_LEN is False
    bm, bp, bd = 32, 32, 64
    _sim_argmax_kernel[(bsz, triton.cdiv(m, bm))](
        a, b, blen, val, idx, m, p, d, a.stride(0), a.stride(1), b.stride(0), b.stride(1), m,
        HAS_LEN=b_len is not None, BM=bm, BP=bp, BD=bd,
    )  # fmt: skip
    return val, idx


# --- greedy max-min selection: one launch per pick ----------------------------------------------------------------
@triton.jit
def _maxmin_step_kernel(
    x_ptr,
    mind_ptr,
    pv_ptr,
    pi_ptr,
    out_ptr,
    step,
    N,
    D,
    NB,
    s_xb,
    s_xn,
    s_mb,
    s_ob,
    BN: tl.constexpr,
    BD: tl.constexpr,
    BNB: tl.constexpr,
):
    """Pick ``step - 1`` of one segment from the previous launch's per-block maxima, then fold its distances into
    ``min_d`` for one block of ``BN`` tokens and write that block's max / arg-max for the next launch.

    Partials are double-buffered (``[B, 2, NB]``): launch ``step`` reads buffer ``(step - 1) % 2`` and writes
    ``step % 2``, so no program overwrites what another still reads."""
    sb = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    offs_q = tl.arange(0, BNB)
    q_ok = offs_q < NB
    prev = sb * 2 * NB + ((step - 1) % 2) * NB
    pv = tl.load(pv_ptr + prev + offs_q, mask=q_ok, other=NEG_INF)
    pi = tl.load(pi_ptr + prev + offs_q, mask=q_ok, other=0)
    j = tl.argmax(pv, 0)
    c = tl.sum(tl.where(offs_q == j, pi, 0), 0)  # the previous pick (first block wins ties)
    if nb == 0:
        tl.store(out_ptr + sb * s_ob + step - 1, c)
    offs_n = nb * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    x_base = x_ptr + sb * s_xb
    dot = tl.zeros([BN], tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        d_ok = offs_d < D
        xv = tl.load(x_base + offs_n[:, None] * s_xn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        cv = tl.load(x_base + c * s_xn + offs_d, mask=d_ok, other=0.0)
        dot += tl.sum(xv * cv[None, :], 1)
    md = tl.load(mind_ptr + sb * s_mb + offs_n, mask=n_ok, other=NEG_INF)
    md = tl.minimum(md, 1.0 - dot)
    md = tl.where(offs_n == c, NEG_INF, md)  # a chosen token stays at -inf: min() never lifts it
    tl.store(mind_ptr + sb * s_mb + offs_n, md, mask=n_ok)
    md = tl.where(n_ok, md, NEG_INF)
    cur = sb * 2 * NB + (step % 2) * NB
    tl.store(pv_ptr + cur + nb, tl.max(md, 0))
    tl.store(pi_ptr + cur + nb, (tl.argmax(md, 0) + nb * BN).to(tl.int64))


MIN_PROGRAMS = 264  # enough blocks per pick to fill an H100 / H200 (132 SMs) twice


def max_min_select(
    x: torch.Tensor, k: int, lengths: torch.Tensor | None, init: torch.Tensor | None, block_n: int | None = None
):
    bsz, n, d = x.shape
    xn = reference.normalize(x).contiguous()  # unit rows once; every pick then reads them
    valid = reference.valid_mask(lengths, bsz, n, x.device)
    min_d, first = reference.initial_state(xn, valid, init)
    min_d = min_d.contiguous()
    out = torch.empty(bsz, k, dtype=torch.long, device=x.device)
    bn = block_n or (64 if bsz * triton.cdiv(n, 64) >= MIN_PROGRAMS else 16)  # small inputs: more, smaller blocks
    bd = 64
    nblk = triton.cdiv(n, bn)
    part_v = torch.full((bsz, 2, nblk), float("-inf"), device=x.device)
    part_i = torch.zeros(bsz, 2, nblk, dtype=torch.long, device=x.device)
    part_v[:, 0, 0] = 0.0  # seed: the first pick sits alone in buffer 0
    part_i[:, 0, 0] = first
    bnb = max(2, triton.next_power_of_2(nblk))
    for step in range(1, k):
        _maxmin_step_kernel[(bsz, nblk)](
            xn, min_d, part_v, part_i, out, step, n, d, nblk, xn.stride(0), xn.stride(1), min_d.stride(0), k,
            BN=bn, BD=bd, BNB=bnb,
        )  # fmt: skip
    last = part_v[:, (k - 1) % 2].argmax(1, keepdim=True)
    out[:, k - 1] = part_i[:, (k - 1) % 2].gather(1, last).squeeze(1)
    return out


# --- row-wise patch / frame similarity ----------------------------------------------------------------------------
@triton.jit
def _patch_similarity_kernel(
    a_ptr, b_ptr, out_ptr, M, D, s_am, s_bm, COSINE: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr
):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_ok = offs_m < M
    acc = tl.zeros([BM], tl.float32)
    na = tl.zeros([BM], tl.float32)
    nb = tl.zeros([BM], tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        ok = m_ok[:, None] & (offs_d < D)[None, :]
        av = tl.load(a_ptr + offs_m[:, None] * s_am + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        bv = tl.load(b_ptr + offs_m[:, None] * s_bm + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        if COSINE:
            acc += tl.sum(av * bv, 1)
            na += tl.sum(av * av, 1)
            nb += tl.sum(bv * bv, 1)
        else:
            acc += tl.sum(tl.abs(av - bv), 1)
    if COSINE:
        res = acc / (tl.maximum(tl.sqrt(na), EPS) * tl.maximum(tl.sqrt(nb), EPS))
    else:
        res = acc / D
    tl.store(out_ptr + offs_m, res, mask=m_ok)


def patch_similarity(a: torch.Tensor, b: torch.Tensor, metric: str):
    a, b = a.contiguous(), b.contiguous()
    m, d = a.shape
    out = torch.empty(m, dtype=torch.float32, device=a.device)
    if m == 0:
        return out
    bm, bd = 32, 64
    _patch_similarity_kernel[(triton.cdiv(m, bm),)](
        a, b, out, m, d, a.stride(0), b.stride(0), COSINE=metric == "cosine", BM=bm, BD=bd
    )
    return out


# --- attention evidence: few query rows, softmax over keys, reduced per key ---------------------------------------
@triton.jit
def _logits_block(
    q_base, k_base, offs_r, offs_l, r_ok, l_ok, HD, s_qr, s_kl, scale, BR: tl.constexpr, BL: tl.constexpr,
    BD: tl.constexpr,
):  # fmt: skip
    acc = tl.zeros([BR, BL], tl.float32)
    for d0 in range(0, HD, BD):
        offs_d = d0 + tl.arange(0, BD)
        d_ok = offs_d < HD
        qv = tl.load(q_base + offs_r[:, None] * s_qr + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        kv = tl.load(k_base + offs_l[:, None] * s_kl + offs_d[None, :], mask=l_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(qv.to(tl.float32), tl.trans(kv.to(tl.float32)), input_precision="ieee")
    return acc * scale


@triton.jit
def _allowed_block(logits, m_base, offs_r, offs_l, r_ok, l_ok, s_mr, HAS_MASK: tl.constexpr):
    ok = r_ok[:, None] & l_ok[None, :]
    if HAS_MASK:
        ok = ok & (tl.load(m_base + offs_r[:, None] * s_mr + offs_l[None, :], mask=ok, other=0) != 0)
    return tl.where(ok, logits, NEG_INF), ok


@triton.jit
def _attn_lse_kernel(
    q_ptr, k_ptr, m_ptr, lse_ptr, H, GROUP, R, L, HD, s_qb, s_qh, s_qr, s_kb, s_kh, s_kl, s_mb, s_mr, scale,
    HAS_MASK: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """Log-sum-exp over keys of ``BR`` query rows of one (segment, head); ``+inf`` for a row with no allowed key."""
    pid = tl.program_id(0).to(tl.int64)
    sb, h = pid // H, pid % H
    offs_r = tl.program_id(1) * BR + tl.arange(0, BR)
    r_ok = offs_r < R
    q_base = q_ptr + sb * s_qb + h * s_qh
    k_base = k_ptr + sb * s_kb + (h // GROUP) * s_kh
    m_base = m_ptr + sb * s_mb
    run_m = tl.full([BR], NEG_INF, tl.float32)
    run_s = tl.zeros([BR], tl.float32)
    for l0 in range(0, L, BL):
        offs_l = l0 + tl.arange(0, BL)
        l_ok = offs_l < L
        logits = _logits_block(q_base, k_base, offs_r, offs_l, r_ok, l_ok, HD, s_qr, s_kl, scale, BR, BL, BD)
        logits, ok = _allowed_block(logits, m_base, offs_r, offs_l, r_ok, l_ok, s_mr, HAS_MASK)
        new_m = tl.maximum(run_m, tl.max(logits, 1))
        safe = tl.where(new_m == NEG_INF, 0.0, new_m)
        run_s = run_s * tl.exp(run_m - safe) + tl.sum(tl.where(ok, tl.exp(logits - safe[:, None]), 0.0), 1)
        run_m = new_m
    safe = tl.where(run_m == NEG_INF, 0.0, run_m)
    lse = tl.where(run_s > 0, safe + tl.log(tl.maximum(run_s, 1e-30)), POS_INF)
    tl.store(lse_ptr + pid * R + offs_r, lse, mask=r_ok)


@triton.jit
def _attn_colsum_kernel(
    q_ptr, k_ptr, m_ptr, lse_ptr, out_ptr, H, GROUP, R, L, HD, s_qb, s_qh, s_qr, s_kb, s_kh, s_kl, s_mb, s_mr,
    scale, HAS_MASK: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """Mean over query rows of the probabilities of ``BL`` keys of one (segment, head)."""
    pid = tl.program_id(0).to(tl.int64)
    sb, h = pid // H, pid % H
    offs_l = tl.program_id(1) * BL + tl.arange(0, BL)
    l_ok = offs_l < L
    q_base = q_ptr + sb * s_qb + h * s_qh
    k_base = k_ptr + sb * s_kb + (h // GROUP) * s_kh
    m_base = m_ptr + sb * s_mb
    acc = tl.zeros([BL], tl.float32)
    for r0 in range(0, R, BR):
        offs_r = r0 + tl.arange(0, BR)
        r_ok = offs_r < R
        logits = _logits_block(q_base, k_base, offs_r, offs_l, r_ok, l_ok, HD, s_qr, s_kl, scale, BR, BL, BD)
        logits, ok = _allowed_block(logits, m_base, offs_r, offs_l, r_ok, l_ok, s_mr, HAS_MASK)
        lse = tl.load(lse_ptr + pid * R + offs_r, mask=r_ok, other=POS_INF)
        acc += tl.sum(tl.where(ok, tl.exp(logits - lse[:, None]), 0.0), 0)
    tl.store(out_ptr + pid * L + offs_l, acc / R, mask=l_ok)


def attention_scores(q: torch.Tensor, k: torch.Tensor, scaling: float, allowed: torch.Tensor | None, reduce: str):
    q, k = q.contiguous(), k.contiguous()
    bsz, h, r, hd = q.shape
    hkv, length = k.shape[1], k.shape[2]
    out = torch.empty(bsz, h, length, dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz * h, r, dtype=torch.float32, device=q.device)
    mask = allowed.to(device=q.device, dtype=torch.uint8).contiguous() if allowed is not None else lse
    s_mb, s_mr = (mask.stride(0), mask.stride(1)) if allowed is not None else (0, 0)
    br, bl, bd = 16, 32, 64
    common = (h, h // hkv, r, length, hd, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1))
    common += (k.stride(2), s_mb, s_mr, scaling)
    meta = {"HAS_MASK": allowed is not None, "BR": br, "BL": bl, "BD": bd}
    _attn_lse_kernel[(bsz * h, triton.cdiv(r, br))](q, k, mask, lse, *common, **meta)
    _attn_colsum_kernel[(bsz * h, triton.cdiv(length, bl))](q, k, mask, lse, out, *common, **meta)
    return out.mean(1) if reduce == "mean" else out
