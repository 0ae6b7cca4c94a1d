"""Seeded synthetic clips of moving, appearing, disappearing and colour-changing shapes, with questions.

Every clip is a pure function of ``(split, seed)`` ("train" and "heldout" are disjoint random streams), in the
embedded default model's vocabulary (shapes and colours of :mod:`vlm_accel.zoo.render`). A clip has 16–32 frames
of 224–384 px (square or not) on a plain, noisy, gradient or striped light background, 1–4 shapes of 14–30 % of the
short side, and one event kind:

- ``move``: one shape moves left / right / up / down (starting in the first third, stopping in the last third,
  25–55 % of the frame; the speed varies);
- ``appear`` / ``disappear``: one shape appears / disappears at a frame between a third and two thirds of the clip;
- ``change``: one shape changes colour at such a frame;
- ``order``: two shapes appear at two such frames, with at least one of the 8 uniformly sampled frames between.

Events fall strictly after sampled frames 0–2 and at or before sampled frames 5–7 of the default 8 uniformly
sampled frames (:func:`vlm_accel.video.sample_indices`), so a model that sees those 8 frames sees each event.

Questions (exact forms; answers are correct by construction):

=========  ===================================================  =============================
type       question                                             answer
=========  ===================================================  =============================
move       Which way does the {color} {shape} move?             left / right / up / down
appear     What color is the shape that appears?                a colour
disappear  What shape disappears?                               circle / rectangle / triangle
count      How many shapes are there at the end?                1-4
change     Does the {shape} change color?                       yes / no
order      Which appears first, the {c1} {s1} or the {c2} {s2}?  {color} {shape}
=========  ===================================================  =============================
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .render import (
    COLOR_NAMES,
    COLORS,
    SHAPES,
    Balance,
    background,
    draw_shape,
    grid_labels,
    shade,
)  # the model's vocabulary, the one painter

QTYPES = ("move", "appear", "disappear", "count", "change", "order")
KINDS = ("move", "appear", "disappear", "change", "order")
DIRECTIONS = ("left", "right", "up", "down")
NUM_FRAMES = 8  # frames the model sees by default
GRID = 16  # 224 px / 14 px patches
QUESTION = {
    "move": "Which way does the {c} {s} move?",
    "appear": "What color is the shape that appears?",
    "disappear": "What shape disappears?",
    "count": "How many shapes are there at the end?",
    "change": "Does the {s} change color?",
    "order": "Which appears first, the {c1} {s1} or the {c2} {s2}?",
}


EASE = {  # time profiles of a motion; "in" played backwards is "out" (see EASE_REVERSED)
    "linear": lambda a: a,
    "smooth": lambda a: a * a * (3 - 2 * a),
    "in": lambda a: a * a,
    "out": lambda a: 1 - (1 - a) * (1 - a),
}
EASE_REVERSED = {"linear": "linear", "smooth": "smooth", "in": "out", "out": "in"}


@dataclass
class Track:
    """One shape over the clip. Positions are centres as fractions of width / height, linear between the
    motion's start and end frames; the shape is present on frames ``t_in <= t < t_out``."""

    shape: str
    color: str
    x0: float
    y0: float
    size: float  # fraction of min(W, H)
    x1: float | None = None  # end of motion (None: static)
    y1: float | None = None
    move_from: int = 0
    move_to: int = 0
    t_in: int = 0
    t_out: int = 10**6
    color2: str | None = None  # colour from frame t_change on
    t_change: int | None = None
    ar: float = 1.0  # rectangle aspect
    angle: float = 0.0  # triangle rotation
    jitter: tuple[int, int, int] = (0, 0, 0)
    # the varied split's extras (defaults: the default split's drawing)
    tri: tuple | None = None  # triangle corners in units of half the size (any proportions / orientation)
    squash: float = 1.0  # a circle's height / width
    ease: str = "linear"  # the motion's time profile: linear, smooth, in, out
    wobble: float = 0.0  # the path's sideways bow (fraction of the frame, at mid-motion)
    shade: tuple[int, int, int] | None = None  # fill of the first colour (None: colour + jitter)
    shade2: tuple[int, int, int] | None = None  # fill of the second colour
    outline: float = 0.0  # edge darkness (0: none)
    edge: int = 1  # edge width

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def present(self, t: int) -> bool:
        return self.t_in <= t < self.t_out

    def color_at(self, t: int) -> str:
        return self.color2 if self.t_change is not None and t >= self.t_change else self.color

    def pos(self, t: int) -> tuple[float, float]:
        if self.x1 is None or self.y1 is None:
            return self.x0, self.y0
        span = max(self.move_to - self.move_from, 1)
        a = min(max((t - self.move_from) / span, 0.0), 1.0)
        if self.ease != "linear":
            a = EASE[self.ease](a)
        x, y = self.x0 + a * (self.x1 - self.x0), self.y0 + a * (self.y1 - self.y0)
        if self.wobble:
            bow = self.wobble * math.sin(math.pi * a)
            x, y = (x, y + bow) if abs(self.x1 - self.x0) >= abs(self.y1 - self.y0) else (x + bow, y)
        return x, y

    @property
    def direction(self) -> str | None:
        if self.x1 is None or self.y1 is None:
            return None
        dx, dy = self.x1 - self.x0, self.y1 - self.y0
        if abs(dx) >= abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Clip:
    """A rendered clip: ``frames [T', H, W, 3]`` uint8 (the rendered frame indices ``index``, all T by default),
    the tracks, the event kind and metadata ``{seed, split, num_frames, size, fps, blur, ...}``."""

    frames: np.ndarray
    index: np.ndarray
    tracks: list[Track]
    kind: str
    meta: dict = field(default_factory=dict)
    label_maps: np.ndarray | None = None  # [T', H, W] uint8: track index + 1 covering each pixel (0 background)

    @property
    def num_frames(self) -> int:
        return self.meta["num_frames"]

    def images(self) -> list[Image.Image]:
        return [Image.fromarray(f) for f in self.frames]

    def patch_labels(self, grid: int = GRID, min_cover: float = 0.12) -> np.ndarray:
        """``[T', grid, grid]`` int8: the track covering most of each cell of the frame squashed to 224×224
        (if it covers ≥ ``min_cover`` of the cell), else -1; every visible track owns at least its best cell."""
        n = len(self.tracks)
        out = [
            grid_labels(np.asarray(Image.fromarray(lm).resize((224, 224), Image.NEAREST)), n, grid, min_cover)
            for lm in self.label_maps
        ]
        return np.stack(out)


