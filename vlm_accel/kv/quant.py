"""KIVI-style quantized KV cache and a mixed-precision (MiKV / ZipVL style) variant for transformers' Cache API.

Storage of one layer (all tensors ``[B, H_kv, ...]``):

- a full-precision window ``layer.keys`` / ``layer.values`` ``[B, H, n_fp, D]`` in the model dtype (the most recent
  entries, as in KIVI and transformers' ``QuantizedLayer``);
- quantized blocks holding the older entries: codes packed into ``uint8`` (8 bits: 1 per byte, 4 bits: 2 per byte,
  2 bits: 4 per byte) with a scale and a zero point per group, asymmetric min/max quantization.
  **Keys per channel**: one (scale, zero) per channel and group of ``group_size`` consecutive tokens
  (``[B, H, ceil(n / group_size), D]``). **Values per token**: one (scale, zero) per token and group of
  ``group_size`` consecutive channels (``[B, H, n, ceil(D / group_size)]``). Scales / zero points are float16 by
  default (float32 for a block whose statistics overflow float16, or with ``stats_dtype=torch.float32``).

Error bound: a group with range ``[min, max]`` is stored with ``zero <= min`` (rounded down to the statistics dtype)
and ``scale = (max - zero) / (2**bits - 1)`` (rounded up), so every element dequantizes to within ``scale / 2`` of
its value, i.e. half a quantization step ``(max - min) / (2**bits - 1) / 2`` (times ``1 + 2**-10`` for float16
statistics) plus float32 rounding.

**When entries are quantized (lazily).** ``update`` first moves the overflow of the window *held before this call*
into quantized blocks (whole groups of ``group_size`` entries, keeping at least ``residual`` entries at full
precision), then appends the new entries at full precision. So the prompt's entries stay at full precision until the
first decoding step (or an explicit ``flush()``): a press can evict them (``keep``) and score them
(``set_important``) right after prefill, exactly, before anything is quantized. The attention of every step sees the
dequantized older entries plus the exact window. After a ``flush`` the window holds between ``residual`` and
``residual + group_size - 1`` entries (once the sequence is longer than that); ``update`` appends its chunk on top.

**Eviction** (``layer.keep(index [B, H_kv, K])``, per row and KV head, as ``keys.gather(2, index)``) is exact at any
time, also during decoding: quantized entries are selected with their codes, their value statistics and the id of
their key group (``[B, H, K]`` int16, 2 bytes per entry; key groups nothing uses any more are dropped), so repeated
evictions add no error. The window stays exact if ``index`` ends with all of it in order (presses that keep the
recent tokens); otherwise it is quantized first. Importance flags (mixed precision) travel with the entries.

``bits=16`` never quantizes: the layer is then a plain ``DynamicLayer`` (generate is bit-identical to DynamicCache).

Accounting: ``nbytes(cache)`` (bytes really held: packed codes + scales + zero points + group ids + importance bits +
the window; any ``Cache``), ``dense_nbytes(cache)`` (the same entries unquantized), ``entries(cache)`` (per layer),
``layer_stats(cache)``. Bytes of a quantized entry relative to 16-bit: ``bits / 16 + 2 / group_size`` (keys and
values alike when ``group_size`` divides the head dim), e.g. 0.1875 at 2 bits and 0.3125 at 4 bits with groups of 32.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from transformers.cache_utils import Cache, DynamicLayer

logger = logging.getLogger(__name__)

QUANT_BITS = (2, 4, 8)
ALLOWED_BITS = (2, 4, 8, 16)  # 16 = no quantization (the model dtype)
ALLOWED_HIGH_BITS = (8, 16)
STATS_DTYPES = (torch.float16, torch.float32)

__all__ = [
    "ALLOWED_BITS",
    "MixedPrecisionKVCache",
    "MixedPrecisionKVLayer",
    "QuantizedKVCache",
    "QuantizedKVLayer",
    "dense_nbytes",
    "dequantize",
    "entries",
    "keep_entries",
    "layer_stats",
    "nbytes",
    "pack",
    "quantize",
    "topk_mask",
    "unpack",
]


# --------------------------------------------------------------------------------------------------- pure functions
def _check_bits(bits, allowed=QUANT_BITS, name="bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise ValueError(f"{name}={bits!r} is not supported; allowed: {', '.join(map(str, allowed))}")
    return bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., N]`` (values in ``[0, 2**bits)``) along the last dim into ``uint8``
    ``[..., ceil(N * bits / 8)]``: element ``j`` of a byte group sits in bits ``j*bits .. j*bits+bits-1``."""
    _check_bits(bits)
    codes = codes.to(torch.uint8)
    per = 8 // bits
    if per == 1:
        return codes.contiguous()
    n = codes.shape[-1]
    pad = -n % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.reshape(*codes.shape[:-1], (n + pad) // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (codes << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8 [..., ceil(n * bits / 8)]`` -> codes ``uint8 [..., n]``."""
    _check_bits(bits)
    per = 8 // bits
    if per == 1:
        return packed[..., :n]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :n]


