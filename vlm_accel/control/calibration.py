"""Cost model of a language model's prefill, calibrated once per model and device and cached on disk.

``calibrated(model, lm)`` returns a :class:`CostModel`: prefill milliseconds as ``a + batch * (b n + c n^2)`` for
``n`` input tokens, fitted to a few timed prefills of random embeddings (3-4 lengths, median of repeats). It is
stored under ``$VLM_ACCEL_CACHE`` (default ``~/.cache/vlm_accel``) in ``calibration.json``, keyed by the model
config's hash, the device, the dtype, the attention implementation and the number of CPU threads; a target that
needs it and finds none calibrates on first use and logs that it did. ``vlm-accel calibrate [--model DIR]`` runs it
explicitly.

With a merge inside the vision tower (``tome_vit``), a :class:`TowerCost` beside it holds the tower's milliseconds per
view at a few merge levels (same key + ``|tower|HxW|schedule``), so a latency target can choose the tower's merge
before the tower runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger("vlm_accel")

LENGTHS = (64, 128, 256, 512)


@dataclass
class CostModel:
    """``llm_ms(batch, n) = a + batch * (b * n + c * n**2)``: a language model prefill of ``n`` tokens per row."""

    key: str
    a: float
    b: float
    c: float
    lengths: tuple = LENGTHS
    measured_ms: tuple = ()
    overhead_ms: float = 0.0

    def llm_ms(self, batch: int, n: int) -> float:
        return self.a + batch * (self.b * n + self.c * n * n)

    def max_tokens(self, batch: int, ms: float) -> int:
        """Most tokens per row whose prefill fits in ``ms`` (0 when none)."""
        room = (ms - self.a) / max(batch, 1)
        if room <= 0:
            return 0
        if self.c > 0:
            n = (-self.b + math.sqrt(self.b * self.b + 4 * self.c * room)) / (2 * self.c)
        else:
            n = room / self.b if self.b > 0 else float(1 << 30)
        return max(0, int(math.floor(n)))

    def describe(self) -> str:
        return f"{self.a:.2f} ms + {self.b * 1e3:.3f} us/token + {self.c * 1e6:.4f} ns/token^2"


TOWER_KEEPS = (1.0, 0.5, 0.25, 0.11, 0.03)


@dataclass
class TowerCost:
    """The vision encoder's milliseconds per view (the tower, then the projector on what leaves it) when a merge
    inside the tower (``tome_vit``) lets ``keep`` of the view's tokens out (``keep`` a fraction; 1.0: no merge),
    measured at :data:`TOWER_KEEPS` and interpolated linearly between them (made non-decreasing in ``keep``)."""

    key: str
    keeps: tuple = TOWER_KEEPS
    ms: tuple = ()
    schedule: str = ""

    def view_ms(self, keep: float) -> float:
        pts = sorted(zip(self.keeps, self.ms, strict=True))
        xs = [k for k, _ in pts]
        ys = [max(m for _, m in pts[: i + 1]) for i in range(len(pts))]
        if keep <= xs[0]:
            return ys[0]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
            if keep <= x1:
                return y0 + (y1 - y0) * (keep - x0) / (x1 - x0)
        return ys[-1]

    def describe(self) -> str:
        return ", ".join(f"{k:g}: {m:.1f} ms" for k, m in sorted(zip(self.keeps, self.ms, strict=True)))


def cache_dir() -> Path:
    root = os.environ.get("VLM_ACCEL_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vlm_accel"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.machine()}:{platform.processor() or 'unknown'}:threads={torch.get_num_threads()}"


def model_key(model, lm) -> str:
    """The cache key: config hash, device, dtype, attention implementation."""
    p = next(lm.parameters())
    cfg = model.config.to_json_string(use_diff=False) if hasattr(model.config, "to_json_string") else repr(model)
    h = hashlib.sha1(cfg.encode()).hexdigest()[:16]
    attn = getattr(lm.config, "_attn_implementation", None)
    return f"{h}|{device_name(p.device)}|{p.dtype}|{attn}"


def _load() -> dict:
    path = cache_dir() / "calibration.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save(key: str, cost) -> Path:
    path = cache_dir() / "calibration.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _load()
    data[key] = asdict(cost)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return path


def lookup(model, lm) -> CostModel | None:
    """The cached cost model of ``model`` on its device, or ``None``."""
    key = model_key(model, lm)
    got = _load().get(key)
    if got is None:
        return None
    got["lengths"], got["measured_ms"] = tuple(got["lengths"]), tuple(got["measured_ms"])
    return CostModel(**got)


def tower_key(model, lm, size: tuple[int, int], schedule: str) -> str:
    """The tower's cache key: the model's, plus the view size in pixels (``(height, width)``) and the merge
    schedule."""
    return f"{model_key(model, lm)}|tower|{size[0]}x{size[1]}|{schedule}"


def lookup_tower(model, lm, size: tuple[int, int], schedule: str) -> TowerCost | None:
    got = _load().get(tower_key(model, lm, size, schedule))
    if got is None:
        return None
    return TowerCost(got["key"], tuple(got["keeps"]), tuple(got["ms"]), got.get("schedule", schedule))


@torch.no_grad()
def calibrate_tower(
    model, lm, probe, size: tuple[int, int], schedule: str, keeps=TOWER_KEEPS, repeats: int = 3, save: bool = True
) -> TowerCost:
    """Time the vision tower on one view of ``size`` pixels at each merge level of ``schedule``: ``probe(keep,
    size, schedule)`` runs it once with ``keep`` of the tokens leaving the tower (median of ``repeats`` after one
    warm-up each)."""
    device = next(lm.parameters()).device
    times = [_median_ms(lambda k=keep: probe(k, size, schedule), repeats, device) for keep in keeps]
    cost = TowerCost(tower_key(model, lm, size, schedule), tuple(keeps), tuple(times), schedule)
    if save:
        path = _save(cost.key, cost)
        logger.info("vlm_accel: calibrated the vision tower %s (%s) -> %s", cost.key, cost.describe(), path)
    return cost


def tower_calibrated(model, lm, probe, size: tuple[int, int], schedule: str) -> TowerCost:
    """The cached tower cost for views of ``size`` under ``schedule``, calibrating (and logging that it did) when
    there is none."""
    cost = lookup_tower(model, lm, size, schedule)
    if cost is None:
        logger.info("vlm_accel: no %s tower calibration for this model, device and view size; calibrating", schedule)
        cost = calibrate_tower(model, lm, probe, size, schedule)
    return cost


@torch.no_grad()
def calibrate(model, lm, lengths=LENGTHS, repeats: int = 3, save: bool = True) -> CostModel:
    """Time prefills of the language model ``lm`` on random embeddings at ``lengths`` (median of ``repeats`` after
    one warm-up each) and fit the cost model. Stored in the calibration cache when ``save``."""
    p = next(lm.parameters())
    limit = getattr(lm.config, "max_position_embeddings", None) or max(lengths)
    lengths = tuple(sorted({min(n, limit) for n in lengths}))
    hidden = lm.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    times = []
    for n in lengths:
        x = (torch.randn(1, n, hidden, generator=gen) * 0.02).to(p.device, p.dtype)
        times.append(_median_ms(lambda x=x: lm(inputs_embeds=x, use_cache=True), repeats, p.device))
    a, b, c = _fit(lengths, times)
    cost = CostModel(model_key(model, lm), a, b, c, lengths, tuple(times))
    if save:
        path = _save(cost.key, cost)
        logger.info("vlm_accel: calibrated %s (%s) -> %s", cost.key, cost.describe(), path)
    return cost


def _median_ms(run, repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``run()`` over ``repeats`` calls after one warm-up (synchronised on CUDA)."""
    runs = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            runs.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(runs)


def _fit(ns, ms) -> tuple[float, float, float]:
    """Least squares ``ms = a + b n + c n^2`` with ``a, b, c >= 0`` (a negative coefficient is dropped and the rest
    refitted)."""
    n = torch.tensor(ns, dtype=torch.float64)
    y = torch.tensor(ms, dtype=torch.float64)
    cols = {"a": torch.ones_like(n), "b": n, "c": n * n}
    use = list(cols)
    while True:
        A = torch.stack([cols[k] for k in use], 1)
        sol = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
        coef = dict(zip(use, sol.tolist(), strict=True))
        neg = [k for k, v in coef.items() if v < 0]
        if not neg or len(use) == 1:
            break
        use.remove(min(neg, key=lambda k: coef[k]))
    return max(coef.get("a", 0.0), 0.0), max(coef.get("b", 0.0), 0.0), max(coef.get("c", 0.0), 0.0)


def calibrated(model, lm) -> CostModel:
    """The cached cost model, calibrating (and logging that it did) when there is none."""
    cost = lookup(model, lm)
    if cost is None:
        logger.info("vlm_accel: no calibration for this model and device; calibrating now (a few prefills)")
        cost = calibrate(model, lm)
    return cost
