"""Synthetic clips of moving and appearing shapes with questions, for video Q&A runs on the embedded default model.

Shapes and colours use the default model's vocabulary; clips are seeded and written as MP4 + a JSONL of questions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..zoo.render import COLORS, SHAPES  # the embedded model's vocabulary


def _draw(img: Image.Image, shape: str, color: str, cx: float, cy: float, r: float) -> None:
    d = ImageDraw.Draw(img)
    box = [cx - r, cy - r, cx + r, cy + r]
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "rectangle":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def shape_clip(seed: int, frames: int = 8, size: int = 224) -> dict:
    """One clip: ``{frames [T, H, W, 3] uint8, question, answer, type}``; ``type`` is ``"move"`` (which way does
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
            img = Image.new("RGB", (size, size), bg)
            _draw(img, shape, color, float(x), cy, r)
            out.append(np.asarray(img))
        question, answer = f"Which way does the {color} {shape} move?", direction
    else:
        other_shape, other_color = rng.choice(SHAPES), rng.choice([c for c in COLORS if c != color])
        x_static, x_new = (0.3 * size, 0.7 * size) if rng.random() < 0.5 else (0.7 * size, 0.3 * size)
        for t in range(frames):
            img = Image.new("RGB", (size, size), bg)
            _draw(img, other_shape, other_color, x_static, cy, r)
            if t >= frames // 2:
                _draw(img, shape, color, x_new, size - cy, r)
            out.append(np.asarray(img))
        question, answer = "What color is the shape that appears?", color
    return {"frames": np.stack(out), "question": question, "answer": answer, "type": kind}


def write_clips(out_dir: str | Path, n: int = 50, seed: int = 0, frames: int = 8, fps: int = 4) -> Path:
    """Write ``n`` clips as MP4 and ``questions.jsonl`` (``{video, question, answer, type}``); returns the JSONL."""
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