def sampled(num_frames: int, k: int = NUM_FRAMES) -> np.ndarray:
    """The ``k`` uniformly sampled frame indices a model sees (segment centres, as :func:`video.sample_indices`)."""
    from ..video.io import sample_indices

    return sample_indices(num_frames, 25.0, k)


def _event_range(num_frames: int) -> tuple[int, int]:
    """Frames an event may start on: within [T/3, 2T/3], after sampled frame 2, at or before sampled frame 5."""
    s = sampled(num_frames)
    lo = max(math.ceil(num_frames / 3), int(s[2]) + 1)
    hi = min(math.floor(2 * num_frames / 3), int(s[5]))
    return lo, hi


def _varied_event_range(num_frames: int) -> tuple[int, int]:
    """The varied split's event frames: after sampled frame 1, at or before sampled frame 6."""
    s = sampled(num_frames)
    lo, hi = int(s[1]) + 1, int(s[6])
    return (lo, hi) if lo <= hi else _event_range(num_frames)


def _box(t: Track, w: int, h: int, pad: float = 0.03) -> tuple[float, float, float, float]:
    """Fractional box swept by the track over the clip (with a margin)."""
    sw, sh = t.size * min(w, h) / w / 2, t.size * min(w, h) / h / 2
    xs = [t.x0] + ([t.x1] if t.x1 is not None else [])
    ys = [t.y0] + ([t.y1] if t.y1 is not None else [])
    if t.wobble and t.x1 is not None and t.y1 is not None:  # the bow is across the motion
        if abs(t.x1 - t.x0) >= abs(t.y1 - t.y0):
            ys = ys + [t.y0 + t.wobble]
        else:
            xs = xs + [t.x0 + t.wobble]
    return min(xs) - sw - pad, min(ys) - sh - pad, max(xs) + sw + pad, max(ys) + sh + pad


