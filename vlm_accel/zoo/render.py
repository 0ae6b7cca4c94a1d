"""Seeded scene renderer and question generator for the embedded default VLM.

A scene is 1-4 non-overlapping shapes (circle, rectangle, triangle) in 8 colours on a plain or lightly textured
light background; source images are 224-448 px on a side. Every scene is a pure function of ``(split, seed, index)``,
so the training split and the held-out split are disjoint random streams and need no files on disk.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "rectangle", "triangle")
COLORS = {
    "red": (215, 35, 35),
    "green": (40, 165, 50),
    "blue": (35, 70, 215),
    "yellow": (240, 205, 25),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (135, 80, 35),
}
COLOR_NAMES = tuple(COLORS)
QTYPES = ("shape", "color", "exists", "count", "side")
SPLITS = {"train": 0, "heldout": 1}
GRID = 16  # 224 px / 14 px patches
SIDE_MARGIN = (
    0.08  # objects whose centre is closer than this (fraction of width) to the middle get no left/right question
)

_NUM_WORDS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_SYNONYMS = {"grey": "gray", "square": "rectangle", "colour": "color", "true": "yes", "false": "no"}


def normalize_answer(s: str) -> str:
    """Normalise an answer for exact-match scoring: lower case, no punctuation or articles, number words → digits.

    >>> normalize_answer(" Two. ")
    '2'
    """
    s = s.lower().strip()
    s = re.sub(r"[^\w\s]", " ", s)
    words = [w for w in s.split() if w not in ("a", "an", "the")]
    words = [_NUM_WORDS.get(w, w) for w in words]
    words = [_SYNONYMS.get(w, w) for w in words]
    return " ".join(words)


@dataclass
class Obj:
    shape: str
    color: str
    cx: float  # centre, fraction of width
    cy: float  # centre, fraction of height
    size: float  # bounding size, fraction of min(W, H)

    @property
    def side(self) -> str:
        return "left" if self.cx < 0.5 else "right"

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    image: Image.Image
    objects: list[Obj]
    patch_labels: np.ndarray  # (16, 16) int8: index into objects, -1 for background
    meta: dict = field(default_factory=dict)


def background(
    rng: random.Random | None, w: int, h: int, color: tuple[int, int, int] | None = None, vary: bool = False
) -> Image.Image:
    """The one background painter of the renderers (scenes and clips): a light plain, noisy, gradient or faintly
    striped ``w``×``h`` image drawn from ``rng``; or, with ``color``, that plain colour (no random draws).

    ``vary`` (training only, the varied split of issue #32): wider shades and more textures — tinted or darker
    bases, stronger noise, 2-D gradients, stripes at any angle, checkers, blotches, dots."""
    if color is not None:
        return Image.new("RGB", (w, h), tuple(int(c) for c in color))
    assert rng is not None
    if vary:
        return _varied_background(rng, w, h)
    base = np.array([rng.randint(205, 255) for _ in range(3)], dtype=np.float32)
    kind = rng.random()
    if kind < 0.45:  # plain
        arr = np.broadcast_to(base, (h, w, 3)).copy()
    elif kind < 0.65:  # fine noise
        nrng = np.random.default_rng(rng.getrandbits(32))
        arr = base + nrng.normal(0, rng.uniform(3, 9), size=(h, w, 1))
    elif kind < 0.85:  # gentle gradient
        other = np.array([rng.randint(205, 255) for _ in range(3)], dtype=np.float32)
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        t = t[None, :, None] if t.shape[0] == w else t[:, None, None]
        arr = base * (1 - t) + other * t
        arr = np.broadcast_to(arr, (h, w, 3)).copy()
    else:  # faint stripes / grid
        arr = np.broadcast_to(base, (h, w, 3)).copy()
        period = rng.randint(10, 30)
        delta = rng.uniform(6, 14)
        yy, xx = np.mgrid[0:h, 0:w]
        mask = (xx % period < 2) | ((yy % period < 2) & (rng.random() < 0.5))
        arr[mask] -= delta
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


_background = background  # the name clips and older callers used


def _varied_background(rng: random.Random, w: int, h: int) -> Image.Image:
    lo = rng.choice([150, 175, 195, 205, 215])
    base = np.array([rng.randint(lo, 255) for _ in range(3)], dtype=np.float32)
    nrng = np.random.default_rng(rng.getrandbits(32))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.choice(["plain", "noise", "gradient", "stripes", "checker", "blotches", "dots"])
    arr = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    if kind == "noise":
        arr = arr + nrng.normal(0, rng.uniform(3, 14), size=(h, w, 1 if rng.random() < 0.7 else 3))
    elif kind == "gradient":  # bilinear between four corner colours
        c = np.array([[rng.randint(lo, 255) for _ in range(3)] for _ in range(4)], dtype=np.float32)
        u, v = (xx / max(w - 1, 1))[..., None], (yy / max(h - 1, 1))[..., None]
        arr = (1 - u) * (1 - v) * c[0] + u * (1 - v) * c[1] + (1 - u) * v * c[2] + u * v * c[3]
    elif kind == "stripes":
        a = rng.uniform(0, math.pi)
        period, thick = rng.uniform(8, 40), rng.uniform(0.1, 0.5)
        m = ((xx * math.cos(a) + yy * math.sin(a)) % period) < thick * period
        arr = arr - m[..., None] * rng.uniform(5, 22)
    elif kind == "checker":
        cell = rng.randint(8, 48)
        m = ((xx // cell + yy // cell) % 2).astype(bool)
        arr = arr - m[..., None] * rng.uniform(5, 20)
    elif kind == "blotches":  # low-frequency noise: a coarse random grid, upsampled smoothly
        g = nrng.normal(0, rng.uniform(6, 16), size=(rng.randint(3, 8), rng.randint(3, 8), 3)).astype(np.float32)
        up = np.stack([np.asarray(Image.fromarray(g[..., k]).resize((w, h), Image.BICUBIC)) for k in range(3)], -1)
        arr = arr + up
    elif kind == "dots":
        arr = arr.copy()
        for _ in range(rng.randint(20, 120)):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1, 3.5)
            arr[(xx - x) ** 2 + (yy - y) ** 2 < r * r] -= rng.uniform(10, 35)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def shade(rng: random.Random, color: str, spread: float = 1.0) -> tuple[int, int, int]:
    """A random shade of ``color`` (brightness and per-channel jitter) that is still nearest (L1) to it among
    :data:`COLORS`, by a margin: the varied split's colours (``spread`` scales the variation)."""
    base = np.array(COLORS[color], dtype=np.float32)
    for _ in range(50):
        rgb = np.clip(
            base * rng.uniform(1 - 0.14 * spread, 1 + 0.1 * spread) + [rng.uniform(-18, 18) * spread for _ in range(3)],
            0,
            255,
        )
        d = {c: np.abs(np.array(v) - rgb).sum() for c, v in COLORS.items()}
        others = min(v for c, v in d.items() if c != color)
        if d[color] + 45 <= others:
            return tuple(int(round(x)) for x in rgb)
    return COLORS[color]


def triangle_points(
    cx: float, cy: float, half: float, angle: float = 0.0, tri: tuple | None = None
) -> list[tuple[float, float]]:
    """A triangle's corners (pixels) for a shape of half-size ``half`` centred at ``(cx, cy)``.

    Default: equilateral, circumradius ``1.1·half`` about a centre ``0.15·half`` below ``(cx, cy)``, rotated by
    ``angle``. ``tri``: three corner offsets in units of ``half`` (any proportions and orientation), instead."""
    if tri is not None:
        return [(cx + half * u, cy + half * v) for u, v in tri]
    r = half * 1.1
    cy += half * 0.15
    return [
        (cx + r * math.cos(angle + k * 2 * math.pi / 3), cy + r * math.sin(angle + k * 2 * math.pi / 3))
        for k in range(3)
    ]


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    half: float,
    fill,
    ar: float = 1.0,
    angle: float = 0.0,
    tri: tuple | None = None,
    squash: float = 1.0,
    outline=None,
    width: int = 1,
) -> None:
    """The one shape painter of the renderers: a circle, a rectangle of aspect ``ar`` (height / width, within a
    ``2·half`` box) or a triangle (:func:`triangle_points`), centred at ``(cx, cy)`` pixels, ``half`` = half the
    bounding size. ``squash`` ≠ 1 draws the circle slightly elliptic (height / width; ``ar`` is the rectangle's
    only); ``outline`` / ``width``: an edge in another colour."""
    if shape == "circle":
        hw, hh = (half, half) if squash == 1.0 else ((half, half * squash) if squash <= 1 else (half / squash, half))
        draw.ellipse([cx - hw, cy - hh, cx + hw, cy + hh], fill=fill, outline=outline, width=width)
    elif shape == "rectangle":
        hw, hh = (half, half * ar) if ar <= 1 else (half / ar, half)
        draw.rectangle([cx - hw, cy - hh, cx + hw, cy + hh], fill=fill, outline=outline, width=width)
    elif shape == "triangle":
        draw.polygon(triangle_points(cx, cy, half, angle, tri), fill=fill, outline=outline, width=width)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def grid_labels(label_map: np.ndarray, n_objects: int, grid: int = 16, min_cover: float = 0.12) -> np.ndarray:
    """``[grid, grid]`` int8 object index (-1 none) per cell of a 224×224 label map (``index + 1`` per pixel)."""
    c = 224 // grid
    lab = label_map.astype(np.int64).reshape(grid, c, grid, c).transpose(0, 2, 1, 3).reshape(grid, grid, c * c)
    counts = np.stack([(lab == k).sum(-1) for k in range(n_objects + 1)], -1)
    counts[..., 0] = 0
    best = counts.argmax(-1)
    patch = np.where(counts.max(-1) >= min_cover * c * c, best - 1, -1).astype(np.int8)
    for i in range(n_objects):
        if counts[..., i + 1].max() > 0 and not (patch == i).any():
            r, cc = np.unravel_index(counts[..., i + 1].argmax(), (grid, grid))
            patch[r, cc] = i
    return patch