def _round_stats(mn: torch.Tensor, mx: torch.Tensor, levels: int, dtype: torch.dtype):
    """``zero <= mn`` and ``scale >= (mx - zero) / levels`` representable in ``dtype`` (float32 inputs)."""
    zero = mn.to(dtype)
    if dtype != torch.float32:
        zero = torch.where(zero.float() > mn, torch.nextafter(zero, torch.full_like(zero, -math.inf)), zero)
    step = (mx - zero.float()) / levels
    scale = step.to(dtype)
    if dtype != torch.float32:
        scale = torch.where(scale.float() < step, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    return scale, zero


def quantize(x: torch.Tensor, bits: int, group_size: int, dim: int, stats_dtype: torch.dtype = torch.float16):
    """Group-wise asymmetric quantization of ``x [B, H, L, D]``; statistics over groups of ``group_size`` consecutive
    elements along ``dim`` (``-2``: per channel over token groups, KIVI keys; ``-1``: per token over channel groups,
    KIVI values), the last group possibly partial.

    Returns ``(packed uint8 [B, H, L, ceil(D * bits / 8)], scale, zero)`` with ``scale`` / ``zero``
    ``[B, H, ceil(L / g), D]`` (``dim=-2``) or ``[B, H, L, ceil(D / g)]`` (``dim=-1``)."""
    _check_bits(bits)
    if x.dim() != 4:
        raise ValueError(f"quantize expects [B, H, L, D] states; got shape {tuple(x.shape)}")
    d = dim % 4
    if d not in (2, 3):
        raise ValueError(f"quantize groups along dim -2 (tokens) or -1 (channels); got dim={dim}")
    levels = (1 << bits) - 1
    xf = x.float()
    size = xf.shape[d]
    n_groups = -(-size // group_size)
    pad = n_groups * group_size - size
    xp = xf
    if pad:
        edge = xf.narrow(d, size - 1, 1)
        xp = torch.cat([xf, edge.expand(*[pad if i == d else s for i, s in enumerate(edge.shape)])], dim=d)
    shape = list(xp.shape)
    grouped = xp.reshape(shape[:d] + [n_groups, group_size] + shape[d + 1 :])
    mn, mx = grouped.amin(d + 1), grouped.amax(d + 1)
    scale, zero = _round_stats(mn, mx, levels, stats_dtype)
    if stats_dtype != torch.float32 and not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        logger.debug("KV statistics overflow %s; this block keeps float32 statistics", stats_dtype)
        scale, zero = _round_stats(mn, mx, levels, torch.float32)
    s, z = _expand(scale, group_size, d, size).float(), _expand(zero, group_size, d, size).float()
    codes = torch.round((xf - z) / torch.where(s > 0, s, torch.ones_like(s))).clamp_(0, levels)
    return pack(codes.to(torch.uint8), bits), scale, zero


def _expand(stat: torch.Tensor, group_size: int, d: int, size: int) -> torch.Tensor:
    return stat.repeat_interleave(group_size, dim=d).narrow(d, 0, size)


def dequantize(packed, scale, zero, bits: int, group_size: int, dim: int, shape, dtype=torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``[B, H, L, D]`` of ``shape`` in ``dtype``."""
    d = dim % 4
    codes = unpack(packed, bits, shape[-1]).float()
    s, z = _expand(scale, group_size, d, shape[d]).float(), _expand(zero, group_size, d, shape[d]).float()
    return (codes * s + z).to(dtype)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``bool [B, H, L]``: True at the ``k`` highest ``scores [B, H, L]`` of every (row, head) — the usual way to turn
    a press's scores into the ``set_important`` mask of :class:`MixedPrecisionKVLayer`."""
    k = max(0, min(int(k), scores.shape[-1]))
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k:
        mask.scatter_(-1, scores.topk(k, dim=-1).indices, True)
    return mask


def _nb(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ---------------------------------------------------------------------------------------------------------- blocks
class _QBlock:
    """``n`` entries quantized at ``bits``: keys per channel (token groups), values per token (channel groups).

    ``gid`` (``[B, H, n]`` int16 / int32, or None): the key group of each entry in the key statistics
    ``[B, H, T, D]`` once entries were selected per (row, head) by :meth:`select`; None = consecutive groups of
    ``group_size`` entries."""

    def __init__(self, parts, bits: int, group_size: int, n: int, head_dim: int, gid=None):
        self.parts = parts  # (k_packed, k_scale, k_zero, v_packed, v_scale, v_zero)
        self.bits, self.group_size, self.n, self.head_dim, self.gid = bits, group_size, n, head_dim, gid

    @classmethod
    def make(cls, k, v, bits, group_size, stats_dtype):
        parts = quantize(k, bits, group_size, -2, stats_dtype) + quantize(v, bits, group_size, -1, stats_dtype)
        return cls(parts, bits, group_size, k.shape[-2], k.shape[-1])

    def _like(self, parts, n, gid):
        return _QBlock(parts, self.bits, self.group_size, n, self.head_dim, gid)

    def dequantize(self, dtype):
        kp, ks, kz, vp, vs, vz = self.parts
        shape = (*kp.shape[:2], self.n, self.head_dim)
        g, b = self.group_size, self.bits
        values = dequantize(vp, vs, vz, b, g, -1, shape, dtype)
        if self.gid is None:
            return dequantize(kp, ks, kz, b, g, -2, shape, dtype), values
        idx = self.gid.long().unsqueeze(-1).expand(*self.gid.shape, self.head_dim)
        codes = unpack(kp, b, self.head_dim).float()
        keys = codes * ks.gather(2, idx).float() + kz.gather(2, idx).float()
        return keys.to(dtype), values

    def flags(self):
        return None

    def nbytes(self) -> int:
        return _nb(*self.parts, self.gid)

    def map_batch(self, fn):
        return self._like(tuple(fn(t) for t in self.parts), self.n, None if self.gid is None else fn(self.gid))

    def truncate(self, n: int):
        """The first ``n`` entries (exact: the kept codes keep their groups' statistics)."""
        kp, ks, kz, vp, vs, vz = self.parts
        if self.gid is not None:
            return self._like((kp[:, :, :n], ks, kz, vp[:, :, :n], vs[:, :, :n], vz[:, :, :n]), n, self.gid[..., :n])
        ng = -(-n // self.group_size)
        parts = (kp[:, :, :n], ks[:, :, :ng], kz[:, :, :ng], vp[:, :, :n], vs[:, :, :n], vz[:, :, :n])
        return self._like(parts, n, None)

    def can_append(self, other) -> bool:
        return (
            isinstance(other, _QBlock)
            and other.bits == self.bits
            and self.gid is None
            and other.gid is None
            and self.n % self.group_size == 0
            and all(a.dtype == b.dtype for a, b in zip(self.parts, other.parts, strict=True))
        )

    def append(self, other):
        parts = tuple(torch.cat([a, b], dim=2) for a, b in zip(self.parts, other.parts, strict=True))
        return self._like(parts, self.n + other.n, None)

    def group_ids(self) -> torch.Tensor:
        """``long [B, H, n]``: each entry's key group."""
        if self.gid is not None:
            return self.gid.long()
        kp = self.parts[0]
        ids = torch.arange(self.n, device=kp.device) // self.group_size
        return ids.expand(*kp.shape[:2], self.n)

    @staticmethod
    def concat(blocks):
        """One block of all ``blocks`` (same bits, statistics dtype) in order, with explicit group ids."""
        gids, offset = [], 0
        for b in blocks:
            gids.append(b.group_ids() + offset)
            offset += b.parts[1].shape[2]
        parts = tuple(torch.cat([b.parts[i] for b in blocks], dim=2) for i in range(6))
        return blocks[0]._like(parts, sum(b.n for b in blocks), torch.cat(gids, -1))

    def select(self, index: torch.Tensor):
        """Entries ``index [B, H, K]`` (per row and head), exactly: codes, value statistics and key group ids are
        gathered; key groups no entry uses any more are dropped (per row / head, padded to the largest count)."""
        kp, ks, kz, vp, vs, vz = self.parts

        def rows(t):
            return t.gather(2, index.unsqueeze(-1).expand(*index.shape, t.shape[-1]))

        gid = self.group_ids().gather(2, index)
        used = torch.zeros(ks.shape[:3], dtype=torch.bool, device=ks.device).scatter_(2, gid, True)
        n_groups = int(used.sum(-1).max()) if used.numel() else 0
        order = torch.argsort((~used).to(torch.int8), dim=-1, stable=True)[..., :n_groups]
        rank = used.long().cumsum(-1) - 1
        gid = rank.gather(2, gid)
        gid = gid.to(torch.int16 if n_groups < 2**15 else torch.int32)
        table = order.unsqueeze(-1).expand(*order.shape, ks.shape[-1])
        parts = (rows(kp), ks.gather(2, table), kz.gather(2, table), rows(vp), rows(vs), rows(vz))
        return self._like(parts, index.shape[-1], gid)


class _RawBlock:
    """``n`` entries kept in the model dtype (the 16-bit "high precision" of a mixed layer)."""

    def __init__(self, k, v):
        self.k, self.v, self.n = k, v, k.shape[-2]

    def dequantize(self, dtype):
        return self.k.to(dtype), self.v.to(dtype)

    def flags(self):
        return None

    def nbytes(self) -> int:
        return _nb(self.k, self.v)

    def map_batch(self, fn):
        return _RawBlock(fn(self.k), fn(self.v))

    def truncate(self, n: int):
        return _RawBlock(self.k[:, :, :n], self.v[:, :, :n])

    def can_append(self, other) -> bool:
        return False

    @staticmethod
    def concat(blocks):
        return _RawBlock(torch.cat([b.k for b in blocks], 2), torch.cat([b.v for b in blocks], 2))

    def select(self, index):
        idx = index.unsqueeze(-1).expand(*index.shape, self.k.shape[-1])
        return _RawBlock(self.k.gather(2, idx), self.v.gather(2, idx))


class _MixedBlock:
    """``n`` entries in their order, those flagged important in ``high`` and the others in ``low`` (each holding, per
    (row, head), its entries in order, padded to the largest count over rows / heads with a copy of a real entry).
    The flags are kept packed, one bit per entry."""

    def __init__(self, flag_bits, high, low, n: int):
        self.flag_bits, self.high, self.low, self.n = flag_bits, high, low, n

    @staticmethod
    def make(k, v, flags, make_high, make_low):
        """``k, v [B, H, n, D]``, ``flags bool [B, H, n]``; ``make_high`` / ``make_low``: ``(k, v) -> block``."""
        n, d = k.shape[-2], k.shape[-1]
        hi, lo = _split(flags)

        def take(x, idx):
            return x.gather(2, idx.unsqueeze(-1).expand(*idx.shape, d))

        high = make_high(take(k, hi), take(v, hi))
        low = make_low(take(k, lo), take(v, lo))
        return _MixedBlock(_pack_flags(flags), high, low, n)

    def flags(self):
        return _unpack_flags(self.flag_bits, self.n)

    def dequantize(self, dtype):
        flags = self.flags()
        hk, hv = self.high.dequantize(dtype)
        lk, lv = self.low.dequantize(dtype)
        d = hk.shape[-1]
        r_hi = (flags.long().cumsum(-1) - 1).clamp(min=0).unsqueeze(-1).expand(*flags.shape, d)
        r_lo = ((~flags).long().cumsum(-1) - 1).clamp(min=0).unsqueeze(-1).expand(*flags.shape, d)
        sel = flags.unsqueeze(-1)

        def merge(h, lo):
            if h.shape[2] == 0:
                return lo.gather(2, r_lo)
            if lo.shape[2] == 0:
                return h.gather(2, r_hi)
            return torch.where(sel, h.gather(2, r_hi), lo.gather(2, r_lo))

        return merge(hk, lk), merge(hv, lv)

    def nbytes(self) -> int:
        return _nb(self.flag_bits) + self.high.nbytes() + self.low.nbytes()

    def map_batch(self, fn):
        return _MixedBlock(fn(self.flag_bits), self.high.map_batch(fn), self.low.map_batch(fn), self.n)

    def can_append(self, other) -> bool:
        return False


def _split(flags: torch.Tensor):
    """Positions ``[B, H, n_hi]`` of the flagged entries of ``flags bool [B, H, n]`` and ``[B, H, n_lo]`` of the
    others, each in order, padded to the largest count over rows / heads by repeating a real position."""
    n = flags.shape[-1]
    count = flags.sum(-1, keepdim=True)  # [B, H, 1]
    order = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True)  # flagged first, each in order
    n_hi, n_lo = int(count.max()) if n else 0, int((n - count).max()) if n else 0
    hi = torch.arange(n_hi, device=flags.device).expand(*count.shape[:2], n_hi)
    hi = order.gather(-1, torch.minimum(hi, (count - 1).clamp(min=0)))
    lo = torch.arange(n_lo, device=flags.device).expand(*count.shape[:2], n_lo)
    lo = order.gather(-1, (count + lo).clamp(max=n - 1))
    return hi, lo


def _select_blocks(blocks, index: torch.Tensor):
    """One block holding entries ``index [B, H, K]`` of the concatenation of ``blocks``, exactly (no
    re-quantization): uniform blocks give a :class:`_QBlock`; with mixed blocks the flagged entries are selected
    from the concatenated high stores and the others from the low stores."""
    if all(isinstance(b, _QBlock) for b in blocks):
        return _QBlock.concat(blocks).select(index)
    flags, ranks, hi_stores, lo_stores = [], [], [], []
    hi_off = lo_off = 0
    for b in blocks:
        if isinstance(b, _MixedBlock):
            f = b.flags()
            r_hi = f.long().cumsum(-1) - 1 + hi_off
            r_lo = (~f).long().cumsum(-1) - 1 + lo_off
            ranks.append(torch.where(f, r_hi, r_lo))
            hi_stores.append(b.high)
            lo_stores.append(b.low)
            hi_off, lo_off = hi_off + b.high.n, lo_off + b.low.n
        else:
            kp = b.parts[0]
            f = torch.zeros(*kp.shape[:2], b.n, dtype=torch.bool, device=kp.device)
            ranks.append(torch.arange(b.n, device=kp.device).expand(*kp.shape[:2], b.n) + lo_off)
            lo_stores.append(b)
            lo_off += b.n
        flags.append(f)
    flags = torch.cat(flags, -1).gather(2, index)
    rank = torch.cat(ranks, -1).gather(2, index)
    hi, lo = _split(flags)
    count = flags.sum(-1, keepdim=True)

    def positions(idx, n_real):  # store positions; padding points at entry 0 of the store (never read)
        valid = torch.arange(idx.shape[-1], device=idx.device) < n_real
        return torch.where(valid, rank.gather(2, idx), 0)

    low = _QBlock.concat(lo_stores).select(positions(lo, flags.shape[-1] - count))
    if hi.shape[-1] == 0:
        return low
    high = type(hi_stores[0]).concat(hi_stores).select(positions(hi, count))
    if hi.shape[-1] == 0:
        return low
    return _MixedBlock(_pack_flags(flags), high, low, index.shape[-1])


def _pack_flags(flags: torch.Tensor) -> torch.Tensor:
    """``bool [..., n]`` -> ``uint8 [..., ceil(n / 8)]``."""
    n = flags.shape[-1]
    f = torch.nn.functional.pad(flags.to(torch.uint8), (0, -n % 8))
    f = f.reshape(*flags.shape[:-1], f.shape[-1] // 8, 8)
    return (f << torch.arange(8, dtype=torch.uint8, device=f.device)).sum(-1, dtype=torch.uint8)


def _unpack_flags(bits: torch.Tensor, n: int) -> torch.Tensor:
    f = (bits.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=bits.device)) & 1
    return f.reshape(*bits.shape[:-1], bits.shape[-1] * 8)[..., :n].bool()


# ---------------------------------------------------------------------------------------------------------- layers
def _check_common(group_size, residual, stats_dtype):
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be an int >= 1 (e.g. 32, KIVI's default)")
    if isinstance(residual, bool) or not isinstance(residual, int) or residual < 0:
        raise ValueError(
            f"residual={residual!r} must be an int >= 0: the number of most recent entries kept at full precision"
        )
    if stats_dtype not in STATS_DTYPES:
        raise ValueError(f"stats_dtype={stats_dtype!r} is not supported; allowed: torch.float16, torch.float32")


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's KV cache quantized KIVI-style at ``bits`` (2, 4 or 8; 16 = no quantization), see the
    module docstring for the layout, the error bound and when entries get quantized.

    Args:
        bits: 2, 4, 8 or 16.
        group_size: entries per group: tokens per key statistic, channels per value statistic (KIVI: 32).
        residual: most recent entries always kept at full precision (>= 0; KIVI: 32-128).
        stats_dtype: ``torch.float16`` (default) or ``torch.float32`` for scales and zero points.

    ``keys`` / ``values`` hold only the full-precision window ``[B, H, n_fp, D]``; :meth:`materialize` returns all
    entries ``[B, H, L, D]``. Methods for presses: :meth:`keep` (evict), :meth:`flush` (quantize now),
    :meth:`nbytes` (bytes held)."""

    def __init__(self, bits: int = 4, group_size: int = 32, residual: int = 128, stats_dtype=torch.float16):
        super().__init__()
        self.bits = _check_bits(bits, ALLOWED_BITS)
        _check_common(group_size, residual, stats_dtype)
        self.group_size, self.residual, self.stats_dtype = group_size, residual, stats_dtype
        self.is_croppable = bits == 16  # a flush during draft verification cannot be undone exactly
        self._blocks: list = []
        self._flags: torch.Tensor | None = None  # importance of the window's entries (mixed layers)

    def __repr__(self):
        return f"{type(self).__name__}(bits={self.bits}, group_size={self.group_size}, residual={self.residual})"

    # --- state -------------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype

    def _n_fp(self) -> int:
        return self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0

    def get_seq_length(self) -> int:
        """Entries held per (row, head): quantized + full precision."""
        return sum(b.n for b in self._blocks) + self._n_fp()

    def reset(self) -> None:
        super().reset()
        self._blocks, self._flags = [], None

    # --- quantization -------------------------------------------------------------------------------------------
    def _make_block(self, k, v, flags):
        return _QBlock.make(k, v, self.bits, self.group_size, self.stats_dtype)

    def _add_block(self, block) -> None:
        if self._blocks and self._blocks[-1].can_append(block):
            self._blocks[-1] = self._blocks[-1].append(block)
        else:
            self._blocks.append(block)

    def flush(self) -> None:
        """Quantize now what ``update`` would quantize at its next call: the oldest whole groups of ``group_size``
        entries of the window beyond ``residual``. No-op at 16 bits."""
        n_fp = self._n_fp()
        n = (n_fp - self.residual) // self.group_size * self.group_size
        if self.bits == 16 or n <= 0:
            return
        flags = None if self._flags is None else self._flags[..., :n]
        self._add_block(self._make_block(self.keys[:, :, :n], self.values[:, :, :n], flags))
        self.keys, self.values = self.keys[:, :, n:].contiguous(), self.values[:, :, n:].contiguous()
        if self._flags is not None:
            self._flags = self._flags[..., n:].contiguous()

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states`` / ``value_states [B, H, q, D]``; return all keys / values ``[B, H, L, D]``
        (dequantized older entries, then the exact window). Quantizes the window held before this call first."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.flush()
        if self._flags is not None:
            new = torch.zeros(*key_states.shape[:2], key_states.shape[-2], dtype=torch.bool, device=self._flags.device)
            self._flags = torch.cat([self._flags, new], dim=-1)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if not self._blocks:
            return self.keys, self.values
        k, v = self._dequantize_blocks()
        return torch.cat([k, self.keys], dim=-2), torch.cat([v, self.values], dim=-2)

    def _dequantize_blocks(self):
        parts = [b.dequantize(self.dtype) for b in self._blocks]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts], dim=-2), torch.cat([p[1] for p in parts], dim=-2)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All held entries ``(keys, values) [B, H, L, D]`` in the model dtype (older ones dequantized)."""
        if not self.is_initialized:
            raise ValueError("this cache layer holds nothing yet: run a forward pass with the cache first")
        if not self._blocks:
            return self.keys, self.values
        k, v = self._dequantize_blocks()
        return torch.cat([k, self.keys], dim=-2), torch.cat([v, self.values], dim=-2)

    def _all_flags(self) -> torch.Tensor | None:
        """Importance of every held entry ``bool [B, H, L]``, or None when nothing is flagged."""
        if self._flags is None and all(b.flags() is None for b in self._blocks):
            return None
        b, h = self.keys.shape[:2]
        parts = [
            f if (f := blk.flags()) is not None else torch.zeros(b, h, blk.n, dtype=torch.bool, device=self.device)
            for blk in self._blocks
        ]
        fp = self._flags
        if fp is None:
            fp = torch.zeros(b, h, self._n_fp(), dtype=torch.bool, device=self.device)
        return torch.cat(parts + [fp], dim=-1)

    def _rebuild(self, k, v, flags, quantize_now: bool) -> None:
        """Replace the content by ``k, v [B, H, L, D]`` (window) and ``flags``; quantize now if asked."""
        self._blocks = []
        self.keys, self.values = k.contiguous(), v.contiguous()
        self._flags = None if flags is None or not bool(flags.any()) else flags.contiguous()
        if quantize_now:
            self.flush()

    # --- eviction / beams ---------------------------------------------------------------------------------------
    def keep(self, index: torch.Tensor) -> None:
        """Keep only the entries ``index [B, H, K]`` (long; per row and KV head, positions in ``[0, L)``; their order
        becomes the new order, as ``keys.gather(2, index)``). Exact while nothing is quantized yet (right after
        prefill: quantization is lazy), and exact on quantized entries too (their codes, value statistics and key
        group ids are gathered; repeated evictions add no error). The full-precision window stays as it is when
        ``index`` ends with all of its entries in order (a press that keeps the recent tokens); otherwise the window
        is quantized first. Importance flags (mixed precision) travel with the entries."""
        if not self.is_initialized:
            raise ValueError("keep() needs a filled cache layer: run the prefill with this cache first")
        b, h = self.keys.shape[:2]
        if index.dim() != 3 or tuple(index.shape[:2]) != (b, h):
            raise ValueError(f"keep() expects an index [B={b}, H_kv={h}, K]; got shape {tuple(index.shape)}")
        n = self.get_seq_length()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ValueError(f"keep() index out of range: entries are numbered 0..{n - 1}")
        index = index.to(self.device, torch.long)
        if self._blocks:
            self._keep_quantized(index)
            return
        idx = index.unsqueeze(-1).expand(*index.shape, self.keys.shape[-1])
        flags = None if self._flags is None else self._flags.gather(2, index)
        self._rebuild(self.keys.gather(2, idx), self.values.gather(2, idx), flags, quantize_now=False)

    def keep_entries(self, index: torch.Tensor) -> None:
        """Alias of :meth:`keep` (the name ``vlm_accel.kv.compress`` looks for)."""
        self.keep(index)

    def full_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Alias of :meth:`materialize` (the name ``vlm_accel.kv.compress`` looks for)."""
        return self.materialize()

    def _keep_quantized(self, index: torch.Tensor) -> None:
        """Exact selection over quantized blocks: the window stays as is when ``index`` ends with all of it (in
        order) and otherwise picks only quantized entries; else the window is quantized first."""
        n_fp, k_new = self._n_fp(), index.shape[-1]
        n_q = self.get_seq_length() - n_fp
        window = torch.arange(n_q, n_q + n_fp, device=index.device)
        head = index[..., : k_new - n_fp] if k_new >= n_fp else None
        if head is not None and torch.equal(index[..., k_new - n_fp :], window.expand(*index.shape[:2], n_fp)):
            if head.numel() and int(head.max()) >= n_q:
                head = None  # a window entry also picked among the older ones
        else:
            head = None
        if head is None:  # quantize the whole window now, then select among quantized entries only
            if n_fp:
                self._blocks.append(self._make_block(self.keys, self.values, self._flags))
                self.keys, self.values, self._flags = self.keys[:, :, :0], self.values[:, :, :0], None
            head = index
        self._blocks = [_select_blocks(self._blocks, head)] if head.shape[-1] else []

    def _map_batch(self, fn) -> None:
        if self.get_seq_length() == 0:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self._blocks = [b.map_batch(fn) for b in self._blocks]
        if self._flags is not None:
            self._flags = fn(self._flags)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows ``beam_idx`` (exact on quantized blocks: codes and statistics are reordered)."""
        if self.get_seq_length() > 0:
            idx = beam_idx.to(self.device)
            self._map_batch(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._map_batch(lambda t: t[indices.to(t.device) if torch.is_tensor(indices) else indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` entries (negative, as ``DynamicLayer.crop``); exact."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative count of entries to remove")
        drop = -tokens_to_remove
        if drop == 0 or not self.is_initialized:
            return
        n_fp = self._n_fp()
        cut = min(drop, n_fp)
        if cut:
            self.keys, self.values = self.keys[:, :, : n_fp - cut], self.values[:, :, : n_fp - cut]
            if self._flags is not None:
                self._flags = self._flags[..., : n_fp - cut]
        drop -= cut
        while drop and self._blocks:
            blk = self._blocks.pop()
            if blk.n <= drop:
                drop -= blk.n
                continue
            if isinstance(blk, _MixedBlock):
                b, h = blk.flag_bits.shape[:2]
                first = torch.arange(blk.n - drop, device=blk.flag_bits.device).expand(b, h, blk.n - drop)
                self._add_block(_select_blocks([blk], first))
            else:
                self._add_block(blk.truncate(blk.n - drop))
            drop = 0

    # --- accounting ---------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes really held: packed codes + scales + zero points (+ importance bits) + the full-precision window."""
        window = _nb(self.keys, self.values) if self.is_initialized else 0
        return window + sum(b.nbytes() for b in self._blocks) + (_nb(self._flags) if self._flags is not None else 0)

    def dense_nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes the same entries would take unquantized (keys + values in ``dtype``, default the model dtype)."""
        if not self.is_initialized or self.keys.dim() != 4:
            return 0
        b, h, _, d = self.keys.shape
        size = torch.empty((), dtype=dtype or self.dtype).element_size()
        return 2 * b * h * self.get_seq_length() * d * size


class MixedPrecisionKVLayer(QuantizedKVLayer):
    """Mixed precision (MiKV / ZipVL style): entries flagged important are stored at ``high_bits`` (8, or 16 = the
    model dtype), the rest at ``bits`` (2 or 4, default 2); recent ``residual`` entries at full precision.

    Drive it from a press's scores right after prefill (while everything is still full precision)::

        layer.keep(index)                          # optional eviction first, index [B, H_kv, K]
        layer.set_important(topk_mask(scores, k))  # scores [B, H_kv, L] -> bool mask [B, H_kv, L]

    Entries appended later (decoding) are not important unless ``set_important`` is called again (on all held
    entries; entries already quantized are then re-quantized from their dequantized values). Flags travel with the
    entries through ``keep`` (exact), ``crop`` and beam reordering. Rows / heads may flag different counts: the high /
    low stores are padded to the largest count (the padding is counted in :meth:`nbytes`)."""

    def __init__(
        self, bits: int = 2, high_bits: int = 8, group_size: int = 32, residual: int = 128, stats_dtype=torch.float16
    ):
        _check_bits(bits, (2, 4), "bits (low precision of a mixed layer)")
        _check_bits(high_bits, ALLOWED_HIGH_BITS, "high_bits")
        super().__init__(bits=bits, group_size=group_size, residual=residual, stats_dtype=stats_dtype)
        self.high_bits = high_bits

    def __repr__(self):
        return (
            f"{type(self).__name__}(bits={self.bits}, high_bits={self.high_bits}, group_size={self.group_size}, "
            f"residual={self.residual})"
        )

    def _make_block(self, k, v, flags):
        def low(k, v):
            return _QBlock.make(k, v, self.bits, self.group_size, self.stats_dtype)

        def high(k, v):
            if self.high_bits == 16:
                return _RawBlock(k.contiguous(), v.contiguous())
            return _QBlock.make(k, v, self.high_bits, self.group_size, self.stats_dtype)

        if flags is None or not bool(flags.any()):
            return low(k, v)
        return _MixedBlock.make(k, v, flags, high, low)

    def set_important(self, mask: torch.Tensor) -> None:
        """Flag the held entries ``mask bool [B, H_kv, L]`` (``L = get_seq_length()``, in the cache's entry order)
        as important. Exact when called before anything is quantized (right after prefill); entries already
        quantized keep their dequantized values (re-quantized at once at their new precision)."""
        if not self.is_initialized:
            raise ValueError("set_important() needs a filled cache layer: run the prefill with this cache first")
        b, h = self.keys.shape[:2]
        n = self.get_seq_length()
        if mask.dtype != torch.bool or tuple(mask.shape) != (b, h, n):
            raise ValueError(
                f"set_important() expects a bool mask [B={b}, H_kv={h}, L={n}]; got {mask.dtype} {tuple(mask.shape)}"
            )
        mask = mask.to(self.device)
        if not self._blocks:
            self._flags = mask.clone() if bool(mask.any()) else None
            return
        k, v = self.materialize()
        self._rebuild(k, v, mask, quantize_now=True)

    def important(self) -> torch.Tensor:
        """``bool [B, H_kv, L]``: which held entries are flagged important."""
        flags = self._all_flags()
        if flags is None:
            b, h = self.keys.shape[:2]
            return torch.zeros(b, h, self.get_seq_length(), dtype=torch.bool, device=self.device)
        return flags


# ---------------------------------------------------------------------------------------------------------- caches
def _decoder_layers(config) -> list[str] | None:
    """Per decoder layer its type, for a cache built up front; ``None`` without a config (layers added lazily)."""
    if config is None:
        return None
    text = config.get_text_config(decoder=True)
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    bad = sorted(set(types) - {"full_attention", "linear_attention"})
    if bad:
        raise ValueError(f"quantized KV caches support full-attention layers only; this model also has {bad}")
    return list(types)


class QuantizedKVCache(Cache):
    """A ``Cache`` of :class:`QuantizedKVLayer` for ``model.generate(cache=...)`` (or ``past_key_values=``).

    Args:
        bits: 2, 4, 8 or 16 (16: no quantization, identical to ``DynamicCache``).
        group_size, residual, stats_dtype: see :class:`QuantizedKVLayer` (defaults: 32, 128, float16).
        config: the model config (optional): layers are then built up front and sliding-window models refused;
            without it they are added lazily, one per decoder layer."""

    layer_type = QuantizedKVLayer

    def __init__(
        self, bits: int = 4, group_size: int = 32, residual: int = 128, stats_dtype=torch.float16, config=None
    ):
        factory = functools.partial(
            self.layer_type, bits=bits, group_size=group_size, residual=residual, stats_dtype=stats_dtype
        )
        self._init(factory, config)

    def _init(self, factory, config):
        factory()  # validates the arguments now, not at the first forward
        types = _decoder_layers(config)
        if types is None:
            super().__init__(layer_class_to_replicate=factory)
        else:  # hybrid decoders: linear-attention layers keep their recurrent state as it is
            from transformers.cache_utils import LinearAttentionLayer

            super().__init__(layers=[LinearAttentionLayer() if t == "linear_attention" else factory() for t in types])

    def flush(self) -> None:
        """Quantize now what the next decoding step would (see :meth:`QuantizedKVLayer.flush`)."""
        for layer in self.layers:
            if hasattr(layer, "flush"):
                layer.flush()


class MixedPrecisionKVCache(QuantizedKVCache):
    """A ``Cache`` of :class:`MixedPrecisionKVLayer`: ``bits`` (2 or 4) for ordinary entries, ``high_bits`` (8 or 16)
    for those flagged with ``cache.layers[i].set_important(mask)`` / :meth:`set_important`."""

    layer_type = MixedPrecisionKVLayer

    def __init__(
        self,
        bits: int = 2,
        high_bits: int = 8,
        group_size: int = 32,
        residual: int = 128,
        stats_dtype=torch.float16,
        config=None,
    ):
        factory = functools.partial(
            self.layer_type,
            bits=bits,
            high_bits=high_bits,
            group_size=group_size,
            residual=residual,
            stats_dtype=stats_dtype,
        )
        self._init(factory, config)

    def set_important(self, layer_idx: int, mask: torch.Tensor) -> None:
        self.layers[layer_idx].set_important(mask)


# ------------------------------------------------------------------------------------------------------ accounting
def _layer_nbytes(layer) -> int:
    if hasattr(layer, "nbytes") and callable(layer.nbytes):
        return layer.nbytes()
    held = [getattr(layer, "keys", None), getattr(layer, "values", None)]
    for states in ("conv_states", "recurrent_states"):  # a linear-attention layer's state (hybrid decoders)
        value = getattr(layer, states, None)
        held += list(value.values()) if isinstance(value, dict) else [value]
    return _nb(*[t for t in held if torch.is_tensor(t)])


def nbytes(cache) -> int:
    """Bytes of KV really held by ``cache`` (a ``Cache`` or one layer): for quantized layers packed codes + scales +
    zero points + the full-precision window; for plain layers (``DynamicLayer``, ...) their keys and values."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return _layer_nbytes(cache)
    return sum(_layer_nbytes(layer) for layer in layers)


def entries(cache) -> list[int]:
    """KV entries held per layer (per row and KV head)."""
    return [layer.get_seq_length() for layer in cache.layers]


def dense_nbytes(cache, dtype: torch.dtype | None = None) -> int:
    """Bytes the entries of ``cache`` would take unquantized (keys + values in ``dtype``, default each layer's)."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "dense_nbytes"):
            total += layer.dense_nbytes(dtype)
        elif getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
            size = torch.empty((), dtype=dtype or layer.keys.dtype).element_size()
            total += 2 * layer.keys.numel() * size
    return total


def layer_stats(cache) -> list[dict]:
    """Per layer: ``entries`` (per row and head), ``bytes`` held, ``quantized`` / ``full_precision`` entries."""
    out = []
    for layer in cache.layers:
        n = layer.get_seq_length()
        fp = layer._n_fp() if isinstance(layer, QuantizedKVLayer) else n
        out.append({"entries": n, "bytes": _layer_nbytes(layer), "quantized": n - fp, "full_precision": fp})
    return out


def keep_entries(layer, index: torch.Tensor) -> None:
    """Keep the entries ``index [B, H_kv, K]`` of any cache layer: :meth:`QuantizedKVLayer.keep` for ours, a gather
    of ``keys`` / ``values`` for a ``DynamicLayer``."""
    if isinstance(layer, QuantizedKVLayer):
        layer.keep(index)
        return
    idx = index.to(layer.keys.device, torch.long)
    idx = idx.unsqueeze(-1).expand(*idx.shape, layer.keys.shape[-1])
    layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
