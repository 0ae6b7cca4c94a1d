"""Recipe for the embedded tiny CLIP (``vlm_accel/zoo/clip``): an open_clip model trained on rendered frames.

The model is defined in open_clip's own config format (:data:`CONFIG`, written as ``NAME.json`` and registered with
``open_clip.add_model_config``), uses open_clip's bundled BPE tokenizer (``open_clip.get_tokenizer(NAME)``, 49,408
tokens) and is trained with a contrastive loss on frames of the scene renderer (:mod:`vlm_accel.zoo.render`) and
the clip renderer (:mod:`vlm_accel.zoo.clips`, "train" split), paired with captions of their colours, shapes and
positions ("red circle , blue triangle .", "the red circle on the left", "a triangle appears", "Is there a red
circle?", the renderers' own questions). A text may fit several images of a batch (many frames show a red circle),
so the loss uses soft targets over every image (text) the caption is true of, not only its own pair.

Evaluation is text -> frame retrieval on the "heldout" split: ``clips`` = among all frames of a held-out clip in which
a shape appears, disappears or changes colour, is the frame ranked first for "the <colour> <shape>" one that shows
it (chance: the share of frames that do; ``clips_change`` is the honest part, as its frames all show the same number
of shapes, while "more shapes" alone answers appear / disappear / order); ``scenes`` = among 16 held-out scenes,
does the first one for "the <colour> <shape>" show it.

Usage (resumable: ``train`` continues from ``ROOT/last.pt`` up to ``--steps`` in total)::

    python -m training.tiny_clip train --root /work/ckpt/tinyclip --steps 1500
    python -m training.tiny_clip eval --root /work/ckpt/tinyclip
    python -m training.tiny_clip export --root /work/ckpt/tinyclip --out vlm_accel/zoo/clip

The export is the folder ``vlm_accel.video.select.load_clip`` reads: ``NAME.json`` (open_clip model config),
``open_clip_model.safetensors`` (fp16 state dict; ``open_clip.create_model_and_transforms(NAME, pretrained=...)``
loads it), ``open_clip_config.json`` (the same for ``open_clip``'s ``local-dir:`` schema, with squash resizing) and
``train_info.json`` (step and held-out retrieval accuracy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NAME = "vlm-accel-tiny-clip"
IMAGE_SIZE = 64
CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 3, "width": 96, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}
# open_clip's defaults (OPENAI_DATASET_MEAN / STD); squash resizing keeps shapes at the frame's edges
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS = {"size": IMAGE_SIZE, "mode": "RGB", "mean": MEAN, "std": STD, "interpolation": "bilinear"}
PREPROCESS["resize_mode"] = "squash"
WEIGHTS = "open_clip_model.safetensors"

COLOR_WORDS = ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown")  # vlm_accel.zoo.render.COLORS
SHAPE_WORDS = ("circle", "rectangle", "triangle")
SIDE_MARGIN = 0.1  # a shape is "on the left" when its centre is left of 0.5 - margin (captions only)


# ------------------------------------------------------------------------------------------------ model
def write_config(folder: str | os.PathLike) -> Path:
    """Write ``NAME.json`` (open_clip's model config format) into ``folder``; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{NAME}.json"
    path.write_text(json.dumps(CONFIG, indent=2) + "\n")
    return path


def build_model(folder: str | os.PathLike, pretrained: str | None = None):
    """``(model, tokenizer)`` through open_clip's own API: the config in ``folder`` is registered with
    ``add_model_config``, the model made by ``create_model_and_transforms`` (random init unless ``pretrained``)."""
    import open_clip

    open_clip.add_model_config(str(write_config(folder)))  # the file, not the folder: other JSON may sit there
    model, _, _ = open_clip.create_model_and_transforms(NAME, pretrained=pretrained, image_resize_mode="squash")
    return model, open_clip.get_tokenizer(NAME)


def shrink(image, size: int = IMAGE_SIZE, resample=None) -> np.ndarray:
    """Squash a frame (PIL image or ``[H, W, 3]`` uint8) to ``[size, size, 3]`` uint8 (bilinear, antialiased)."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR if resample is None else resample))


def to_tensor(frames: np.ndarray):
    """``[N, S, S, 3]`` uint8 -> normalised ``[N, 3, S, S]`` float tensor (open_clip's mean / std)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------------------ captions
@dataclass
class Thing:
    """A visible shape: colour, shape and centre (fractions of width / height)."""

    color: str
    shape: str
    x: float
    y: float


# an atom is (colour | None, shape | None, side | None, vert | None); a caption holds when every atom matches a thing
Atom = tuple


def _matches(a: Atom, t: Thing) -> bool:
    c, s, side, vert = a
    if c is not None and t.color != c:
        return False
    if s is not None and t.shape != s:
        return False
    if side is not None and (t.x < 0.5) != (side == "left"):
        return False
    if vert is not None and (t.y < 0.5) != (vert == "top"):
        return False
    return True


def holds(atoms: list[Atom], count: int | None, things: list[Thing]) -> bool:
    """Is a caption with these ``atoms`` (and shape ``count``, if given) true of a frame showing ``things``?"""
    if count is not None and len(things) != count:
        return False
    return all(any(_matches(a, t) for t in things) for a in atoms)


_ATOM_RE = re.compile(
    r"\b(?:(" + "|".join(COLOR_WORDS) + r") )?(" + "|".join(SHAPE_WORDS) + r"|shape|object|square)s?\b", re.I
)


def parse_atoms(text: str) -> list[Atom]:
    """Colour / shape mentions of a question ("Which way does the red circle move?" -> [("red", "circle", ..)]);
    a bare "shape" without colour says nothing and gives no atom. Sides are not parsed (questions ask "left or
    right")."""
    atoms = []
    for color, shape in _ATOM_RE.findall(text.lower()):
        shape = {"square": "rectangle", "shape": None, "object": None}.get(shape, shape)
        if color or shape:
            atoms.append((color or None, shape, None, None))
    return atoms


_ONE = [
    "the {c} {s}",
    "a {c} {s}",
    "{c} {s}",
    "a {c} {s} appears",
    "the {c} {s} disappears",
    "Is there a {c} {s}?",
    "Which way does the {c} {s} move?",
    "Is the {c} {s} on the left or the right?",
    "Does the {c} {s} change color?",
    "where is the {c} {s}",
    "a frame with a {c} {s}",
]
_SHAPE = [
    "a {s}",
    "the {s}",
    "a {s} appears",
    "the {s} disappears",
    "Does the {s} change color?",
    "What color is the {s}?",
    "What color is the {s} at the end?",
]
_COLOR = ["something {c}", "a {c} shape", "the {c} shape", "What shape is {c}?", "the shape that is {c}"]
_PLACE = ["the {c} {s} on the {side}", "a {c} {s} on the {side} side", "a {s} on the {side}", "{c} {s} , {side}"]
_VERT = ["the {c} {s} at the {vert}", "a {c} {s} near the {vert}"]
_TWO = [
    "the {c1} {s1} and the {c2} {s2}",
    "a {c1} {s1} and a {c2} {s2}",
    "Which appears first, the {c1} {s1} or the {c2} {s2}?",
]
_NUM = {1: "one shape", 2: "two shapes", 3: "three shapes", 4: "four shapes"}


def caption(things: list[Thing], rng: random.Random, focus: Thing | None = None) -> tuple[str, list[Atom], int | None]:
    """A random caption of a frame: ``(text, atoms, count)``; ``focus`` (if given) is the shape it is about."""
    if not things:
        return rng.choice(["no shapes", "an empty frame", "nothing"]), [], 0
    t = focus or rng.choice(things)
    u = rng.random()
    if u < 0.38:
        return rng.choice(_ONE).format(c=t.color, s=t.shape), [(t.color, t.shape, None, None)], None
    if u < 0.48:
        return rng.choice(_SHAPE).format(s=t.shape), [(None, t.shape, None, None)], None
    if u < 0.56:
        return rng.choice(_COLOR).format(c=t.color), [(t.color, None, None, None)], None
    if u < 0.72 and abs(t.x - 0.5) >= SIDE_MARGIN:
        side = "left" if t.x < 0.5 else "right"
        tmpl = rng.choice(_PLACE)
        atom = (None if "{c}" not in tmpl else t.color, t.shape, side, None)
        return tmpl.format(c=t.color, s=t.shape, side=side), [atom], None
    if u < 0.76 and abs(t.y - 0.5) >= SIDE_MARGIN:
        vert = "top" if t.y < 0.5 else "bottom"
        return rng.choice(_VERT).format(c=t.color, s=t.shape, vert=vert), [(t.color, t.shape, None, vert)], None
    if u < 0.86 and len(things) >= 2:
        o = rng.choice([x for x in things if x is not t])
        text = rng.choice(_TWO).format(c1=t.color, s1=t.shape, c2=o.color, s2=o.shape)
        return text, [(t.color, t.shape, None, None), (o.color, o.shape, None, None)], None
    if u < 0.9:
        return _NUM.get(len(things), f"{len(things)} shapes"), [], len(things)
    # every shape, left to right, as vlm_accel.zoo.render.describe writes it ("red circle , blue triangle .")
    ordered = sorted(things, key=lambda x: x.x)
    if rng.random() < 0.5:
        return (
            " , ".join(f"{x.color} {x.shape}" for x in ordered) + " .",
            [(x.color, x.shape, None, None) for x in ordered],
            None,
        )
    parts = []
    atoms = []
    for x in ordered:
        if abs(x.x - 0.5) >= SIDE_MARGIN:
            side = "left" if x.x < 0.5 else "right"
            parts.append(f"a {x.color} {x.shape} on the {side}")
            atoms.append((x.color, x.shape, side, None))
        else:
            parts.append(f"a {x.color} {x.shape}")
            atoms.append((x.color, x.shape, None, None))
    return " and ".join(parts), atoms, None


# ------------------------------------------------------------------------------------------------ data
def _clip_things(clip, t: int) -> list[Thing]:
    return [Thing(k.color_at(t), k.shape, *k.pos(t)) for k in clip.tracks if k.present(t)]


def _resample(rng: random.Random):
    from PIL import Image

    return rng.choice([Image.BILINEAR, Image.BILINEAR, Image.BICUBIC, Image.BOX, Image.LANCZOS])


def _augment(img, rng: random.Random) -> np.ndarray:
    from PIL import Image

    if rng.random() < 0.2:  # decoders shrink in steps and with other filters
        img = img.resize((IMAGE_SIZE * 2, IMAGE_SIZE * 2), rng.choice([Image.NEAREST, Image.BILINEAR]))
    return shrink(img, IMAGE_SIZE, _resample(rng))


def scene_sample(seed: int, rng: random.Random, split: str = "train"):
    """One rendered scene: ``(frame [S, S, 3], things, text, atoms, count)``."""
    from PIL import Image

    from vlm_accel.zoo.render import describe, questions, render_scene

    scene = render_scene(seed, split)
    things = [Thing(o.color, o.shape, o.cx, o.cy) for o in scene.objects]
    u = rng.random()
    if u < 0.12:
        text, atoms, count = describe(scene), [(o.color, o.shape, None, None) for o in scene.objects], None
    elif u < 0.3:
        qs = [q for q in questions(scene, rng) if "obj" in q and parse_atoms(q["question"])]
        if qs:
            q = rng.choice(qs)
            text, atoms, count = q["question"], parse_atoms(q["question"]), None
        else:
            text, atoms, count = caption(things, rng)
    else:
        text, atoms, count = caption(things, rng)
    img = scene.image if isinstance(scene.image, Image.Image) else Image.fromarray(scene.image)
    return _augment(img, rng), things, text, atoms, count


def clip_samples(seed: int, n: int, rng: random.Random, split: str = "train"):
    """``n`` frames of one rendered clip, spread over it (one per stratum), each with a caption; half of the
    captions are about the shape whose presence or colour changes, so the clip's other frames are hard negatives."""
    from PIL import Image

    from vlm_accel.zoo.clips import clip_questions, render_clip

    T = render_clip(seed, split, index=[0]).num_frames
    bounds = np.linspace(0, T, n + 1)
    idx = sorted({rng.randrange(int(bounds[i]), max(int(bounds[i + 1]), int(bounds[i]) + 1)) for i in range(n)})
    clip = render_clip(seed, split, index=idx)
    event = [k for k in clip.tracks if k.t_in > 0 or k.t_out < T or k.t_change is not None or k.x1 is not None]
    qs = [q for q in clip_questions(clip, rng, extra=True) if parse_atoms(q["question"])]
    out = []
    for frame, t in zip(clip.frames, idx, strict=True):
        things = _clip_things(clip, t)
        u = rng.random()
        focus = None
        if u < 0.5 and event:
            k = rng.choice(event)
            if k.present(t):
                focus = Thing(k.color_at(t), k.shape, *k.pos(t))
        fit = [q for q in qs if holds(parse_atoms(q["question"]), None, things)]
        if focus is None and u >= 0.75 and fit:
            q = rng.choice(fit)
            text, atoms, count = q["question"], parse_atoms(q["question"]), None
        else:
            text, atoms, count = caption(things, rng, focus)
        out.append((_augment(Image.fromarray(frame), rng), things, text, atoms, count))
    return out


def make_batch(step: int, n_scenes: int, n_clips: int, per_clip: int, split: str = "train"):
    """Batch ``step`` (deterministic in ``step``, so a resumed run sees the same data): frames, things, texts,
    atoms, counts."""
    rng = random.Random(f"tinyclip-batch-{split}-{step}")
    items = [scene_sample(step * 1000 + i, rng, split) for i in range(n_scenes)]
    for j in range(n_clips):
        items += clip_samples(step * 1000 + 500 + j, per_clip, rng, split)
    frames, things, texts, atoms, counts = zip(*items, strict=True)
    return np.stack(frames), list(things), list(texts), list(atoms), list(counts)


def compat_matrix(things: list[list[Thing]], atoms: list[list[Atom]], counts: list[int | None]) -> np.ndarray:
    """``[texts, images]`` bool: which caption is true of which frame (the diagonal always)."""
    m = np.array([[holds(a, c, th) for th in things] for a, c in zip(atoms, counts, strict=True)], dtype=bool)
    np.fill_diagonal(m, True)
    return m


def contrastive_loss(img, txt, logit_scale, compat):
    """Symmetric InfoNCE with soft targets: each text's target spreads over every image it is true of, and each
    image's over every text true of it."""
    import torch.nn.functional as F

    logits = logit_scale * txt @ img.T  # [texts, images]
    m = compat.float()
    t2i = -(m / m.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    mt = m.T
    i2t = -(mt / mt.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1).mean()
    return (t2i + i2t) / 2


# ------------------------------------------------------------------------------------------------ evaluation
def eval_set(n_clips: int = 80, n_scenes: int = 256, seed: int = 0) -> dict:
    """Held-out retrieval tasks (rendered once): clip-frame groups with a query whose answer changes over the clip,
    and groups of 16 scenes with a query per scene."""
    from vlm_accel.zoo.clips import render_clip
    from vlm_accel.zoo.render import render_scene

    rng = random.Random(f"tinyclip-eval-{seed}")
    clips = []
    kinds = ("appear", "disappear", "change", "order")
    i = 0
    while len(clips) < n_clips:
        cid = seed * 100_003 + i
        i += 1
        clip = render_clip(cid, "heldout", kind=kinds[len(clips) % len(kinds)])
        T = clip.num_frames
        per_frame = [_clip_things(clip, t) for t in range(T)]
        names = {(x.color, x.shape) for th in per_frame for x in th}
        varying = []
        for c, s in sorted(names):
            pos = [any(x.color == c and x.shape == s for x in th) for th in per_frame]
            if 0 < sum(pos) < T:
                varying.append(((c, s), pos))
        if not varying:
            continue
        frames = np.stack([shrink(f) for f in clip.frames])
        for (c, s), pos in varying:  # change clips: old and new colour, same shapes in every frame
            clips.append({"frames": frames, "text": f"the {c} {s}", "positive": np.array(pos), "kind": clip.kind})
    scenes = []
    for j in range(n_scenes):
        sc = render_scene(seed * 100_003 + j, "heldout")
        scenes.append((shrink(sc.image), [Thing(o.color, o.shape, o.cx, o.cy) for o in sc.objects]))
    groups = []
    for g in range(0, n_scenes - 15, 16):
        grp = scenes[g : g + 16]
        frames = np.stack([f for f, _ in grp])
        for k in range(16):
            t = rng.choice(grp[k][1])
            pos = np.array([any(x.color == t.color and x.shape == t.shape for x in th) for _, th in grp])
            groups.append({"frames": frames, "text": f"the {t.color} {t.shape}", "positive": pos, "group": g})
    return {"clips": clips, "scenes": groups}


def evaluate(model, tokenizer, data: dict) -> dict:
    """Top-1 text -> frame retrieval accuracy (and chance) on :func:`eval_set`."""
    import torch

    model.eval()
    out = {}
    with torch.no_grad():
        for key in ("clips", "scenes"):
            hits, chance = [], []
            cache: dict = {}
            for item in data[key]:
                gid = item.get("group", id(item["frames"]))
                if gid not in cache:
                    cache = {gid: model.encode_image(to_tensor(item["frames"]), normalize=True)}
                img = cache[gid]
                txt = model.encode_text(tokenizer([item["text"]]), normalize=True)
                best = int((txt @ img.T).argmax())
                hits.append(bool(item["positive"][best]))
                chance.append(float(item["positive"].mean()))
            out[key] = round(float(np.mean(hits)), 4) if hits else float("nan")
            out[f"{key}_chance"] = round(float(np.mean(chance)), 4) if chance else float("nan")
            kinds = [item.get("kind") for item in data[key]]
            for kind in sorted({x for x in kinds if x}):
                sel = [h for h, x in zip(hits, kinds, strict=True) if x == kind]
                out[f"{key}_{kind}"] = round(float(np.mean(sel)), 4)
    model.train()
    return out


# ------------------------------------------------------------------------------------------------ training
def _save(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def train(
    root: str | os.PathLike,
    steps: int,
    n_scenes: int = 48,
    n_clips: int = 8,
    per_clip: int = 6,
    lr: float = 1e-3,
    warmup: int = 60,
    ckpt_every: float = 180.0,
    log_every: int = 20,
    eval_clips: int = 80,
    eval_scenes: int = 256,
    log=print,
) -> dict:
    """Train (or continue from ``root/last.pt``) up to ``steps`` steps in total; checkpoints ``last.pt`` every
    ``ckpt_every`` seconds and at the end, evaluates there and keeps the best one as ``best.pt``. Returns the last
    evaluation."""
    import torch

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_model(root)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}], lr=lr)
    step, best = 0, -1.0
    last = root / "last.pt"
    if last.exists():
        ck = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, best = ck["step"], ck.get("best", -1.0)
        log(json.dumps({"resumed": str(last), "step": step, "best": best}))
    data = eval_set(eval_clips, eval_scenes)
    t_ckpt = time.time()
    t_log, n_log, loss_sum = time.time(), 0, 0.0
    result: dict = {}

    def checkpoint():
        nonlocal best, result
        result = {"step": step, **evaluate(model, tokenizer, data)}
        score = (result["clips"] + result["scenes"]) / 2
        ck = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "best": max(best, score)}
        ck["eval"] = result
        _save(ck, last)
        if score > best:
            best = score
            _save({"model": model.state_dict(), "step": step, "eval": result}, root / "best.pt")
        result["best"] = round(best, 4)
        with open(root / "history.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        log(json.dumps({"eval": result}))

    model.train()
    while step < steps:
        frames, things, texts, atoms, counts = make_batch(step, n_scenes, n_clips, per_clip)
        compat = torch.from_numpy(compat_matrix(things, atoms, counts))
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup)
        img = model.encode_image(to_tensor(frames), normalize=True)
        txt = model.encode_text(tokenizer(texts), normalize=True)
        loss = contrastive_loss(img, txt, model.logit_scale.exp(), compat)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        loss_sum += loss.item()
        n_log += 1
        if step % log_every == 0 or step == steps:
            dt = (time.time() - t_log) / n_log
            log(
                json.dumps(
                    {
                        "step": step,
                        "loss": round(loss_sum / n_log, 4),
                        "lr": round(_lr(step - 1, steps, lr, warmup), 6),
                        "s_per_step": round(dt, 3),
                        "scale": round(float(model.logit_scale.exp()), 2),
                    }
                )
            )
            t_log, n_log, loss_sum = time.time(), 0, 0.0
        if time.time() - t_ckpt >= ckpt_every and step < steps:
            checkpoint()
            t_ckpt = time.time()
    if not result or result.get("step") != step:
        checkpoint()
    return result