def render_scene(seed: int, split: str = "train", n_objects: int | None = None) -> Scene:
    """Render scene number ``seed`` of ``split`` ("train" or "heldout"); deterministic.

    Returns a :class:`Scene` with the PIL image (W, H in [224, 448]), the objects and a (16, 16) patch label grid
    (which object covers most of each 14-px patch after resizing to 224×224; -1 = background).
    """
    rng = random.Random(f"{split}-{seed}")
    if rng.random() < 0.5:
        w = h = rng.randint(224, 448)
    else:
        w, h = rng.randint(224, 448), rng.randint(224, 448)
        if max(w, h) / min(w, h) > 1.4:
            h = int(w / rng.uniform(0.75, 1.33))
            h = min(max(h, 224), 448)
    n = n_objects or rng.choices([1, 2, 3, 4], weights=[0.22, 0.26, 0.26, 0.26])[0]
    objs: list[Obj] = []
    boxes: list[tuple[float, float, float, float]] = []
    tries = 0
    while len(objs) < n and tries < 400:
        tries += 1
        if rng.random() < 0.3:
            size = rng.uniform(0.07, 0.13)  # small shapes: one to four patches
        else:
            size = rng.uniform(0.13, 0.38 if n <= 2 else 0.3)
        sw, sh = size * min(w, h) / w, size * min(w, h) / h  # fractions
        cx = rng.uniform(sw / 2 + 0.01, 1 - sw / 2 - 0.01)
        cy = rng.uniform(sh / 2 + 0.01, 1 - sh / 2 - 0.01)
        box = (cx - sw / 2 - 0.02, cy - sh / 2 - 0.02, cx + sw / 2 + 0.02, cy + sh / 2 + 0.02)
        if any(not (box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1]) for b in boxes):
            continue
        o = Obj(rng.choice(SHAPES), rng.choice(COLOR_NAMES), cx, cy, size)
        o.meta_ar = rng.uniform(0.5, 2.0)  # type: ignore[attr-defined]
        o.meta_angle = rng.uniform(0, 2 * math.pi)  # type: ignore[attr-defined]
        objs.append(o)
        boxes.append(box)
    img = background(rng, w, h)
    draw = ImageDraw.Draw(img)
    label = Image.new("L", (w, h), 0)
    ldraw = ImageDraw.Draw(label)
    for i, o in enumerate(objs):
        base = COLORS[o.color]
        fill = tuple(int(min(255, max(0, c + rng.randint(-14, 14)))) for c in base)
        for d, f in ((draw, fill), (ldraw, i + 1)):
            draw_shape(d, o.shape, o.cx * w, o.cy * h, o.size * min(w, h) / 2, f, o.meta_ar, o.meta_angle)  # type: ignore[attr-defined]
    if rng.random() < 0.2:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    # patch labels on the 224×224 resized view: majority object per patch if it covers >= 12 % of the patch
    lab = np.array(label.resize((GRID * 14, GRID * 14), Image.NEAREST), dtype=np.int64)
    lab = lab.reshape(GRID, 14, GRID, 14).transpose(0, 2, 1, 3).reshape(GRID, GRID, 196)
    counts = np.stack([(lab == k).sum(-1) for k in range(len(objs) + 1)], -1)  # (16, 16, n+1)
    counts[..., 0] = 0
    best = counts.argmax(-1)
    patch = np.where(counts.max(-1) >= 0.12 * 196, best - 1, -1).astype(np.int8)
    # make sure every object owns at least its best patch (tiny shapes)
    for i in range(len(objs)):
        if not (patch == i).any():
            r, c = np.unravel_index(counts[..., i + 1].argmax(), (GRID, GRID))
            patch[r, c] = i
    meta = {"seed": seed, "split": split, "size": (w, h), "label_map": np.asarray(label)}  # index + 1 per pixel
    return Scene(img, objs, patch, meta)