def _overlaps(a, b) -> bool:
    return not (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1])


@dataclass
class Vary:
    """The varied split's clip-level ranges (issue #32: everything the question forms leave free), drawn per clip."""

    size: tuple[float, float] = (0.08, 0.36)  # shape size, fraction of the short side
    dist: tuple[float, float] = (0.15, 0.6)  # a move's length
    occlude: float = 0.0  # how much of a shape's box another may cover (0: no overlap)

    @classmethod
    def draw(cls, rng: random.Random) -> Vary:
        lo = rng.uniform(0.07, 0.14)
        return cls((lo, rng.uniform(max(lo + 0.06, 0.2), 0.38)), (0.15, 0.6), 0.3 if rng.random() < 0.35 else 0.0)


def _triangle(rng: random.Random) -> tuple:
    """Corners of a triangle of any proportions and orientation, in units of half its size (fits the box)."""
    a0 = rng.uniform(0, 2 * math.pi)
    gaps = [rng.uniform(1.3, 2.6) for _ in range(2)]
    gaps.append(2 * math.pi - sum(gaps))
    if gaps[2] < 1.0:
        gaps = [2 * math.pi / 3] * 3
    angles = [a0, a0 + gaps[0], a0 + gaps[0] + gaps[1]]
    pts = [
        (r * math.cos(a), r * math.sin(a))
        for a, r in zip(angles, [rng.uniform(0.75, 1.15) for _ in range(3)], strict=True)
    ]
    cx, cy = sum(p[0] for p in pts) / 3, sum(p[1] for p in pts) / 3
    pts = [(x - cx, y - cy) for x, y in pts]
    m = max(max(abs(x), abs(y)) for x, y in pts)
    return tuple((round(x / m, 4), round(y / m, 4)) for x, y in pts)


