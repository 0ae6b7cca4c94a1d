"""One budget for everything; the controller turns it into per-segment token quotas."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


def _as_number(value):
    """A numeric scalar as the Python ``float`` / ``int`` it holds: numpy scalars, 0-d arrays and 0-d tensors
    included; bools (also numpy / tensor bools) and everything else unchanged (then refused by the caller)."""
    if getattr(value, "shape", None) == () and hasattr(value, "item"):  # 0-d tensor / array, numpy scalar
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _check_fraction_or_count(name: str, value) -> float | int:
    """``value`` as a Python ``float`` in (0, 1] or ``int`` >= 1 (numeric scalars of any library are accepted)."""
    value = _as_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} budget must be a float in (0, 1] or an int >= 1; got {value!r}")
    if isinstance(value, float):
        if math.isnan(value) or not 0.0 < value <= 1.0:
            raise ValueError(
                f"{name} budget {value!r} is not a fraction in (0, 1]; pass e.g. 0.25 to keep a quarter of the "
                "tokens, or an int >= 1 for a token count"
            )
    elif value < 1:
        raise ValueError(f"{name} budget {value!r} must be >= 1 when given as a token count (int)")
    return value


@dataclass(frozen=True)
class Budget:
    """What to spend.

    Args:
        visual: float in (0, 1] = fraction of visual tokens kept per image / crop / frame; int >= 1 = tokens kept
            per image (per crop for anyres images, per frame for video). A count above the available tokens keeps
            them all.
        kv: KV entries kept per layer after prefill: a fraction of the prompt's (1.0 = no eviction) or a count.
        kv_bits: 16 (off), 4 or 2: the KV cache quantized KIVI-style (keys per channel, values per token, a
            full-precision window of recent tokens).
        kv_max: at most this many KV entries per layer and row while decoding, however long the generation or the
            stream (``None``: no bound).
        kv_important: with ``kv_bits`` 2 or 4, this fraction of each layer's prompt entries (those the KV press
            scores highest) is kept at 8 bits: mixed precision (MiKV / ZipVL style).
        llm: for a composite method (``"visionzip+fastv"``): what the in-LLM stage keeps of the visual tokens that
            enter the LLM, after its last stage (fraction, or count per image / crop / frame). A single in-LLM method
            (``"fastv"``, ``"pdrop"``) uses ``visual`` for that.
        encoder: for a composite with a vision-tower merging method (``"tome_vit+visionzip"``): what leaves the tower
            per image / crop / frame (fraction or count); ``visual`` is then what the pre-LLM method keeps of it. A
            tower method alone uses ``visual``.
        tokens: a total target: at most this many visual tokens per prompt, however many images, crops or frames it
            has, split among them by their information (``session.plan`` shows the split).
        latency_ms: a total target: the prefill (time to first token) of a request within this many milliseconds,
            through the model's calibrated cost model (:mod:`vlm_accel.control.calibration`).
        memory_gb: a total target: the request's KV cache plus its prefill activations under this many GB
            (``session.stats.kv_bytes`` never exceeds it); cuts visual tokens so the prompt fits and bounds the cache
            while decoding.
        video: ``"frame"`` (default): the visual budget applies to every frame of a video; ``"clip"``: to the whole
            clip (an int is then the tokens kept for the clip, and methods see all its frames at once).
    """

    visual: float | int = 1.0
    kv: float | int = 1.0
    video: str = "frame"
    llm: float | int = 1.0
    kv_bits: int = 16
    kv_max: int | None = None
    kv_important: float = 0.0
    encoder: float | int = 1.0
    tokens: int | None = None
    latency_ms: float | None = None
    memory_gb: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "visual", _check_fraction_or_count("visual", self.visual))
        object.__setattr__(self, "kv", _check_fraction_or_count("kv", self.kv))
        object.__setattr__(self, "llm", _check_fraction_or_count("llm", self.llm))
        object.__setattr__(self, "encoder", _check_fraction_or_count("encoder", self.encoder))
        bits = _as_number(self.kv_bits)
        if isinstance(bits, bool) or bits not in (2, 4, 16):
            raise ValueError(f"Budget.kv_bits must be 16 (no quantization), 4 or 2; got {self.kv_bits!r}")
        object.__setattr__(self, "kv_bits", int(bits))
        if self.kv_max is not None:
            m = _as_number(self.kv_max)
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise ValueError(f"Budget.kv_max must be None or an int >= 1 (entries per layer); got {self.kv_max!r}")
            object.__setattr__(self, "kv_max", m)
        imp = _as_number(self.kv_important)
        if isinstance(imp, bool) or not isinstance(imp, (int, float)) or not 0.0 <= imp < 1.0:
            raise ValueError(f"Budget.kv_important must be a fraction in [0, 1); got {self.kv_important!r}")
        if imp and self.kv_bits == 16:
            raise ValueError("Budget.kv_important needs kv_bits=2 or 4 (the other entries are quantized to those bits)")
        object.__setattr__(self, "kv_important", float(imp))
        if self.tokens is not None:
            t = _as_number(self.tokens)
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"Budget.tokens is a total count of visual tokens (int >= 1); got {self.tokens!r}")
            if t < 1:
                raise ValueError(f"Budget.tokens={t} keeps nothing; the smallest reachable target is tokens=1")
            object.__setattr__(self, "tokens", t)
        for name, unit in (("latency_ms", "milliseconds"), ("memory_gb", "GB")):
            v = _as_number(getattr(self, name))
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"Budget.{name} is a number of {unit}; got {getattr(self, name)!r}")
            if math.isnan(v) or math.isinf(v) or v <= 0:
                raise ValueError(
                    f"Budget.{name}={v!r} is unreachable: it must be a positive, finite number of {unit} "
                    f"(e.g. {name}={'300' if name == 'latency_ms' else '4'})"
                )
            object.__setattr__(self, name, float(v))
        if self.video not in ("frame", "clip"):
            raise ValueError(f"Budget.video must be 'frame' or 'clip', got {self.video!r}")

    @classmethod
    def of(cls, budget) -> Budget:
        """Coerce ``float | int | Budget`` into a ``Budget``."""
        if isinstance(budget, Budget):
            return budget
        if budget is None:
            raise TypeError("budget is required: a float in (0, 1], an int >= 1, or vlm_accel.Budget(...)")
        return cls(visual=budget)

    @property
    def is_full(self) -> bool:
        visual_full = self.visual == 1.0 and not isinstance(self.visual, int)
        kv_full = self.kv == 1.0 and not isinstance(self.kv, int) and self.kv_bits == 16 and self.kv_max is None
        targets = self.tokens is None and self.latency_ms is None and self.memory_gb is None
        return visual_full and kv_full and self.llm == 1.0 and self.encoder == 1.0 and not self.kv_important and targets

    @property
    def has_target(self) -> bool:
        """A total target (``tokens`` / ``latency_ms`` / ``memory_gb``) is set."""
        return self.tokens is not None or self.latency_ms is not None or self.memory_gb is not None

    def visual_quota(self, n_tokens: int, units: int = 1) -> int:
        """Tokens to keep of a segment of ``n_tokens`` that counts as ``units`` images/crops/frames."""
        if n_tokens <= 0:
            return 0
        if isinstance(self.visual, float):
            return min(n_tokens, max(1, round(self.visual * n_tokens)))
        return min(n_tokens, self.visual * units)