_Q = {
    "shape": [
        "What shape is in the image?",
        "What shape is this?",
        "Which shape is shown?",
        "What is the shape in the picture?",
    ],
    "color": [
        "What color is the {s}?",
        "What colour is the {s}?",
        "Which color is the {s}?",
        "What is the color of the {s}?",
    ],
    "exists": ["Is there a {c} {s}?", "Is there a {c} {s} in the image?", "Do you see a {c} {s}?"],
    "count": [
        "How many shapes are there?",
        "How many shapes are in the image?",
        "How many objects are there?",
        "How many shapes do you see?",
    ],
    "side": [
        "Is the {c} {s} on the left or the right?",
        "Is the {c} {s} on the left or right side?",
        "Is the {c} {s} left or right?",
    ],
}


def questions(
    scene: Scene, rng: random.Random, wording: int | None = None, n_exists: int = 1, extra: bool = False
) -> list[dict]:
    """All question/answer pairs the scene supports, one per kind of fact (hard negatives for yes/no).

    Returns a list of dicts ``{question, answer, type}``; ``wording`` fixes the template index (else random);
    ``n_exists`` yes/no questions of each answer (training asks more than one); ``extra`` adds training-only
    "Is the <shape> on the left or the right?" questions.
    """
    objs = scene.objects

    def tmpl(t: str) -> str:
        opts = _Q[t]
        return opts[wording % len(opts)] if wording is not None else rng.choice(opts)

    out: list[dict] = []
    if len(objs) == 1:
        out.append({"question": tmpl("shape"), "answer": objs[0].shape, "type": "shape", "obj": 0})
    shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    for i, o in enumerate(objs):
        if shape_counts[o.shape] == 1:
            out.append({"question": tmpl("color").format(s=o.shape), "answer": o.color, "type": "color", "obj": i})
    names = [o.name for o in objs]
    present = set(names)
    # yes/no: n_exists positives and as many negatives (hard negatives when possible)
    asked: set[str] = set()
    for k in range(n_exists):
        if k == 0:
            pos = rng.choice(objs)
        else:
            left = [o for o in objs if o.name not in asked]
            if not left:
                break
            pos = rng.choice(left)
        asked.add(pos.name)
        out.append(
            {
                "question": tmpl("exists").format(c=pos.color, s=pos.shape),
                "answer": "yes",
                "type": "exists",
                "obj": objs.index(pos),
            }
        )
    hard = [(c, o.shape) for o in objs for c in COLOR_NAMES if f"{c} {o.shape}" not in present]
    hard += [(o.color, s) for o in objs for s in SHAPES if f"{o.color} {s}" not in present]
    for _ in range(n_exists):
        for _try in range(50):
            if hard and rng.random() < 0.8:
                c, s = rng.choice(hard)
            else:
                while True:
                    c, s = rng.choice(COLOR_NAMES), rng.choice(SHAPES)
                    if f"{c} {s}" not in present:
                        break
            if f"{c} {s}" not in asked:
                break
        asked.add(f"{c} {s}")
        out.append({"question": tmpl("exists").format(c=c, s=s), "answer": "no", "type": "exists"})
    out.append({"question": tmpl("count"), "answer": str(len(objs)), "type": "count"})
    if extra:  # training only: left/right by the shape name alone (teaches lookup by shape, as colour questions need)
        for i, o in enumerate(objs):
            if shape_counts[o.shape] == 1 and abs(o.cx - 0.5) >= SIDE_MARGIN:
                out.append(
                    {
                        "question": rng.choice(_Q["side"]).replace("{c} ", "").format(s=o.shape),
                        "answer": o.side,
                        "type": "side_shape",
                        "obj": i,
                    }
                )
    for i, o in enumerate(objs):
        if names.count(o.name) == 1 and abs(o.cx - 0.5) >= SIDE_MARGIN:
            out.append(
                {"question": tmpl("side").format(c=o.color, s=o.shape), "answer": o.side, "type": "side", "obj": i}
            )
    return out