def _covered(a, b) -> float:
    """Share of box ``a``'s area inside box ``b``."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy / max((a[2] - a[0]) * (a[3] - a[1]), 1e-9)


def _fits(t: Track, tracks: list[Track], w: int, h: int, v: Vary | None) -> bool:
    b = _box(t, w, h)
    if v is None or not v.occlude:
        return all(not _overlaps(b, _box(o, w, h)) for o in tracks)
    own = _box(t, w, h, pad=0.0)  # partial occlusion: each shape keeps most of its box uncovered
    return all(
        _covered(own, _box(o, w, h, 0.0)) <= v.occlude and _covered(_box(o, w, h, 0.0), b) <= v.occlude for o in tracks
    )


def _place(
    rng: random.Random,
    w: int,
    h: int,
    tracks: list[Track],
    shape: str,
    color: str,
    move: str | None = None,
    v: Vary | None = None,
):
    """A new track (static, or moving in direction ``move``) whose swept box overlaps no other (``v``: the varied
    split's ranges, partial overlaps allowed); None if no room."""
    for _ in range(200):
        size = rng.uniform(0.14, 0.3) if v is None else rng.uniform(*v.size)
        sw, sh = size * min(w, h) / w / 2, size * min(w, h) / h / 2
        if v is None:
            t = Track(shape, color, 0.0, 0.0, size, ar=rng.uniform(0.6, 1.6), angle=rng.uniform(0, 2 * math.pi))
        else:
            t = Track(shape, color, 0.0, 0.0, size, ar=math.exp(rng.uniform(-1.05, 1.05)), angle=0.0)
            t.tri = _triangle(rng) if shape == "triangle" else None
            t.squash = rng.uniform(0.85, 1.18) if shape == "circle" and rng.random() < 0.5 else 1.0
        if move is None:
            t.x0, t.y0 = rng.uniform(sw + 0.02, 1 - sw - 0.02), rng.uniform(sh + 0.02, 1 - sh - 0.02)
        else:
            dist = rng.uniform(0.25, 0.55) if v is None else rng.uniform(*v.dist)
            horiz = move in ("left", "right")
            half = sw if horiz else sh
            if dist > 1 - 2 * half - 0.04:
                continue
            start = rng.uniform(half + 0.02, 1 - half - 0.02 - dist)
            end = start + dist
            if move in ("left", "up"):
                start, end = end, start
            other = rng.uniform((sh if horiz else sw) + 0.02, 1 - (sh if horiz else sw) - 0.02)
            t.x0, t.y0, t.x1, t.y1 = (start, other, end, other) if horiz else (other, start, other, end)
            if v is not None:
                t.ease = rng.choice(list(EASE))
                room = min(other - (sh if horiz else sw), 1 - other - (sh if horiz else sw)) - 0.02
                t.wobble = rng.uniform(-1, 1) * min(0.06, max(room, 0.0)) if rng.random() < 0.4 else 0.0
        if _fits(t, tracks, w, h, v):
            return t
    return None


def _draw(draw: ImageDraw.ImageDraw, t: Track, frame: int, w: int, h: int, fill, scale: int = 1) -> None:
    cx, cy = t.pos(frame)
    half = t.size * min(w, h) / 2
    if t.tri is None and t.squash == 1.0 and not t.outline and scale == 1:  # the default split
        draw_shape(draw, t.shape, cx * w, cy * h, half, fill, t.ar, t.angle)
        return
    edge = None
    if t.outline:
        edge = fill if isinstance(fill, int) else tuple(int(c * (1 - t.outline)) for c in fill)
    k = scale
    draw_shape(draw, t.shape, cx * w * k, cy * h * k, half * k, fill, t.ar, t.angle, t.tri, t.squash, edge, t.edge * k)


def _scenario(rng: random.Random, kind: str, w: int, h: int, T: int, v: Vary | None = None) -> list[Track] | None:
    lo, hi = _event_range(T) if v is None else _varied_event_range(T)
    tracks: list[Track] = []

    def n_others(default: list[int], varied: list[int]) -> int:
        return rng.choice(default if v is None else varied)

    def add(shape=None, color=None, move=None, avoid_names=(), avoid_colors=(), avoid_shapes=()):
        for _ in range(30):
            s = shape or rng.choice([x for x in SHAPES if x not in avoid_shapes] or SHAPES)
            c = color or rng.choice([x for x in COLOR_NAMES if x not in avoid_colors])
            if f"{c} {s}" in avoid_names:
                continue
            t = _place(rng, w, h, tracks, s, c, move, v)
            if t is not None:
                t.jitter = tuple(rng.randint(-12, 12) for _ in range(3))
                tracks.append(t)
                return t
        return None

    if kind == "move":
        mover = add(move=rng.choice(DIRECTIONS))
        if mover is None:
            return None
        if v is None:
            mover.move_from = rng.randint(0, math.floor(T / 3))
            mover.move_to = rng.randint(math.ceil(2 * T / 3), T - 1)
        else:  # any speed: from a quarter of the clip to all of it
            mover.move_from = rng.randint(0, max(0, T // 2 - 1))
            mover.move_to = rng.randint(min(T - 1, max(mover.move_from + T // 4, T // 2)), T - 1)
        for _ in range(n_others([0, 1, 1, 2], [0, 1, 2, 3])):
            add(avoid_names=(mover.name,))
    elif kind == "appear":
        for _ in range(n_others([1, 1, 2, 3], [0, 1, 2, 3])):
            add()
        new = add(avoid_colors={t.color for t in tracks})
        if new is None:
            return None
        new.t_in = rng.randint(lo, hi)
    elif kind == "disappear":
        for _ in range(n_others([2, 2, 3, 4], [2, 3, 4, 5])):
            add()
        if len(tracks) < 2:
            return None
        rng.choice(tracks).t_out = rng.randint(lo, hi)
    elif kind == "change":
        changer = add()
        if changer is None:
            return None
        for _ in range(n_others([0, 1, 1, 2], [0, 1, 2, 3])):
            add(avoid_shapes=(changer.shape,))
        changer.color2 = rng.choice([c for c in COLOR_NAMES if c != changer.color])
        changer.t_change = rng.randint(lo, hi)
    elif kind == "order":
        for _ in range(n_others([0, 1, 1, 2], [0, 1, 2])):
            add()
        names = {t.name for t in tracks}
        a = add(avoid_names=names)
        b = add(avoid_names=names | ({a.name} if a else set()))
        if a is None or b is None:
            return None
        s = sampled(T)
        mids = [int(x) for x in s if lo <= x < hi]  # a sampled frame m with t1 <= m < t2
        if not mids:
            return None
        m = rng.choice(mids)
        a.t_in = rng.randint(lo, m)
        b.t_in = rng.randint(m + 1, hi)
    else:
        raise ValueError(f"unknown clip kind {kind!r}; expected one of {KINDS}")
    if any(t is None for t in tracks) or not tracks:
        return None
    return tracks


def render_clip(seed: int, split: str = "train", kind: str | None = None, index=None, vary: bool = False) -> Clip:
    """Render clip ``seed`` of ``split`` ("train" / "heldout"); deterministic.

    Args:
        kind: force the event kind (default: drawn from the seed).
        index: which frames to render (default all ``T``; e.g. ``sampled(T)`` for the 8 a model sees — the
            clip's content does not depend on it).
        vary: the varied split (issue #32; its own random stream, disjoint from the default one): 10–48 frames of
            160–448 px, shapes of 7–38 % of the short side, any rectangle aspect, triangles of any proportions and
            orientation, slightly elliptic circles, shades of each colour, outlines, more backgrounds and textures,
            noise, blur, anti-aliasing, moves of any speed / length / time profile with a sideways bow, events
            anywhere between sampled frames 1 and 6, 0–5 other shapes, partial occlusion.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if vary:
        return _render_varied(seed, split, kind, index)
    rng = random.Random(f"clip-{split}-{seed}")
    T = rng.randint(16, 32)
    if rng.random() < 0.5:
        w = h = rng.randint(224, 384)
    else:
        w, h = rng.randint(224, 384), rng.randint(224, 384)
    kind = kind or rng.choice(KINDS)
    tracks = _layout(rng, kind, w, h, T, seed)
    bg = background(rng, w, h)
    blur = rng.uniform(0.3, 0.8) if rng.random() < 0.2 else 0.0
    fps = rng.choice([8, 10, 12, 15])
    index = np.arange(T) if index is None else np.asarray(index)
    frames, maps = [], []
    for f in index.tolist():
        img = bg.copy()
        lab = Image.new("L", (w, h), 0)
        d, ld = ImageDraw.Draw(img), ImageDraw.Draw(lab)
        for i, t in enumerate(tracks):
            if not t.present(f):
                continue
            base = COLORS[t.color_at(f)]
            fill = tuple(int(min(255, max(0, c + j))) for c, j in zip(base, t.jitter, strict=True))
            _draw(d, t, f, w, h, fill)
            _draw(ld, t, f, w, h, i + 1)
        if blur:
            img = img.filter(ImageFilter.GaussianBlur(blur))
        frames.append(np.asarray(img))
        maps.append(np.asarray(lab))
    meta = {"seed": seed, "split": split, "num_frames": T, "size": (w, h), "fps": fps, "blur": blur}
    return Clip(np.stack(frames), index, tracks, kind, meta, np.stack(maps))


def _layout(rng: random.Random, kind: str, w: int, h: int, T: int, seed: int, v: Vary | None = None) -> list[Track]:
    for _attempt in range(50):
        tracks = _scenario(rng, kind, w, h, T, v)
        if tracks is not None and 1 <= sum(t.present(T - 1) for t in tracks) <= 4:
            return tracks
    raise RuntimeError(f"could not lay out a {kind} clip for seed {seed}")


def _render_varied(seed: int, split: str, kind: str | None, index) -> Clip:
    rng = random.Random(f"clip-{split}-vary-{seed}")
    T = rng.randint(10, 48)
    w = rng.randint(160, 448)
    h = w if rng.random() < 0.4 else min(448, max(160, int(w / rng.uniform(0.55, 1.8))))
    kind = kind or rng.choice(KINDS)
    tracks = _layout(rng, kind, w, h, T, seed, Vary.draw(rng))
    outline = rng.random() < 0.25
    for t in tracks:
        t.shade = shade(rng, t.color)
        t.shade2 = shade(rng, t.color2) if t.color2 else None
        if outline:
            t.outline, t.edge = rng.uniform(0.3, 0.75), rng.randint(1, 3)
    bg = background(rng, w, h, vary=True)
    blur = rng.uniform(0.3, 1.5) if rng.random() < 0.35 else 0.0
    noise = rng.uniform(2, 7) if rng.random() < 0.4 else 0.0
    aa = 2 if rng.random() < 0.3 else 1  # anti-aliased edges: drawn at twice the size, then reduced
    fps = rng.choice([5, 6, 8, 10, 12, 15, 24, 30])
    nseed = rng.getrandbits(32)
    index = np.arange(T) if index is None else np.asarray(index)
    frames, maps = [], []
    for f in index.tolist():
        img = bg.resize((w * aa, h * aa), Image.NEAREST) if aa > 1 else bg.copy()
        lab = Image.new("L", (w, h), 0)
        d, ld = ImageDraw.Draw(img), ImageDraw.Draw(lab)
        for i, t in enumerate(tracks):
            if t.present(f):
                changed = t.t_change is not None and f >= t.t_change
                _draw(d, t, f, w, h, t.shade2 if changed else t.shade, aa)
                _draw(ld, t, f, w, h, i + 1)
        if aa > 1:
            img = img.resize((w, h), Image.BOX)
        if blur:
            img = img.filter(ImageFilter.GaussianBlur(blur))
        arr = np.asarray(img)
        if noise:  # per frame (a fresh draw each frame, as a camera's), seeded by the clip and the frame
            nz = np.random.default_rng([nseed, f]).normal(0, noise, size=arr.shape)
            arr = np.clip(arr + nz, 0, 255).astype(np.uint8)
        frames.append(arr)
        maps.append(np.asarray(lab))
    meta = {"seed": seed, "split": split, "vary": True, "num_frames": T, "size": (w, h), "fps": fps, "blur": blur}
    meta.update(noise=noise, aa=aa)
    return Clip(np.stack(frames), index, tracks, kind, meta, np.stack(maps))


def count_at_end(tracks: list[Track], num_frames: int) -> int:
    return sum(t.present(num_frames - 1) for t in tracks)


def clip_questions(
    clip_or_tracks, rng: random.Random, num_frames: int | None = None, kind: str | None = None, extra: bool = False
):
    """Every question the clip supports: ``[{question, answer, type, objs}]`` (``objs``: indices of the tracks the
    question is about, for training-time supervision). Works on a :class:`Clip` or on ``(tracks, T, kind)``.

    ``extra`` adds training-only questions (types ``x_*``): the other order of an ``order`` question, "How many
    shapes are there at the start?", "What color is the <shape> at the end?", "What shape appears?", "What color
    is the shape that disappears?"."""
    if isinstance(clip_or_tracks, Clip):
        tracks, T, kind = clip_or_tracks.tracks, clip_or_tracks.num_frames, clip_or_tracks.kind
    else:
        tracks, T = clip_or_tracks, num_frames
    shapes = [t.shape for t in tracks]
    out = []
    if kind == "move":
        i = next(k for k, t in enumerate(tracks) if t.direction is not None)
        t = tracks[i]
        q = QUESTION["move"].format(c=t.color, s=t.shape)
        out.append({"question": q, "answer": t.direction, "type": "move", "objs": [i]})
    if kind == "appear":
        i = next(k for k, t in enumerate(tracks) if t.t_in > 0)
        out.append({"question": QUESTION["appear"], "answer": tracks[i].color, "type": "appear", "objs": [i]})
    if kind == "disappear":
        i = next(k for k, t in enumerate(tracks) if t.t_out < T)
        out.append({"question": QUESTION["disappear"], "answer": tracks[i].shape, "type": "disappear", "objs": [i]})
    if kind == "order":
        a, b = sorted((k for k, t in enumerate(tracks) if t.t_in > 0), key=lambda k: tracks[k].t_in)
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        q = QUESTION["order"].format(
            c1=tracks[first].color, s1=tracks[first].shape, c2=tracks[second].color, s2=tracks[second].shape
        )
        out.append({"question": q, "answer": tracks[a].name, "type": "order", "objs": [a, b]})
    out.append({"question": QUESTION["count"], "answer": str(count_at_end(tracks, T)), "type": "count", "objs": []})
    if extra:
        out += _extra_questions(tracks, T, kind, out)
    for i, t in enumerate(tracks):  # "does the <shape> change colour": only shapes unique in the clip
        if shapes.count(t.shape) == 1:
            ans = "yes" if t.t_change is not None else "no"
            out.append({"question": QUESTION["change"].format(s=t.shape), "answer": ans, "type": "change", "objs": [i]})
    return out


def _extra_questions(tracks: list[Track], T: int, kind: str, asked: list[dict]) -> list[dict]:
    shapes = [t.shape for t in tracks]
    out = []
    n0 = sum(t.present(0) for t in tracks)
    out.append(
        {"question": "How many shapes are there at the start?", "answer": str(n0), "type": "x_count_start", "objs": []}
    )
    for i, t in enumerate(tracks):
        if shapes.count(t.shape) == 1 and t.present(T - 1):
            q = f"What color is the {t.shape} at the end?"
            out.append({"question": q, "answer": t.color_at(T - 1), "type": "x_color_end", "objs": [i]})
    if kind == "appear":
        i = next(k for k, t in enumerate(tracks) if t.t_in > 0)
        out.append(
            {"question": "What shape appears?", "answer": tracks[i].shape, "type": "x_appear_shape", "objs": [i]}
        )
    if kind == "disappear":
        i = next(k for k, t in enumerate(tracks) if t.t_out < T)
        q = "What color is the shape that disappears?"
        out.append({"question": q, "answer": tracks[i].color, "type": "x_disappear_color", "objs": [i]})
    if kind == "order":
        q0 = next(q for q in asked if q["type"] == "order")
        a, b = q0["objs"]
        first, second = (
            (b, a) if q0["question"].index(tracks[a].name) < q0["question"].index(tracks[b].name) else (a, b)
        )
        q = QUESTION["order"].format(
            c1=tracks[first].color, s1=tracks[first].shape, c2=tracks[second].color, s2=tracks[second].shape
        )
        out.append({"question": q, "answer": q0["answer"], "type": "x_order", "objs": [a, b]})
    return out


_KIND_FOR = {"move": "move", "appear": "appear", "disappear": "disappear", "order": "order"}


def heldout_clips(
    n: int = 300, seed: int = 0, types=QTYPES, frames: int | None = NUM_FRAMES, vary: bool = False
) -> Iterator[dict]:
    """``n`` held-out clip questions balanced over ``types``: ``{frames [k, H, W, 3], question, answer, type,
    clip}`` where ``frames`` are the ``frames`` uniformly sampled frames (all frames if None); deterministic.
    ``vary``: clips of the varied split (:func:`render_clip`), held out as well (a different stream)."""
    rng = random.Random(f"heldout-clip-questions-{seed}")
    bal = Balance(n, types)
    for cid in bal.ids(seed):
        t = bal.next_type()
        if t == "change":  # half "yes" (a change clip), half "no" (any other kind)
            kind = "change" if rng.random() < 0.5 else rng.choice([k for k in KINDS if k != "change"])
        else:
            kind = _KIND_FOR.get(t) or rng.choice(KINDS)
        layout = render_clip(cid, "heldout", kind=kind, index=[0], vary=vary)
        T = layout.num_frames
        cands = [q for q in clip_questions(layout, rng) if q["type"] == t]
        if t == "change" and kind == "change":
            cands = [q for q in cands if q["answer"] == "yes"] or cands
        if not cands:
            continue
        q = rng.choice(cands)
        clip = render_clip(cid, "heldout", kind=kind, index=None if frames is None else sampled(T, frames), vary=vary)
        bal.take(t)
        yield {
            "frames": clip.frames,
            "question": q["question"],
            "answer": q["answer"],
            "type": t,
            "clip": f"heldout{'-vary' if vary else ''}-{cid}-{kind}",
            "fps": clip.meta["fps"],
        }


def write_video(path: str | Path, frames: np.ndarray, fps: int = 10) -> Path:
    """Write ``frames [T, H, W, 3]`` uint8 as an MPEG-4 file (sizes rounded down to even for yuv420p)."""
    import av

    path = Path(path)
    h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = h, w
        stream.pix_fmt, stream.bit_rate = "yuv420p", 4_000_000
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f[:h, :w]), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_heldout_clips(out_dir: str | Path, n: int = 60, seed: int = 0) -> Path:
    """Write ``n`` held-out clips (all their frames, each at its own length and rate) as MP4 +
    ``questions.jsonl`` (``{video, question, answer, type}``), balanced over :data:`QTYPES`; returns the JSONL
    path. Readers sample the frames (8 uniformly by default)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, item in enumerate(heldout_clips(n, seed, frames=None)):
        name = f"clip_{i:04d}.mp4"
        write_video(out / name, item["frames"], item["fps"])
        records.append({"video": name, "question": item["question"], "answer": item["answer"], "type": item["type"]})
    path = out / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------------- legacy (pre-#15)
_LEGACY_TRIANGLE = ((0.0, -1.0), (-1.0, 1.0), (1.0, 1.0))  # upright, apex at the top of the 2r box


def _draw_legacy(img: Image.Image, shape: str, color: str, cx: float, cy: float, r: float) -> None:
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, COLORS[color], tri=_LEGACY_TRIANGLE)


def shape_clip(seed: int, frames: int = 8, size: int = 224) -> dict:
    """Legacy two-type clip (see :func:`render_clip` for the full renderer). One clip: ``{frames [T, H, W, 3]
    uint8, question, answer, type}``; ``type`` is ``"move"`` (which way does
    the <color> <shape> move? left/right) or ``"appear"`` (what colour is the shape that appears?)."""
    rng = random.Random(f"synthetic-clip-{seed}")
    kind = rng.choice(["move", "appear"])
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    bg = tuple(rng.randint(215, 250) for _ in range(3))
    r = size * rng.uniform(0.08, 0.14)
    cy = size * rng.uniform(0.3, 0.7)
    out = []
    if kind == "move":
        direction = rng.choice(["left", "right"])
        xs = np.linspace(0.2, 0.8, frames) * size
        xs = xs if direction == "right" else xs[::-1]
        for x in xs:
            img = background(None, size, size, color=bg)
            _draw_legacy(img, shape, color, float(x), cy, r)
            out.append(np.asarray(img))
        question, answer = f"Which way does the {color} {shape} move?", direction
    else:
        other_shape, other_color = rng.choice(SHAPES), rng.choice([c for c in COLORS if c != color])
        x_static, x_new = (0.3 * size, 0.7 * size) if rng.random() < 0.5 else (0.7 * size, 0.3 * size)
        for t in range(frames):
            img = background(None, size, size, color=bg)
            _draw_legacy(img, other_shape, other_color, x_static, cy, r)
            if t >= frames // 2:
                _draw_legacy(img, shape, color, x_new, size - cy, r)
            out.append(np.asarray(img))
        question, answer = "What color is the shape that appears?", color
    return {"frames": np.stack(out), "question": question, "answer": answer, "type": kind}


def write_clips(out_dir: str | Path, n: int = 50, seed: int = 0, frames: int = 8, fps: int = 4) -> Path:
    """Legacy (kept for existing callers): write ``n`` :func:`shape_clip` clips as MP4 and ``questions.jsonl``
    (``{video, question, answer, type}``); returns the JSONL (:func:`write_heldout_clips` writes the full set)."""
    import av

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        clip = shape_clip(seed * 100_003 + i, frames)
        name = f"clip_{i:04d}.mp4"
        with av.open(str(out / name), "w") as container:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.height, stream.width = clip["frames"].shape[1:3]
            stream.pix_fmt, stream.bit_rate = "yuv420p", 2_000_000
            for f in clip["frames"]:
                for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        records.append({"video": name, "question": clip["question"], "answer": clip["answer"], "type": clip["type"]})
    path = out / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
