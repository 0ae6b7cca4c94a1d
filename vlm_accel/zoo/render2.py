"""A second clip renderer, written separately from :mod:`vlm_accel.zoo.clips` / :mod:`vlm_accel.zoo.render` (issue #32).

It asks the same six clip questions in the same words (:data:`vlm_accel.zoo.clips.QUESTION`) about the same shapes
and colour names, but draws everything itself: shapes are rasterised with numpy (signed distances and half-planes,
3×3 supersampled coverage, so edges are anti-aliased), no PIL drawing. Its conventions differ on purpose: its own
RGB palette, pixel geometry (sizes and speeds in pixels, frames 176–320 px in multiples of 16), isosceles triangles
pointing up / down / left / right, rectangles from 1:2 to 2:1 and rounded at the corners, soft shadows, backgrounds
of floor-and-wall or paper grain, constant-velocity moves, events timed by fractions of the clip.

It is a held-out check only: **never used in training** (``training/`` must not import it). :func:`heldout_clips2`
mirrors :func:`vlm_accel.zoo.clips.heldout_clips` (same item dicts, balanced over the six types).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .clips import NUM_FRAMES, QTYPES, QUESTION
from .render import COLOR_NAMES, SHAPES, Balance

PALETTE = {  # this renderer's own idea of each colour name
    "red": (205, 28, 48),
    "green": (34, 150, 62),
    "blue": (44, 62, 196),
    "yellow": (238, 196, 30),
    "black": (18, 20, 28),
    "gray": (136, 138, 134),
    "teal": (18, 128, 136),
    "brown": (128, 76, 38),
}
SS = 3  # supersampling per axis


@dataclass
class Thing:
    """One object: pixel centre ``(x, y)`` (moving with velocity ``(vx, vy)`` px/frame on frames ``m0 … m1``),
    radius ``r`` px, present on ``born <= t < gone``, colour ``c2`` from frame ``turn`` on."""

    shape: str
    color: str
    x: float
    y: float
    r: float
    aspect: float = 1.0  # rectangle height / width
    point: str = "up"  # triangle apex direction
    vx: float = 0.0
    vy: float = 0.0
    m0: int = 0
    m1: int = 0
    born: int = 0
    gone: int = 10**6
    c2: str | None = None
    turn: int | None = None

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def alive(self, t: int) -> bool:
        return self.born <= t < self.gone

    def at(self, t: int) -> tuple[float, float]:
        k = min(max(t, self.m0), self.m1) - self.m0
        return self.x + self.vx * k, self.y + self.vy * k

    def paint(self, t: int) -> str:
        return self.c2 if self.turn is not None and t >= self.turn else self.color

    def heading(self) -> str | None:
        if not (self.vx or self.vy):
            return None
        if abs(self.vx) >= abs(self.vy):
            return "right" if self.vx > 0 else "left"
        return "down" if self.vy > 0 else "up"


@dataclass
class Clip2:
    frames: np.ndarray  # [T', H, W, 3] uint8
    index: np.ndarray
    things: list[Thing]
    kind: str
    length: int
    fps: int
    masks: np.ndarray = field(repr=False, default=None)  # [T', H, W] uint8: object index + 1 (coverage >= 0.5)


def _coverage(t: Thing, cx: float, cy: float, H: int, W: int) -> tuple[slice, slice, np.ndarray]:
    """Supersampled coverage of the object in its bounding window: ``(rows, cols, cover [h, w] in 0..1)``."""
    ext = t.r * 1.5 + 2
    y0, y1 = max(int(cy - ext), 0), min(int(cy + ext) + 1, H)
    x0, x1 = max(int(cx - ext), 0), min(int(cx + ext) + 1, W)
    if y1 <= y0 or x1 <= x0:
        return slice(0, 0), slice(0, 0), np.zeros((0, 0))
    sub = (np.arange(SS) + 0.5) / SS
    ys = (np.arange(y0, y1)[:, None] + sub[None]).reshape(-1)[:, None] - cy
    xs = (np.arange(x0, x1)[:, None] + sub[None]).reshape(-1)[None, :] - cx
    if t.shape == "circle":
        inside = xs**2 + ys**2 <= t.r**2
    elif t.shape == "rectangle":
        hw, hh = (t.r, t.r * t.aspect) if t.aspect <= 1 else (t.r / t.aspect, t.r)
        rad = 0.2 * min(hw, hh)  # rounded corners
        qx, qy = np.maximum(np.abs(xs) - (hw - rad), 0), np.maximum(np.abs(ys) - (hh - rad), 0)
        inside = (np.abs(xs) <= hw) & (np.abs(ys) <= hh) & (qx**2 + qy**2 <= rad**2)
    else:  # isosceles: apex at distance r from the centre, base 2r wide at distance r on the other side
        u, v = {"up": (xs, -ys), "down": (xs, ys), "left": (ys, -xs), "right": (ys, xs)}[t.point]
        inside = (v <= t.r) & (v >= -t.r) & (np.abs(u) <= (t.r - v) / 2)
    cover = inside.reshape(y1 - y0, SS, x1 - x0, SS).mean((1, 3))
    return slice(y0, y1), slice(x0, x1), cover


def _backdrop(rng: random.Random, H: int, W: int) -> np.ndarray:
    style = rng.choice(["wall", "paper", "flat"])
    top = np.array([rng.uniform(200, 250) for _ in range(3)])
    if style == "wall":  # wall above a slightly darker floor, with a soft horizon
        floor = top * rng.uniform(0.82, 0.93)
        horizon = rng.uniform(0.55, 0.8) * H
        w = 1 / (1 + np.exp(-(np.arange(H) - horizon) / 3.0))
        img = (1 - w)[:, None, None] * top + w[:, None, None] * floor
        img = np.broadcast_to(img, (H, W, 3)).copy()
    elif style == "paper":  # fibrous grain: noise stretched along one axis
        g = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(2, 6), (H, W // 4 + 1))
        img = top + np.repeat(g, 4, axis=1)[:, :W, None]
    else:
        img = np.broadcast_to(top, (H, W, 3)).copy()
    yy, xx = np.mgrid[0:H, 0:W]
    vignette = 1 - rng.uniform(0, 0.12) * (((xx - W / 2) / W) ** 2 + ((yy - H / 2) / H) ** 2) * 4
    return img * vignette[..., None]


def _shadow(img: np.ndarray, rows: slice, cols: slice, cover: np.ndarray, dx: int, dy: int, k: float) -> None:
    H, W = img.shape[:2]
    r0, r1, c0, c1 = rows.start + dy, rows.stop + dy, cols.start + dx, cols.stop + dx
    a0, a1, b0, b1 = max(r0, 0), min(r1, H), max(c0, 0), min(c1, W)
    if a1 > a0 and b1 > b0:
        cv = cover[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0]
        img[a0:a1, b0:b1] *= (1 - k * cv)[..., None]


def _sampled(T: int) -> np.ndarray:
    from ..video.io import sample_indices  # the frames a model is shown (a fact about the model, not drawing)

    return sample_indices(T, 25.0, NUM_FRAMES)


def _timing(rng: random.Random, T: int, lo: float = 0.25, hi: float = 0.7) -> int:
    """An event frame at a fraction of the clip with a sampled frame before it and one at or after it."""
    s = _sampled(T)
    for _ in range(100):
        e = int(round(T * rng.uniform(lo, hi)))
        if s[0] < e <= s[-1] and (s < e).any() and (s >= e).any():
            return e
    return int(s[4])


def _spot(rng: random.Random, things: list[Thing], H: int, W: int, r: float, path=(0.0, 0.0)) -> tuple | None:
    """A centre whose disc (and the disc at the end of ``path`` px) keeps clear of every other object."""
    for _ in range(300):
        x = rng.uniform(r + 4 + max(0, -path[0]), W - r - 4 - max(0, path[0]))
        y = rng.uniform(r + 4 + max(0, -path[1]), H - r - 4 - max(0, path[1]))
        ok = True
        for o in things:
            for f in np.linspace(0, 1, 6):
                ox, oy = o.x + o.vx * (o.m1 - o.m0) * f, o.y + o.vy * (o.m1 - o.m0) * f
                for g in np.linspace(0, 1, 6) if path != (0.0, 0.0) else [0.0]:
                    px, py = x + path[0] * g, y + path[1] * g
                    if math.hypot(px - ox, py - oy) < (r + o.r) * 1.5 + 6:
                        ok = False
        if ok:
            return x, y
    return None


def _make(rng: random.Random, kind: str, H: int, W: int, T: int) -> list[Thing] | None:
    things: list[Thing] = []
    short = min(H, W)

    def new(avoid=(), color=None, shape=None, path=(0.0, 0.0)) -> Thing | None:
        for _ in range(20):
            s = shape or rng.choice(SHAPES)
            c = color or rng.choice(COLOR_NAMES)
            if f"{c} {s}" in avoid:
                continue
            r = rng.uniform(0.07, 0.15) * short
            spot = _spot(rng, things, H, W, r, path)
            if spot is None:
                continue
            t = Thing(s, c, spot[0], spot[1], r, aspect=rng.choice([0.5, 0.7, 1.0, 1.4, 2.0]))
            t.point = rng.choice(["up", "down", "left", "right"])
            things.append(t)
            return t
        return None

    if kind == "move":
        way = rng.choice(["left", "right", "up", "down"])
        dist = rng.uniform(0.3, 0.5) * (W if way in ("left", "right") else H)
        m0 = int(T * rng.uniform(0.0, 0.3))
        m1 = int(T * rng.uniform(0.7, 1.0)) - 1
        dx, dy = {"left": (-dist, 0), "right": (dist, 0), "up": (0, -dist), "down": (0, dist)}[way]
        mover = new(path=(dx, dy))
        if mover is None or m1 <= m0:
            return None
        mover.m0, mover.m1, mover.vx, mover.vy = m0, m1, dx / (m1 - m0), dy / (m1 - m0)
        for _ in range(rng.randint(0, 2)):
            new(avoid={mover.name})
    elif kind == "appear":
        for _ in range(rng.randint(1, 3)):
            new()
        used = {t.color for t in things}
        late = new(color=rng.choice([c for c in COLOR_NAMES if c not in used]))
        if late is None:
            return None
        late.born = _timing(rng, T)
    elif kind == "disappear":
        for _ in range(rng.randint(2, 4)):
            new()
        if len(things) < 2:
            return None
        rng.choice(things).gone = _timing(rng, T)
    elif kind == "change":
        first = new()
        if first is None:
            return None
        for _ in range(rng.randint(0, 2)):
            new(shape=rng.choice([s for s in SHAPES if s != first.shape]))
        first.c2, first.turn = rng.choice([c for c in COLOR_NAMES if c != first.color]), _timing(rng, T)
    elif kind == "order":
        for _ in range(rng.randint(0, 2)):
            new()
        names = {t.name for t in things}
        a = new(avoid=names)
        b = new(avoid=names | ({a.name} if a else set()))
        if a is None or b is None:
            return None
        s = _sampled(T)
        a.born = _timing(rng, T, 0.15, 0.45)
        later = [int(f) for f in s if f >= a.born]  # a sampled frame shows a without b
        if len(later) < 2:
            return None
        b.born = rng.randint(later[0] + 1, later[-1])
    else:
        raise ValueError(f"unknown clip kind {kind!r}")
    n_end = sum(t.alive(T - 1) for t in things)
    return things if 1 <= n_end <= 4 else None


def render_clip2(seed: int, kind: str | None = None, index=None) -> Clip2:
    """Clip ``seed`` of this renderer (held-out only); ``index``: frames to draw (default all)."""
    rng = random.Random(f"render2-{seed}")
    T = rng.randint(12, 40)
    W, H = 16 * rng.randint(11, 20), 16 * rng.randint(11, 20)
    kind = kind or rng.choice(["move", "appear", "disappear", "change", "order"])
    for _ in range(60):
        things = _make(rng, kind, H, W, T)
        if things is not None:
            break
    else:
        raise RuntimeError(f"render2: no layout for a {kind} clip, seed {seed}")
    base = _backdrop(rng, H, W)
    shadow = rng.random() < 0.5
    sdx, sdy = rng.randint(2, 5), rng.randint(2, 5)
    grain = rng.uniform(0, 4)
    nrng = np.random.default_rng(rng.getrandbits(32))
    index = np.arange(T) if index is None else np.asarray(index)
    frames, masks = [], []
    for f in index.tolist():
        img = base.copy()
        owner = np.zeros((H, W), np.uint8)
        for i, t in enumerate(things):
            if not t.alive(f):
                continue
            x, y = t.at(f)
            rows, cols, cover = _coverage(t, x, y, H, W)
            if shadow:
                _shadow(img, rows, cols, cover, sdx, sdy, 0.25)
            col = np.array(PALETTE[t.paint(f)], dtype=np.float64)
            img[rows, cols] = img[rows, cols] * (1 - cover[..., None]) + col * cover[..., None]
            owner[rows, cols][cover >= 0.5] = i + 1
        if grain:
            img = img + nrng.normal(0, grain, img.shape)
        frames.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
        masks.append(owner)
    return Clip2(np.stack(frames), index, things, kind, T, rng.choice([6, 10, 15, 25]), np.stack(masks))


def questions2(clip: Clip2, rng: random.Random) -> list[dict]:
    """The clip's questions in :data:`vlm_accel.zoo.clips.QUESTION`'s exact words: ``[{question, answer, type}]``."""
    th, T = clip.things, clip.length
    out = []
    if clip.kind == "move":
        m = next(t for t in th if t.heading())
        out.append({"question": QUESTION["move"].format(c=m.color, s=m.shape), "answer": m.heading(), "type": "move"})
    if clip.kind == "appear":
        a = next(t for t in th if t.born > 0)
        out.append({"question": QUESTION["appear"], "answer": a.color, "type": "appear"})
    if clip.kind == "disappear":
        d = next(t for t in th if t.gone < T)
        out.append({"question": QUESTION["disappear"], "answer": d.shape, "type": "disappear"})
    if clip.kind == "order":
        a, b = sorted((t for t in th if t.born > 0), key=lambda t: t.born)
        p, q = (a, b) if rng.random() < 0.5 else (b, a)
        text = QUESTION["order"].format(c1=p.color, s1=p.shape, c2=q.color, s2=q.shape)
        out.append({"question": text, "answer": a.name, "type": "order"})
    out.append({"question": QUESTION["count"], "answer": str(sum(t.alive(T - 1) for t in th)), "type": "count"})
    shapes = [t.shape for t in th]
    for t in th:
        if shapes.count(t.shape) == 1:
            ans = "yes" if t.turn is not None else "no"
            out.append({"question": QUESTION["change"].format(s=t.shape), "answer": ans, "type": "change"})
    return out


_KIND = {"move": "move", "appear": "appear", "disappear": "disappear", "order": "order"}


def heldout_clips2(n: int = 300, seed: int = 0, types=QTYPES, frames: int | None = NUM_FRAMES) -> Iterator[dict]:
    """``n`` questions on this renderer's clips, balanced over ``types``, as :func:`clips.heldout_clips` yields
    them: ``{frames, question, answer, type, clip, fps}`` (``frames``: the 8 uniformly sampled, or all if None)."""
    rng = random.Random(f"render2-questions-{seed}")
    bal = Balance(n, types)
    others = ["move", "appear", "disappear", "order"]
    for cid in bal.ids(seed):
        t = bal.next_type()
        if t == "change":
            kind = "change" if rng.random() < 0.5 else rng.choice(others)
        else:
            kind = _KIND.get(t) or rng.choice(others + ["change"])
        head = render_clip2(cid, kind, index=[0])
        cands = [q for q in questions2(head, rng) if q["type"] == t]
        if t == "change" and kind == "change":
            cands = [q for q in cands if q["answer"] == "yes"] or cands
        if not cands:
            continue
        q = rng.choice(cands)
        clip = render_clip2(cid, kind, index=None if frames is None else _sampled(head.length))
        bal.take(t)
        yield {
            "frames": clip.frames,
            "question": q["question"],
            "answer": q["answer"],
            "type": t,
            "clip": f"render2-{cid}-{kind}",
            "fps": clip.fps,
        }