def describe(scene: Scene) -> str:
    """Objects left to right, e.g. ``"red circle , blue triangle ."``."""
    objs = sorted(scene.objects, key=lambda o: o.cx)
    return " , ".join(o.name for o in objs) + " ."


class Balance:
    """``n`` held-out items balanced over ``types`` (the first ``n % len(types)`` types get one more), asked in
    turn; an item id that cannot serve the type asked is skipped (shared by the scene and clip held-out sets)."""

    def __init__(self, n: int, types) -> None:
        self.n, self.types = n, tuple(types)
        self.want = {t: n // len(types) + (1 if i < n % len(types) else 0) for i, t in enumerate(types)}
        self.got = dict.fromkeys(types, 0)

    def ids(self, seed: int) -> Iterator[int]:
        """Item ids ``seed·1_000_003 + 0, 1, …`` until ``n`` items are taken."""
        idx = 0
        while sum(self.got.values()) < self.n:
            yield seed * 1_000_003 + idx
            idx += 1

    def next_type(self) -> str:
        t = self.types[sum(self.got.values()) % len(self.types)]
        while self.got[t] >= self.want[t]:
            t = self.types[(self.types.index(t) + 1) % len(self.types)]
        return t

    def take(self, t: str) -> None:
        self.got[t] += 1


def heldout(n: int = 500, seed: int = 0, types: tuple[str, ...] = QTYPES) -> Iterator[dict]:
    """Yield ``n`` held-out samples ``{image (PIL), question, answer, type, scene}``, balanced over ``types``.

    Scenes come from the "heldout" split (disjoint from training); deterministic for a given ``seed``.
    """
    rng = random.Random(f"heldout-questions-{seed}")
    bal = Balance(n, types)
    for scene_id in bal.ids(seed):
        t = bal.next_type()
        scene = render_scene(scene_id, "heldout", n_objects=1 if t == "shape" else None)
        cands = [q for q in questions(scene, rng) if q["type"] == t]
        if not cands:
            continue
        q = rng.choice(cands)
        bal.take(t)
        yield {
            "image": scene.image,
            "question": q["question"],
            "answer": q["answer"],
            "type": t,
            "scene": f"heldout-{scene_id}",
        }


# ---------------------------------------------------------------- the words the default model knows (run time)
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
EXTRA_WORDS = [
    "user",
    "assistant",
    ":",
    "?",
    ".",
    ",",
    "describe",
    "the",
    "image",
    "yes",
    "no",
    "left",
    "right",
    "none",
    "grey",
    "square",
    "colour",
    "objects",
    "picture",
    "and",
    "of",
    "a",
    "an",
    "is",
    "there",
    "in",
    "what",
    "which",
    "how",
    "many",
    "shape",
    "shapes",
    "color",
    "on",
    "or",
    "side",
    "do",
    "you",
    "see",
    "this",
    "shown",
    "object",
    "are",
    "it",
    "answer",
    "word",
    "one",
    "single",
    "with",
    "be",
    "brief",
]


def vocabulary() -> list[str]:
    """Special tokens first, then every word the task uses (lower case), digits 0-9."""
    import re

    words: list[str] = []
    texts = [t for ts in _Q.values() for t in ts]
    for t in texts:
        words += re.findall(r"\w+|[^\w\s]", t.lower().replace("{c}", "").replace("{s}", ""))
    words += list(SHAPES) + list(COLOR_NAMES) + EXTRA_WORDS + [str(i) for i in range(10)]
    seen: list[str] = []
    for w in words:
        if w not in seen and w not in SPECIAL:
            seen.append(w)
    return SPECIAL + seen