def load_checkpoint(root: str | os.PathLike, which: str = "best"):
    """``(model, tokenizer, checkpoint)`` from ``root/{which}.pt`` (``last.pt`` if there is no ``best.pt``)."""
    import torch

    root = Path(root)
    path = root / f"{which}.pt"
    if not path.exists():
        path = root / "last.pt"
    ck = torch.load(path, map_location="cpu", weights_only=False)
    model, tokenizer = build_model(root)
    model.load_state_dict(ck["model"])
    model.eval()
    return model, tokenizer, ck


def export(root: str | os.PathLike, out: str | os.PathLike, which: str = "best") -> Path:
    """Write the shipped folder: ``NAME.json``, fp16 ``open_clip_model.safetensors``, ``open_clip_config.json``
    (``local-dir:`` schema) and ``train_info.json``."""
    import torch
    from safetensors.torch import save_file

    model, _, ck = load_checkpoint(root, which)
    out = Path(out)
    write_config(out)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / WEIGHTS))
    preprocess = {k: (list(v) if isinstance(v, tuple) else v) for k, v in PREPROCESS.items()}
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": CONFIG, "preprocess_cfg": preprocess}, indent=2) + "\n"
    )
    info = {
        "name": NAME,
        "step": ck["step"],
        "heldout_retrieval_top1": ck.get("eval"),
        "recipe": "python -m training.tiny_clip train / export (training/tiny_clip.py)",
        "weights": f"{WEIGHTS} (fp16)",
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.tiny_clip", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train or continue from ROOT/last.pt")
    t.add_argument("--root", required=True)
    t.add_argument("--steps", type=int, required=True, help="total steps (a resumed run continues up to this)")
    t.add_argument("--scenes", type=int, default=48, help="rendered scenes per batch")
    t.add_argument("--clips", type=int, default=8, help="rendered clips per batch")
    t.add_argument("--per-clip", type=int, default=6, help="frames per clip")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--ckpt-every", type=float, default=180.0, help="seconds between checkpoints")
    t.add_argument("--eval-clips", type=int, default=80)
    t.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("eval", help="held-out retrieval accuracy of a checkpoint")
    e.add_argument("--root", required=True)
    e.add_argument("--which", default="best")
    e.add_argument("--eval-clips", type=int, default=200)
    e.add_argument("--eval-scenes", type=int, default=512)
    x = sub.add_parser("export", help="write the open_clip folder shipped in vlm_accel/zoo/clip")
    x.add_argument("--root", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--which", default="best")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(getattr(a, "threads", 1))
    if a.cmd == "train":
        train(
            a.root,
            a.steps,
            n_scenes=a.scenes,
            n_clips=a.clips,
            per_clip=a.per_clip,
            lr=a.lr,
            ckpt_every=a.ckpt_every,
            eval_clips=a.eval_clips,
            log=lambda s: print(s, flush=True),
        )
    elif a.cmd == "eval":
        model, tokenizer, ck = load_checkpoint(a.root, a.which)
        res = evaluate(model, tokenizer, eval_set(a.eval_clips, a.eval_scenes, seed=1))
        print(json.dumps({"step": ck["step"], **res}))
    else:
        print(export(a.root, a.out, a.which))


if __name__ == "__main__":
    sys.exit(main())
