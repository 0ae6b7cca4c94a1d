"""Train the default VLM to answer questions about clips as well as images (CPU, seeded, resumable).

The model is the OneVision form of the image model (:mod:`vlm_accel.zoo.onevision`): frozen DINOv2 tower, trained
projector + 4-layer Llama + ``image_newline``. Steps (each resumable; rerunning a command continues it):

1. ``init``: ``python -m vlm_accel.zoo.onevision --out ROOT/init`` (the image model's weights, OneVision layout).
2. ``cache``: frozen DINOv2 patch features exactly as the model computes them (``hidden_states[-1][:, 1:]``, fp16)
   — held-out evaluation clips + images first, then training images (both anyres views) and training clips (the 8
   uniformly sampled frames), in shards, with per-patch object labels.
3. ``train``: projector + LM (+ newline) on batches mixing clips and images. Every question of a clip / image is an
   independent turn after one shared media prefix (block mask, positions restart after the prefix: each turn is
   exactly the single-question inference prompt); loss on answers only; an auxiliary loss makes projected patch
   tokens name their object's colour / shape and position (left–right, up–down) through the tied word embeddings;
   attention supervision on layer 2: head 0 ("early") attends from the answer position to the relevant objects in
   sampled frames 0–2, head 1 ("late") in frames 5–7 (both to the named object for images), head 2 to every object
   of a shape named by the question. Checkpoint every few minutes (``ROOT/ckpt/last.pt``), log lines with
   teacher-forced held-out accuracy.
4. ``export``: fp16 safetensors + processor files (``--out vlm_accel/zoo/default_video`` or a scratch dir).

    python -m vlm_accel.zoo.onevision --out /work/zoo-video-ckpt/init
    nohup nice -n 10 python -m training.train_video cache --root /work/zoo-video-ckpt >> LOG 2>&1 &
    nohup nice -n 10 python -m training.train_video train --root /work/zoo-video-ckpt >> LOG 2>&1 &
"""

from __future__ import annotations

import argparse
import glob
import logging
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from vlm_accel.zoo.clips import (
    COLOR_NAMES,
    EASE_REVERSED,
    SHAPES,
    Track,
    clip_questions,
    heldout_clips,
    render_clip,
    sampled,
)
from vlm_accel.zoo.render import grid_labels, heldout, questions, render_scene

from .train import attention_target_loss, segment_mask

log = logging.getLogger("training.train_video")
ROOT = os.environ.get("VLM_ACCEL_VIDEO_ROOT", "/work/zoo-video-ckpt")
CLIP_SHARD = 200
IMAGE_SHARD = 500
FRAMES = 8
VIDEO_TOKENS = FRAMES * 64 + 1
POS_SCALE = 4.0  # the position read-out's logit margin at the frame's edge (see _aux_loss)


# ----------------------------------------------------------------------------------------------------------- cache
def crop_labels(label_map: np.ndarray, n_objects: int) -> np.ndarray:
    """Labels of OneVision's aspect-preserving 224-px view (resized to fit, centred on a padded square)."""
    from PIL import Image

    h, w = label_map.shape
    sw, sh = 224 / w, 224 / h
    if sw < sh:
        nw, nh = 224, min(math.ceil(h * sw), 224)
    else:
        nh, nw = 224, min(math.ceil(w * sh), 224)
    canvas = np.zeros((224, 224), dtype=np.uint8)
    top, left = (224 - nh) // 2, (224 - nw) // 2
    canvas[top : top + nh, left : left + nw] = np.asarray(Image.fromarray(label_map).resize((nw, nh), Image.NEAREST))
    return grid_labels(canvas, n_objects)


class Tower:
    """The model's frozen vision tower: ``[N, 3, 224, 224]`` → ``[N, 256, 384]`` fp16 patch features."""

    def __init__(self, init: str):
        from transformers import LlavaOnevisionForConditionalGeneration

        from vlm_accel.zoo.onevision import FrameVideoProcessor, load_processor

        model = LlavaOnevisionForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
        self.tower = model.model.vision_tower.eval()
        self.processor = load_processor(init)
        # frames -> pixels by the same arithmetic whether or not torchvision (the stock video processor) is installed
        self.video = FrameVideoProcessor()

    @torch.no_grad()
    def frames(self, pv: torch.Tensor) -> torch.Tensor:
        """Like calling the tower, but identical frames (a static stretch of a clip) are encoded once: exact, since
        the tower is deterministic and sees each frame alone."""
        uniq: list[int] = []
        where = []
        for i in range(len(pv)):
            j = next((k for k, u in enumerate(uniq) if torch.equal(pv[u], pv[i])), None)
            if j is None:
                uniq.append(i)
                j = len(uniq) - 1
            where.append(j)
        return self(pv[uniq])[torch.tensor(where)]

    @torch.no_grad()
    def __call__(self, pv: torch.Tensor) -> torch.Tensor:
        out = [
            self.tower(pv[i : i + 16], output_hidden_states=True).hidden_states[-1][:, 1:].to(torch.float16)
            for i in range(0, len(pv), 16)
        ]
        return torch.cat(out)


def _save(obj, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def is_varied(seed: int, vary_p: float) -> bool:
    """Whether training clip ``seed`` comes from the varied split (issue #32) at a share ``vary_p``."""
    return vary_p > 0 and random.Random(f"vary-{seed}").random() < vary_p


def cache_clips(tower: Tower, root: str, split: str, n: int, shards=None, vary_p: float = 0.0) -> None:
    """Shards ``clips_{split}_{k}.pt``: feats ``[n, 8, 256, 384]`` fp16, labels ``[n, 8, 16, 16]`` int8, clips
    (``{seed, kind, T, index, tracks, vary}``) of clip seeds ``k·200 …``; a share ``vary_p`` of them drawn from
    the varied split (:func:`is_varied`)."""
    vp = tower.video
    for k in shards if shards is not None else range(math.ceil(n / CLIP_SHARD)):
        path = os.path.join(root, "feats", f"clips_{split}_{k:04d}.pt")
        if os.path.exists(path):
            continue
        t0 = time.time()
        feats, labels, metas = [], [], []
        for seed in range(k * CLIP_SHARD, min(n, (k + 1) * CLIP_SHARD)):
            vary = is_varied(seed, vary_p)
            layout = render_clip(seed, split, index=[0], vary=vary)
            idx = sampled(layout.num_frames, FRAMES)
            clip = render_clip(seed, split, index=idx, vary=vary)
            feats.append(tower.frames(vp.frames(clip.frames)))
            labels.append(torch.from_numpy(clip.patch_labels()))
            metas.append(
                {
                    "seed": seed,
                    "kind": clip.kind,
                    "T": clip.num_frames,
                    "index": idx.tolist(),
                    "tracks": [t.to_dict() for t in clip.tracks],
                    "vary": vary,
                }
            )
        _save({"feats": torch.stack(feats), "labels": torch.stack(labels), "clips": metas}, path)
        log.info("wrote %s (%.0f s)", path, time.time() - t0)


EVAL_SETS = {  # held-out clip sets: file prefix -> (what, key prefix in the accuracy dicts)
    "clips": "the training renderer's held-out clips (clips.heldout_clips)",
    "clips2": "the second renderer's clips (render2.heldout_clips2; never trained on)",
    "clipsv": "the varied split's held-out clips (clips.heldout_clips(vary=True))",
}


def eval_clip_items(kind: str, n: int, seed: int):
    if kind == "clips2":
        from vlm_accel.zoo.render2 import heldout_clips2

        return heldout_clips2(n, seed)
    return heldout_clips(n, seed, vary=kind == "clipsv")


def cache_eval_clips(tower: Tower, root: str, n: int, seed: int = 0, kind: str = "clips") -> str:
    """Features of ``n`` held-out clips of one of :data:`EVAL_SETS` (``ROOT/feats/{kind}_eval_s{seed}_n{n}.pt``)."""
    path = os.path.join(root, "feats", f"{kind}_eval_s{seed}_n{n}.pt")
    if os.path.exists(path):
        return path
    vp = tower.video
    feats, items = [], []
    for it in eval_clip_items(kind, n, seed):
        feats.append(tower.frames(vp.frames(it["frames"])))
        items.append({k: it[k] for k in ("question", "answer", "type", "clip")})
    _save({"feats": torch.stack(feats), "items": items}, path)
    log.info("wrote %s", path)
    return path


def _image_feats(tower: Tower, images) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, 2, 256, 384]`` (base view, aspect view) and image_sizes ``[n, 2]``; identical views encoded once."""
    enc = tower.processor.image_processor(images, return_tensors="pt")
    pv, sizes = enc["pixel_values"], enc["image_sizes"]
    if pv.shape[1] != 2:
        raise RuntimeError(f"expected 2 anyres views per image, got {pv.shape[1]}")
    out = []
    for b in range(len(pv)):
        if torch.equal(pv[b, 0], pv[b, 1]):
            f = tower(pv[b, :1])
            out.append(torch.cat([f, f]))
        else:
            out.append(tower(pv[b]))
    return torch.stack(out), sizes


def cache_images(tower: Tower, root: str, split: str, n: int, shards=None) -> None:
    """Shards ``images_{split}_{k}.pt``: feats ``[n, 2, 256, 384]``, sizes, labels of both views, objects."""
    for k in shards if shards is not None else range(math.ceil(n / IMAGE_SHARD)):
        path = os.path.join(root, "feats", f"images_{split}_{k:04d}.pt")
        if os.path.exists(path):
            continue
        t0 = time.time()
        seeds = list(range(k * IMAGE_SHARD, min(n, (k + 1) * IMAGE_SHARD)))
        feats, sizes, labels, objects = [], [], [], []
        for i in range(0, len(seeds), 16):
            scenes = [render_scene(s, split) for s in seeds[i : i + 16]]
            f, sz = _image_feats(tower, [s.image for s in scenes])
            feats.append(f)
            sizes.append(sz)
            for s in scenes:
                lm = s.meta["label_map"]
                labels.append(
                    torch.from_numpy(np.stack([s.patch_labels.astype(np.int8), crop_labels(lm, len(s.objects))]))
                )
                objects.append([(o.shape, o.color, o.cx, o.cy, o.size) for o in s.objects])
        _save(
            {"feats": torch.cat(feats), "sizes": torch.cat(sizes), "labels": torch.stack(labels), "objects": objects},
            path,
        )
        log.info("wrote %s (%.0f s)", path, time.time() - t0)


def cache_eval_images(tower: Tower, root: str, n: int, seed: int = 0) -> str:
    path = os.path.join(root, "feats", f"images_eval_s{seed}_n{n}.pt")
    if os.path.exists(path):
        return path
    items = list(heldout(n, seed))
    feats, sizes = [], []
    for i in range(0, n, 16):
        f, sz = _image_feats(tower, [it["image"] for it in items[i : i + 16]])
        feats.append(f)
        sizes.append(sz)
    meta = [{k: it[k] for k in ("question", "answer", "type", "scene")} for it in items]
    _save({"feats": torch.cat(feats), "sizes": torch.cat(sizes), "items": meta}, path)
    log.info("wrote %s", path)
    return path


def cache(args) -> None:
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.join(args.root, "feats"), exist_ok=True)
    tower = Tower(os.path.join(args.root, "init"))
    cache_eval_clips(tower, args.root, args.eval_clips)
    for kind in args.eval_sets.split(","):
        if kind and kind != "clips":
            cache_eval_clips(tower, args.root, args.eval_clips, kind=kind)
    cache_eval_images(tower, args.root, args.eval_images)
    n_img, n_clip = math.ceil(args.images / IMAGE_SHARD), math.ceil(args.clips / CLIP_SHARD)
    for r in range(max(n_clip, n_img)):  # interleaved, so training can start after the first shard of each
        if r < n_clip:
            cache_clips(tower, args.root, "train", args.clips, shards=[r], vary_p=args.vary_p)
        if r < n_img:
            cache_images(tower, args.root, "train", args.images, shards=[r])
    log.info("cache complete")


# ---------------------------------------------------------------------------------------------------- sequences
class Seq:
    """One packed sequence: a media prefix and independent question turns (see :func:`train.segment_mask`)."""

    def __init__(self, tok, media_id: int, n_media: int, turns: list[tuple[str, str]], cache: dict):
        def ids(text: str) -> list[int]:
            if text not in cache:
                cache[text] = tok(text, add_special_tokens=False)["input_ids"]
            return cache[text]

        prefix = [tok.bos_token_id] + ids("user :") + [media_id] * n_media
        self.media_start = len(prefix) - n_media
        self.ids, self.labels = list(prefix), [-100] * len(prefix)
        self.seg, self.pos = [0] * len(prefix), list(range(len(prefix)))
        self.rows = []  # index of the token that predicts each turn's first answer token
        for k, (q, a) in enumerate(turns, 1):
            user = ids(q) + ids("assistant :")
            ans = ids(a) + [tok.eos_token_id]
            self.rows.append(len(self.ids) + len(user) - 1)
            self.ids += user + ans
            self.labels += [-100] * len(user) + ans
            self.seg += [k] * (len(user) + len(ans))
            self.pos += list(range(len(prefix), len(prefix) + len(user) + len(ans)))


def pooled_labels(labels16: torch.Tensor) -> torch.Tensor:
    """``[..., 16, 16]`` object index → ``[..., 8, 8]``: the object covering most of each 2×2 cell (-1 none)."""
    x = labels16.long() + 1  # 0 = none
    *lead, h, w = x.shape
    x = x.reshape(*lead, h // 2, 2, w // 2, 2).transpose(-3, -2).reshape(*lead, h // 2, w // 2, 4)
    oh = F.one_hot(x, 8)[..., 1:].sum(-2)  # counts of objects 1..7
    best = oh.argmax(-1)
    return torch.where(oh.max(-1).values > 0, best, torch.full_like(best, -1))


def _tracks(meta) -> list[Track]:
    return [Track(**{**d, "jitter": tuple(d["jitter"])}) for d in meta["tracks"]]


REVERSIBLE = {"move": "move", "appear": "disappear", "disappear": "appear", "change": "change"}


def reverse_track(t: Track, T: int) -> Track:
    """The track played backwards (frame ``t`` → ``T − 1 − t``): a move the other way, an appearance a
    disappearance, a colour change from the second colour to the first."""
    r = Track(**t.to_dict())
    if t.x1 is not None:
        r.x0, r.y0, r.x1, r.y1 = t.x1, t.y1, t.x0, t.y0
        r.move_from, r.move_to = T - 1 - t.move_to, T - 1 - t.move_from
    r.t_in, r.t_out = max(0, T - t.t_out), T - t.t_in
    if t.t_change is not None:
        r.color, r.color2, r.t_change = t.color2, t.color, T - t.t_change
        r.shade, r.shade2 = t.shade2, t.shade
    r.ease = EASE_REVERSED[t.ease]  # the time profile played backwards (the sideways bow is symmetric)
    return r


def reverse_clip(feats, labels, lab8, meta):
    """A cached clip played backwards (exact: the tower encodes each frame alone). ``meta["kind"]`` must be in
    :data:`REVERSIBLE` (an ``order`` clip reversed has no "appears first")."""
    T = meta["T"]
    tracks = [reverse_track(t, T).to_dict() for t in _tracks(meta)]
    index = [T - 1 - i for i in reversed(meta["index"])]
    rmeta = {**meta, "kind": REVERSIBLE[meta["kind"]], "index": index, "tracks": tracks}
    return feats.flip(0), labels.flip(0), lab8.flip(0), rmeta


def clip_turns(meta, rng: random.Random, no_change_p: float = 0.35) -> list[dict]:
    """Questions of a cached clip (``change`` "no" questions subsampled so yes / no balance)."""
    tracks = _tracks(meta)
    qs = clip_questions(tracks, rng, meta["T"], meta["kind"], extra=True)
    return [q for q in qs if not (q["type"] == "change" and q["answer"] == "no" and rng.random() > no_change_p)]


def clip_att_targets(meta, q: dict, lab8: torch.Tensor) -> dict[int, torch.Tensor]:
    """Attention targets for one clip question: ``{head: [513] bool}`` over the video tokens.

    ``lab8``: ``[8, 8, 8]`` pooled labels of the 8 sampled frames. Head 0 (early): frames 0–2; head 1 (late):
    frames 5–7 (``disappear``: the cells the vanished object held in frame 0); head 2: every token of the named
    shape (``change`` questions)."""
    tracks = _tracks(meta)
    T = meta["T"]
    idx = meta["index"]
    flat = lab8.reshape(FRAMES, 64)

    def tokens(objs, frames) -> torch.Tensor:
        m = torch.zeros(VIDEO_TOKENS, dtype=torch.bool)
        for f in frames:
            for o in objs:
                m[f * 64 : (f + 1) * 64] |= flat[f] == o
        return m

    every = list(range(len(tracks)))
    t = q["type"]
    out: dict[int, torch.Tensor] = {}
    if t in ("move", "change"):
        out[0], out[1] = tokens(q["objs"], [0, 1, 2]), tokens(q["objs"], [5, 6, 7])
        if t == "change":
            out[2] = tokens(q["objs"], range(FRAMES))
    elif t == "x_color_end":
        out[1], out[2] = tokens(q["objs"], [5, 6, 7]), tokens(q["objs"], range(FRAMES))
    elif t in ("appear", "x_appear_shape"):  # early: every object; late: the one that appeared
        out[0], out[1] = tokens(every, [0, 1, 2]), tokens(q["objs"], [5, 6, 7])
    elif t in ("disappear", "x_disappear_color"):
        # early: every object; late: the cells the vanished one held in frame 0, now without it. A frame 0–2 token
        # cannot know it will vanish (causal attention), but a late token at such a cell sees, through the temporal
        # head, what frame 0 had there
        gone = torch.isin(flat, torch.tensor(q["objs"]))
        ghost = torch.zeros(VIDEO_TOKENS, dtype=torch.bool)
        for f in (5, 6, 7):
            ghost[f * 64 : (f + 1) * 64] = gone[0] & ~gone[f]
        out[0], out[1] = tokens(every, [0, 1, 2]), ghost
    elif t == "count":
        out[1] = tokens(every, [FRAMES - 1])
    elif t == "x_count_start":
        out[0] = tokens(every, [0])
    elif t in ("order", "x_order"):
        a, b = sorted(q["objs"], key=lambda k: tracks[k].t_in)
        only_a = [f for f in range(FRAMES) if tracks[a].present(idx[f]) and not tracks[b].present(idx[f])]
        out[0] = tokens([a], only_a)
    del T
    return {h: m for h, m in out.items() if m.any()}


def image_turns(objs, rng: random.Random, max_q: int, n_exists: int, vertical: int = 0) -> list[dict]:
    """Questions of a cached image (``objs``: ``(shape, colour, cx, cy, size)``), at most ``max_q``, plus up to
    ``vertical`` training-only "Is the <colour> <shape> up or down?" (type ``x_vert``, objects named uniquely and
    clearly off the middle): the up / down read that ``move`` needs gets many more examples than moving clips give."""
    from .train import _SceneView

    qs = questions(_SceneView(objs), rng, n_exists=n_exists, extra=True)
    rng.shuffle(qs)
    qs = qs[:max_q]
    names = [(o[1], o[0]) for o in objs]
    cands = [i for i, o in enumerate(objs) if names.count(names[i]) == 1 and abs(o[3] - 0.5) >= 0.08]
    for i in rng.sample(cands, min(vertical, len(cands))):
        shape, color, _, cy, _ = objs[i]
        q = f"Is the {color} {shape} up or down?"
        qs.append({"question": q, "answer": "up" if cy < 0.5 else "down", "type": "x_vert", "obj": i})
    return qs


# --------------------------------------------------------------------------------------------------------- train
class Data:
    """Cached training / evaluation features (memory-mapped shards)."""

    def __init__(self, root: str):
        self.root = os.path.join(root, "feats")
        self.clip_paths: list[str] = []
        self.image_paths: list[str] = []
        self.clip_parts: list[dict] = []
        self.image_parts: list[dict] = []
        self.reload()

    def reload(self) -> bool:
        cp = sorted(glob.glob(os.path.join(self.root, "clips_train_*.pt")))
        ip = sorted(glob.glob(os.path.join(self.root, "images_train_*.pt")))
        grew = len(cp) > len(self.clip_paths) or len(ip) > len(self.image_paths)
        for p in cp[len(self.clip_paths) :]:
            d = torch.load(p, mmap=True, weights_only=False)
            d["lab8"] = pooled_labels(d["labels"])
            self.clip_parts.append(d)
        for p in ip[len(self.image_paths) :]:
            self.image_parts.append(torch.load(p, mmap=True, weights_only=False))
        self.clip_paths, self.image_paths = cp, ip
        self.n_clips = sum(len(d["clips"]) for d in self.clip_parts)
        self.n_images = sum(len(d["objects"]) for d in self.image_parts)
        self.kinds = [m["kind"] for d in self.clip_parts for m in d["clips"]]
        return grew

    def clip_weights(self, weights: dict[str, float]) -> torch.Tensor:
        """``[n_clips]`` sampling weight of each clip by its kind (1 for kinds not named)."""
        return torch.tensor([weights.get(k, 1.0) for k in self.kinds])

    def clip(self, i: int):
        for d in self.clip_parts:
            if i < len(d["clips"]):
                return d["feats"][i], d["labels"][i], d["lab8"][i], d["clips"][i]
            i -= len(d["clips"])
        raise IndexError(i)

    def image(self, i: int):
        for d in self.image_parts:
            if i < len(d["objects"]):
                return d["feats"][i], d["sizes"][i], d["labels"][i], d["objects"][i]
            i -= len(d["objects"])
        raise IndexError(i)


def video_embeds(model, feats: torch.Tensor) -> torch.Tensor:
    """``[B, 8, 256, 384]`` → ``[B, 513, H]`` exactly as ``get_video_features`` (projector, 2×2 pool, newline);
    also returns the pre-pool projected tokens ``[B, 8, 256, H]`` for the auxiliary loss."""
    B = feats.shape[0]
    v = model.model.multi_modal_projector(feats.reshape(B * FRAMES, 256, -1))
    pooled = model.model.apply_pooling(v).reshape(B, FRAMES * 64, -1)
    nl = model.model.image_newline[None, None].expand(B, 1, -1).to(pooled.dtype)
    return torch.cat([pooled, nl], 1), v.reshape(B, FRAMES, 256, -1)


def image_embeds(model, feats: torch.Tensor, sizes: torch.Tensor):
    """``[B, 2, 256, 384]`` + sizes → list of ``[n_b, H]`` as ``get_image_features`` + projected ``[B, 2, 256, H]``."""
    B = feats.shape[0]
    v = model.model.multi_modal_projector(feats.reshape(B * 2, 256, -1)).reshape(B, 2, 256, -1)
    packed, _ = model.model.pack_image_features(
        list(v), sizes, image_newline=model.model.image_newline, vision_aspect_ratio=model.config.vision_aspect_ratio
    )
    return packed, v


def image_token_labels(model, labels: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Object index per image token (``-1`` for newlines / background), in the model's packed order."""
    x = labels.reshape(2, 256, 1).float()
    packed, _ = model.model.pack_image_features([x], size[None], image_newline=torch.tensor([-1.0]))
    return packed[0][:, 0].round().long()


AUGMENT = ("subset", "merge", "local", "mixed")  # method-agnostic layouts (the default of --reduce-methods)


def _groups_layout(m: int, k: int, mode: str, order: torch.Tensor, g: torch.Generator):
    """One segment of ``m`` tokens reduced to ``k`` by a method-agnostic rule: ``(keep [k], weights [k, m])``.

    ``subset``: ``k`` random tokens; ``merge``: ``k`` random groups (each token joins a random one of ``k`` random
    representatives; the representative's slot holds the group's mean); ``local``: ``k`` runs of consecutive tokens
    along ``order`` (a random scan: rows, columns or, across frames, time), cut at random, each at the slot of a
    random member; ``mixed``: a random share of the ``k`` kept alone, the rest of the tokens merged into the others.
    Nothing here looks at the tokens' values, so no evaluated method's choice is imitated."""
    k = max(1, min(k, m))
    if mode == "subset" or k == m:
        keep = torch.randperm(m, generator=g)[:k]
        return keep, F.one_hot(keep, m).float()
    if mode == "local":
        cuts = torch.randperm(m - 1, generator=g)[: k - 1].sort().values + 1
        bounds = [0] + cuts.tolist() + [m]
        keep, w = [], torch.zeros(k, m)
        for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            members = order[a:b]
            keep.append(int(members[torch.randint(0, b - a, (1,), generator=g)]))
            w[j, members] = 1.0 / (b - a)
        return torch.tensor(keep), w
    perm = torch.randperm(m, generator=g)
    alone = 0 if mode == "merge" else int(round(k * (0.3 + 0.5 * torch.rand(1, generator=g).item())))
    alone = min(alone, k - 1)
    reps, rest = perm[:k], perm[k:]
    w = F.one_hot(reps, m).float()
    if len(rest):
        join = alone + torch.randint(0, k - alone, (len(rest),), generator=g)  # the groups that take members
        w[join, rest] = 1.0
    return reps, w / w.sum(1, keepdim=True)


def augment_clip(n_frames: int, cells: int, budget: float, scope: str, mode: str, seed: int):
    """A method-agnostic reduced layout of a clip of ``n_frames × cells`` tokens (``cells`` = 8×8 per frame) at
    ``budget`` of its tokens, per frame (``scope`` ``"frame"``) or over the clip (``"clip"``): ``(keep [K], weights
    [K, N])`` sorted by slot, as :func:`reduce_clip` returns (kept or merged tokens at their original positions)."""
    g = torch.Generator().manual_seed(seed)
    side = int(round(cells**0.5))
    n = n_frames * cells
    grid = torch.arange(n).reshape(n_frames, side, side)
    if scope == "frame":
        segs = [grid[f] for f in range(n_frames)]
    else:
        segs = [grid]
    keep, rows = [], []
    for seg in segs:
        idx = seg.reshape(-1)
        m = idx.numel()
        scan = torch.randint(0, 3 if seg.dim() == 3 else 2, (1,), generator=g).item()
        if scan == 0:  # rows
            order = torch.arange(m)
        elif scan == 1:  # columns
            order = torch.arange(m).reshape(seg.shape).transpose(-1, -2).reshape(-1)
        else:  # time first: a cell across frames, then the next cell
            order = torch.arange(m).reshape(seg.shape[0], -1).T.reshape(-1)
        kk, w = _groups_layout(m, max(1, round(budget * m)), mode, order, g)
        keep.append(idx[kk])
        full = torch.zeros(len(kk), n)
        full[:, idx] = w
        rows.append(full)
    keep, w = torch.cat(keep), torch.cat(rows)
    o = keep.argsort()
    return keep[o], w[o]


def reduce_clip(tokens: torch.Tensor, method: str, budget: float, scope: str, seed: int):
    """What the plugin hands the LLM for one clip at ``budget`` of its tokens: ``tokens`` ``[FRAMES * 64, H]`` (the
    pooled frames, no newline) -> ``(keep [K], weights [K, N])`` — ``method`` on every frame (``scope`` ``"frame"``)
    or on the clip at once (``"clip"``), with the session's segments (:func:`vlm_accel.api.budget_segments`: clip
    methods always take the whole clip) and quotas (:meth:`vlm_accel.Budget.visual_quota`). The kept tokens keep
    their positions. ``method`` in :data:`AUGMENT`: a method-agnostic layout (:func:`augment_clip`) instead."""
    if method in AUGMENT:
        return augment_clip(FRAMES, tokens.shape[0] // FRAMES, budget, scope, method, seed)
    from vlm_accel.adapters import ImageInfo
    from vlm_accel.adapters.base import frame_segments
    from vlm_accel.api import budget_segments
    from vlm_accel.control.budget import Budget
    from vlm_accel.methods import Context, get
    from vlm_accel.methods.batch import reduce_segments

    m, n = get(method), tokens.shape[0]
    info = ImageInfo(n, frame_segments(FRAMES, (8, 8), tokens.device), frames=FRAMES)
    segments = budget_segments(info, scope, m)
    quotas = [Budget(visual=budget).visual_quota(s.idx.numel(), s.units) for s in segments]
    g = torch.Generator().manual_seed(seed)  # one per clip, shared by its segments, as the session's
    ctxs = [Context(grid=s.grid, frames=s.frames, generator=g) for s in segments]
    reds = reduce_segments(m, [tokens[s.idx].float() for s in segments], quotas, ctxs)
    keep, rows = [], []
    for s, red in zip(segments, reds, strict=True):
        keep.append(s.idx[red.keep])
        w = torch.zeros(red.keep.numel(), n)
        w[:, s.idx] = red.weights if red.weights is not None else F.one_hot(red.keep, len(s.idx)).float()
        rows.append(w)
    keep, w = torch.cat(keep), torch.cat(rows)
    order = keep.argsort()
    return keep[order], w[order]


def reduced_clips(vid: torch.Tensor, mask: torch.Tensor, seqs: list, reduce: dict, seed: int):
    """``vid`` ``[B, FRAMES * 64 + 1, H]`` and the block mask ``[B', 1, L, L]`` with clip ``b`` of ``reduce``
    (``b -> (method, budget, scope)``) as the LLM sees it through the plugin: its kept slots hold the kept (merged)
    features, the others — and the trailing newline, which the plugin drops with the pruned tokens of a reduced
    clip (a structural token) — are hidden from every query (the same as removing them: positions are explicit).
    Also returns ``{b: (keep [K], weights [K, N])}`` for :func:`follow_merge`."""
    n = FRAMES * 64
    mask = mask.clone()
    out, kept = [], {}
    for b in range(vid.shape[0]):
        if b not in reduce:
            out.append(vid[b])
            continue
        with torch.no_grad():
            keep, w = reduce_clip(vid[b, :n].detach(), *reduce[b], seed=seed + b)
        kept[b] = keep, w
        merged = (w.to(vid.dtype) @ vid[b, :n]).to(vid.dtype)
        out.append(torch.cat([vid[b, :n].index_copy(0, keep, merged), vid[b, n:]]))
        gone = torch.ones(n + 1, dtype=torch.bool)
        gone[keep] = False
        cols = seqs[b].media_start + gone.nonzero()[:, 0]
        mask[b, 0, :, cols] = False
        mask[b, 0, cols, cols] = True  # a hidden slot attends to itself only (no empty rows; its output is unused)
    return torch.stack(out), mask, kept


def follow_merge(m: torch.Tensor, keep: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """An attention target over a clip's ``FRAMES * 64 + 1`` media slots -> the kept slots whose tokens stand for
    a targeted one (a merged token stands for all its members); never the newline (dropped with the reduction)."""
    n = FRAMES * 64
    hit = ((w > 0) & m[:n][None]).any(1)  # [K]
    out = torch.zeros_like(m)
    out[keep[hit]] = True
    return out


def parse_budgets(text: str) -> list:
    """``"0.5,0.25,0.1"`` (a choice among them) or ``"0.06:0.6"`` (log-uniform in that range)."""
    if ":" in text:
        lo, hi = (float(x) for x in text.split(":"))
        return [(lo, hi)]
    return [float(b) for b in text.split(",") if b]


def draw_budget(rng: random.Random, budgets: list) -> float:
    b = rng.choice(budgets)
    return math.exp(rng.uniform(math.log(b[0]), math.log(b[1]))) if isinstance(b, tuple) else b


def train(args) -> None:
    from transformers import LlavaOnevisionForConditionalGeneration

    from vlm_accel.zoo.onevision import load_processor

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ck_dir = os.path.join(args.root, "ckpt")
    os.makedirs(ck_dir, exist_ok=True)
    init = os.path.join(args.root, "init")
    proc = load_processor(init)
    tok = proc.tokenizer
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    cfg = model.config
    while True:
        data = Data(args.root)
        if data.n_clips:  # images join when their first shard is written
            break
        log.info("waiting for the feature cache (clips %d, images %d)", data.n_clips, data.n_images)
        time.sleep(60)
    log.info("train clips %d, images %d", data.n_clips, data.n_images)
    ev = _load_eval(args.root)
    proj, lm = model.model.multi_modal_projector, model.model.language_model
    emb = lm.embed_tokens
    col_ids = torch.tensor(tok.convert_tokens_to_ids(list(COLOR_NAMES) + ["none"]))
    shp_ids = torch.tensor(tok.convert_tokens_to_ids(list(SHAPES) + ["none"]))
    side_ids = torch.tensor(tok.convert_tokens_to_ids(["left", "right"]))
    vert_ids = torch.tensor(tok.convert_tokens_to_ids(["up", "down"]))
    params = list(proj.parameters()) + list(lm.parameters()) + [model.model.image_newline]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    step = 0
    ck = os.path.join(ck_dir, "last.pt")
    if os.path.exists(ck):
        state = torch.load(ck, weights_only=False)
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log.info("resumed from %s at step %d", ck, step)
    model.train()
    model.model.vision_tower.requires_grad_(False)
    vt = model.model.vision_tower
    tcache: dict[str, list[int]] = {}
    kind_w = dict(kv.split("=") for kv in args.kind_w.split(",")) if args.kind_w else {}
    kind_w = {k: float(v) for k, v in kind_w.items()}
    methods = [m for m in args.reduce_methods.split(",") if m]
    budgets = parse_budgets(args.reduce_budgets)
    last_save, t_log = time.time(), time.time()
    while step < args.steps:
        rng = random.Random(f"{args.seed}-{step}")
        g = torch.Generator().manual_seed(args.seed * 100003 + step)
        ci = torch.multinomial(data.clip_weights(kind_w), args.clips_per_step, True, generator=g).tolist()
        ii = torch.randint(0, max(data.n_images, 1), (args.images_per_step if data.n_images else 0,), generator=g)
        ii = ii.tolist()
        seqs, heads_rows = [], {0: [], 1: [], 2: []}  # head -> [(b, row, mask over the media tokens)]
        answer_w = []
        pos_rows = []  # (b, row, (x, y) target of the answer row's read after the supervised layer; nan: none)
        clips = [data.clip(i) for i in ci]
        clips = [reverse_clip(*c) if c[3]["kind"] in REVERSIBLE and rng.random() < args.reverse_p else c for c in clips]
        cf, cl, c8, cm = zip(*clips, strict=True)
        # reduced layouts: some clips reach the LLM as the plugin hands them over at a reduced budget
        reduce = {
            b: (rng.choice(methods), draw_budget(rng, budgets), rng.choice(("frame", "clip")))
            for b in range(len(ci))
            if args.reduce_p > 0 and rng.random() < args.reduce_p  # (0: the original recipe's random stream)
        }
        for b, (meta, lab8) in enumerate(zip(cm, c8, strict=True)):
            qs = clip_turns(meta, rng)
            rng.shuffle(qs)
            s = Seq(tok, cfg.video_token_index, VIDEO_TOKENS, [(q["question"], q["answer"]) for q in qs], tcache)
            for q, row in zip(qs, s.rows, strict=True):
                for h, m in clip_att_targets(meta, q, lab8).items():
                    heads_rows[h].append((b, row, s.media_start, m))
                if q["answer"] in COLOR_NAMES:
                    answer_w.append((b, row + 1, args.color_w))
                elif q["type"] == "move":
                    answer_w.append((b, row + 1, args.move_w))
                    if args.pos_read > 0:
                        tr, idx = _tracks(meta)[q["objs"][0]], meta["index"]
                        (x0, y0), (x1, y1) = tr.pos(idx[0]), tr.pos(idx[-1])
                        pos_rows.append((b, row, (2 * POS_SCALE * (x1 - x0), 2 * POS_SCALE * (y1 - y0))))
            seqs.append(s)
        imf, ims, iml, imo = zip(*[data.image(i) for i in ii], strict=True) if ii else ((), (), (), ())
        for j, (objs, labs, size) in enumerate(zip(imo, iml, ims, strict=True)):
            b = len(ci) + j
            qs = image_turns(objs, rng, args.max_q, args.n_exists, args.vertical)
            if rng.random() < args.describe_p:
                from vlm_accel.zoo.render import describe

                from .train import _SceneView

                qs.insert(
                    rng.randint(0, len(qs)),
                    {"question": "Describe the image.", "answer": describe(_SceneView(objs)), "type": "describe"},
                )
            tl = image_token_labels(model, labs, size)
            s = Seq(tok, cfg.image_token_index, len(tl), [(q["question"], q["answer"]) for q in qs], tcache)
            for q, row in zip(qs, s.rows, strict=True):
                if q.get("obj", -1) >= 0:  # the late head reads the named object (the early one is free: see pos_rows)
                    m = tl == q["obj"]
                    heads_rows[1].append((b, row, s.media_start, m))
                    if args.pos_read == 0:
                        heads_rows[0].append((b, row, s.media_start, m))
                if q["type"] == "side" and args.pos_read > 0:
                    pos_rows.append((b, row, (POS_SCALE * (2 * objs[q["obj"]][2] - 1), float("nan"))))
                if q["type"] == "x_vert" and args.pos_read > 0:
                    pos_rows.append((b, row, (float("nan"), POS_SCALE * (2 * objs[q["obj"]][3] - 1))))
                words = q["question"].lower().replace("?", " ").split()
                shape = next((w for w in words if w in SHAPES), None)
                if shape is not None:
                    hits = [k for k, o in enumerate(objs) if o[0] == shape]
                    if hits:
                        heads_rows[2].append((b, row, s.media_start, torch.isin(tl, torch.tensor(hits))))
                if q["answer"] in COLOR_NAMES:
                    answer_w.append((b, row + 1, args.color_w))
            seqs.append(s)
        B = len(seqs)
        L = max(len(s.ids) for s in seqs)
        input_ids = torch.full((B, L), tok.pad_token_id)
        tgt = torch.full((B, L), -100)
        seg = torch.full((B, L), -1)
        pos = torch.zeros((B, L), dtype=torch.long)
        for b, s in enumerate(seqs):
            n = len(s.ids)
            input_ids[b, :n], tgt[b, :n] = torch.tensor(s.ids), torch.tensor(s.labels)
            seg[b, :n], pos[b, :n] = torch.tensor(s.seg), torch.tensor(s.pos)
        mask = segment_mask(seg)
        f = min(1.0, (step + 1) / args.warmup)
        if step > args.steps - args.decay:
            f *= max(0.05, (args.steps - step) / args.decay)
        for gr in opt.param_groups:
            gr["lr"] = args.lr * f
        cfeats = torch.stack(cf).float()
        ifeats, isizes = (torch.stack(imf).float(), torch.stack(ims)) if ii else (None, None)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            vid, vraw = video_embeds(model, cfeats)
            if reduce:
                vid, mask, kept = reduced_clips(vid, mask, seqs, reduce, args.seed * 100003 + step)
                for h, rows in heads_rows.items():  # the targets follow the merge (dropped: none left)
                    rows = [(b, r, st, follow_merge(m, *kept[b]) if b in kept else m) for b, r, st, m in rows]
                    heads_rows[h] = [row for row in rows if row[3].any()]
            img, iraw = [], vraw.new_zeros(0, 2, 256, vraw.shape[-1])
            if ii:
                img, iraw = image_embeds(model, ifeats, isizes)
            e = emb(input_ids)
            media = torch.cat([vid.reshape(-1, vid.shape[-1])] + list(img)).to(e.dtype)
            mm = (input_ids == cfg.video_token_index) | (input_ids == cfg.image_token_index)
            e = e.masked_scatter(mm[..., None], media)
            out = lm(inputs_embeds=e, attention_mask=mask, position_ids=pos, output_hidden_states=True)
            logits = model.lm_head(out.last_hidden_state[:, :-1])
        logits = logits.float()
        wts = torch.ones(tgt.shape)
        for b, r, w in answer_w:  # answer-token weights (colour answers, move directions)
            wts[b, r] = w
        wts = wts[:, 1:] * (tgt[:, 1:] != -100)
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1), reduction="none", ignore_index=-100
        )
        loss_qa = (ce * wts.reshape(-1)).sum() / wts.sum()
        # auxiliary: every projected patch token names its object's colour / shape / side / up-down
        la = _aux_loss(emb.weight, vraw.float(), iraw.float(), cl, cm, iml, imo, col_ids, shp_ids, side_ids, vert_ids)
        # attention supervision (layer 2): early / late / shape heads
        latt = []
        for h, rows in heads_rows.items():
            if not rows:
                continue
            tg = []
            for _b, _row, start, m in rows:
                t = torch.zeros(L, dtype=torch.bool)
                t[start : start + len(m)] = m
                tg.append(t)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                latt.append(
                    attention_target_loss(
                        lm,
                        out.hidden_states[args.att_layer],
                        pos,
                        mask,
                        [(b, r) for b, r, _, _ in rows],
                        tg,
                        args.att_layer,
                        [h],
                    )
                )
        loss_att = torch.stack(latt).mean() if latt else torch.zeros(())
        # a temporal head: a token of a later frame attends to its own cell in frame 0 (what was there at the start),
        # so the layers above can see what appeared (own object, background before) and what vanished (background,
        # an object before)
        loss_tmp = torch.zeros(())
        if args.temporal > 0:
            t_layer, t_head = args.temporal_head
            rows, tg = [], []
            for b in (b for b in range(len(ci)) if b not in reduce):
                start = seqs[b].media_start
                frames = torch.randint(1, FRAMES, (args.temporal_rows,), generator=g).tolist()
                cells = torch.randint(0, 64, (args.temporal_rows,), generator=g).tolist()
                for f, c in zip(frames, cells, strict=True):
                    rows.append((b, start + f * 64 + c))
                    t = torch.zeros(L, dtype=torch.bool)
                    t[start + c] = True
                    tg.append(t)
            if rows:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                    loss_tmp = attention_target_loss(
                        lm, out.hidden_states[t_layer], pos, mask, rows, tg, t_layer, [t_head]
                    )
        # the supervised layer's output at the answer row, read along right - left / down - up: a move's displacement
        # (late head minus early head), an image object's side (its position minus the centre)
        loss_pos = torch.zeros(())
        if pos_rows:
            hid = out.hidden_states[args.att_layer + 1].float()
            read = torch.stack([hid[b, r] for b, r, _ in pos_rows]) @ position_dirs(emb.weight, side_ids, vert_ids)
            tgt_xy = torch.tensor([t for _, _, t in pos_rows])
            on = ~tgt_xy.isnan()
            loss_pos = F.smooth_l1_loss(read[on], tgt_xy[on])
        loss = loss_qa + args.aux * la + args.att * loss_att + args.pos_read * loss_pos + args.temporal * loss_tmp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        vt.requires_grad_(False)
        step += 1
        if step % 10 == 0:
            log.info(
                "step %d loss %.4f qa %.4f aux %.4f att %.4f pos %.4f tmp %.4f lr %.2e  %.2f s/step (clips %d, images %d)",  # noqa: E501
                step,
                loss.item(),
                loss_qa.item(),
                la.item(),
                loss_att.item(),
                loss_pos.item(),
                loss_tmp.item(),
                opt.param_groups[0]["lr"],
                (time.time() - t_log) / 10,
                data.n_clips,
                data.n_images,
            )
            t_log = time.time()
        if step % args.reload_every == 0 and data.reload():
            log.info("reloaded shards: clips %d, images %d", data.n_clips, data.n_images)
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate_cached(model, tok, ev)
            log.info("eval step %d: %s", step, " ".join(f"{k}={v:.3f}" for k, v in acc.items()))
            model.train()
        if time.time() - last_save > args.save_every or step == args.steps:
            sd = {k: v for k, v in model.state_dict().items() if not k.startswith("model.vision_tower.")}
            _save({"model": sd, "opt": opt.state_dict(), "step": step, "args": vars(args)}, ck)
            last_save = time.time()
            log.info("saved %s at step %d", ck, step)
        if args.keep_every and step % args.keep_every == 0:
            sd = {k: v for k, v in model.state_dict().items() if not k.startswith("model.vision_tower.")}
            _save({"model": sd, "step": step}, os.path.join(ck_dir, f"step{step:05d}.pt"))


def position_dirs(W: torch.Tensor, side_ids: torch.Tensor, vert_ids: torch.Tensor) -> torch.Tensor:
    """``[H, 2]`` the directions a position is read along: ``right − left`` and ``down − up`` of the (tied) word
    embeddings ``W`` ``[V, H]`` (``side_ids``: left, right; ``vert_ids``: up, down), fp32."""
    return torch.stack([W[side_ids[1]] - W[side_ids[0]], W[vert_ids[1]] - W[vert_ids[0]]], -1).float()


def _aux_loss(W, vraw, iraw, clip_labels, clip_metas, img_labels, img_objs, col_ids, shp_ids, side_ids, vert_ids):
    """Per-patch word classification (colour, shape) of the projected tokens, plus the object's position read along
    the word directions ``right − left`` and ``down − up``: regressed to ``POS_SCALE·(2x − 1)`` (and ``y``), so a
    token says *how far* left or right its object is, not only which half (halves left moves within a half
    unreadable: "move" stayed near chance with the half targets)."""
    ncol, nshp = len(COLOR_NAMES), len(SHAPES)
    toks, col, shp, xs, ys = [], [], [], [], []
    for b, (lab, meta) in enumerate(zip(clip_labels, clip_metas, strict=True)):
        tracks = _tracks(meta)
        lab = lab.long().reshape(FRAMES, 256)
        c = torch.full((FRAMES, 256), ncol, dtype=torch.long)
        s = torch.full((FRAMES, 256), nshp, dtype=torch.long)
        px = torch.full((FRAMES, 256), float("nan"))
        py = torch.full((FRAMES, 256), float("nan"))
        for f, t_idx in enumerate(meta["index"]):
            for k, t in enumerate(tracks):
                m = lab[f] == k
                if not m.any():
                    continue
                x, y = t.pos(t_idx)
                c[f][m] = COLOR_NAMES.index(t.color_at(t_idx))
                s[f][m] = SHAPES.index(t.shape)
                px[f][m], py[f][m] = x, y
        toks.append(vraw[b].reshape(FRAMES * 256, -1))
        col.append(c.reshape(-1))
        shp.append(s.reshape(-1))
        xs.append(px.reshape(-1))
        ys.append(py.reshape(-1))
    for b, (lab, objs) in enumerate(zip(img_labels, img_objs, strict=True)):
        lab = lab.long().reshape(2, 256)
        c = torch.full((2, 256), ncol, dtype=torch.long)
        s = torch.full((2, 256), nshp, dtype=torch.long)
        px = torch.full((2, 256), float("nan"))
        py = torch.full((2, 256), float("nan"))
        for k, (shape, color, cx, cy, _size) in enumerate(objs):
            m = lab == k
            c[m], s[m], px[m], py[m] = COLOR_NAMES.index(color), SHAPES.index(shape), cx, cy
        toks.append(iraw[b].reshape(2 * 256, -1))
        col.append(c.reshape(-1))
        shp.append(s.reshape(-1))
        xs.append(px.reshape(-1))
        ys.append(py.reshape(-1))
    v = torch.cat(toks)
    pos = torch.stack([torch.cat(xs), torch.cat(ys)], -1)  # [T, 2]
    on = ~pos[:, 0].isnan()
    read = v[on] @ position_dirs(W, side_ids, vert_ids)
    return (
        F.cross_entropy(v @ W[col_ids].T, torch.cat(col))
        + F.cross_entropy(v @ W[shp_ids].T, torch.cat(shp))
        + F.smooth_l1_loss(read, POS_SCALE * (2 * pos[on] - 1))
    )


def _load_eval(root: str) -> dict:
    out = {}
    for kind in (*EVAL_SETS, "images"):
        paths = sorted(glob.glob(os.path.join(root, "feats", f"{kind}_eval_*.pt")))
        if paths:
            out[kind] = torch.load(paths[0], weights_only=False)
    return out


@torch.no_grad()
def evaluate_cached(model, tok, ev: dict, n_images: int = 200, reduce: tuple | None = None) -> dict[str, float]:
    """Teacher-forced first-answer-token accuracy on the cached held-out clips (per type) and images (overall).

    ``reduce``: ``(method, budget, scope)`` — the clips as the plugin hands them to the LLM (:func:`reduce_clip`:
    kept or merged tokens at their original positions, no newline); images are then skipped."""
    model.eval()
    cfg = model.config
    lm = model.model.language_model
    hits: dict[str, list[int]] = {}
    cache: dict = {}

    def run(feats_fn, items, media_id, key_fn):
        for s0 in range(0, len(items), 16):
            chunk = items[s0 : s0 + 16]
            media = [m.float() for m in feats_fn(s0, s0 + len(chunk))]
            full = [len(m) for m in media]  # media tokens of the full layout
            places = [torch.arange(len(m)) for m in media]  # each media token's offset in it
            if reduce is not None:
                for b, m in enumerate(media):
                    keep, w = reduce_clip(m[:-1], *reduce, seed=s0 + b)
                    media[b], places[b] = w @ m[:-1], keep
            seqs, poss = [], []
            for it, m, pl, n_full in zip(chunk, media, places, full, strict=True):
                sq = Seq(tok, media_id, len(m), [(it["question"], "")], cache)
                start = sq.media_start
                text = len(sq.ids) - 1 - start - len(m)
                seqs.append(sq.ids[:-1])
                poss.append(
                    list(range(start)) + (start + pl).tolist() + list(range(start + n_full, start + n_full + text))
                )
            L = max(len(x) for x in seqs)
            ids = torch.full((len(chunk), L), tok.pad_token_id)
            att = torch.zeros((len(chunk), L), dtype=torch.long)
            p = torch.zeros((len(chunk), L), dtype=torch.long)
            for b, (x, ps) in enumerate(zip(seqs, poss, strict=True)):
                ids[b, L - len(x) :], att[b, L - len(x) :], p[b, L - len(x) :] = torch.tensor(x), 1, torch.tensor(ps)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                e = lm.embed_tokens(ids)
                e = e.masked_scatter((ids == media_id)[..., None], torch.cat(media).to(e.dtype))
                h = lm(inputs_embeds=e, attention_mask=att, position_ids=p).last_hidden_state[:, -1]
                pred = model.lm_head(h).float().argmax(-1)
            for it, pr in zip(chunk, pred.tolist(), strict=True):
                first = tok(it["answer"], add_special_tokens=False)["input_ids"][0]
                hits.setdefault(key_fn(it), []).append(int(pr == first))

    groups: dict[str, list[str]] = {}  # summary name -> its per-type keys
    for kind in EVAL_SETS:
        if kind in ev:
            f = ev[kind]["feats"]
            pre = "" if kind == "clips" else f"{kind}_"
            run(
                lambda a, b, f=f: list(video_embeds(model, f[a:b].float())[0]),
                ev[kind]["items"],
                cfg.video_token_index,
                lambda it, pre=pre: pre + it["type"],
            )
            groups[kind] = [pre + t for t in {it["type"] for it in ev[kind]["items"]}]
    if "images" in ev and reduce is None:
        d = ev["images"]
        items = d["items"][:n_images]
        run(
            lambda a, b: image_embeds(model, d["feats"][a:b].float(), d["sizes"][a:b])[0],
            items,
            cfg.image_token_index,
            lambda it: "img_" + it["type"],
        )
        groups["images"] = ["img_" + t for t in {it["type"] for it in items}]
    acc = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    for name, keys in groups.items():
        keys = [k for k in keys if k in hits]
        acc[name] = sum(sum(hits[k]) for k in keys) / max(sum(len(hits[k]) for k in keys), 1)
    return acc


# -------------------------------------------------------------------------------------------------------- export
def export(args) -> None:
    """Write the checkpoint's weights (fp16 safetensors) + processor files to ``args.out``."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from vlm_accel.zoo.onevision import load_processor, save_processor

    init = os.path.join(args.root, "init")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    src = args.ckpt or os.path.join(args.root, "ckpt", "last.pt")
    state = torch.load(src, weights_only=False)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if unexpected or any(not k.startswith("model.vision_tower.") for k in missing if k != "lm_head.weight"):
        raise RuntimeError(f"checkpoint does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")
    model = model.to(torch.float16)
    model.config.dtype = "float16"
    model.save_pretrained(args.out)
    save_processor(load_processor(init), args.out)
    log.info("exported step %d to %s", state["step"], args.out)


def evaluate_checkpoints(args) -> None:
    """Teacher-forced accuracy of checkpoints, per question type, on ``--clips`` held-out clips of ``--seed`` from
    each set of ``--sets`` (:data:`EVAL_SETS`: ``clips`` the training renderer, ``clips2`` the second renderer,
    ``clipsv`` the varied split) and ``--images`` held-out images (seed 0); features cached once under
    ``ROOT/feats`` (seed 1 and 300 clips: the set the README's third-session table uses). A checkpoint argument may
    also be an exported model directory (e.g. ``vlm_accel/zoo/default``)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from vlm_accel.zoo.onevision import load_processor

    torch.set_num_threads(args.threads)
    init = os.path.join(args.root, "init")
    tower = None
    ev = {}
    for kind in args.sets.split(","):
        path = os.path.join(args.root, "feats", f"{kind}_eval_s{args.seed}_n{args.clips}.pt")
        if not os.path.exists(path):
            tower = tower or Tower(init)
            cache_eval_clips(tower, args.root, args.clips, seed=args.seed, kind=kind)
        ev[kind] = torch.load(path, weights_only=False)
    if args.images:
        path = os.path.join(args.root, "feats", f"images_eval_s0_n{args.images}.pt")
        if not os.path.exists(path):
            cache_eval_images(tower or Tower(init), args.root, args.images)
        ev["images"] = torch.load(path, weights_only=False)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    tok = load_processor(init).tokenizer
    for ck in args.ckpt:
        if os.path.isdir(ck):
            m = LlavaOnevisionForConditionalGeneration.from_pretrained(ck, dtype=torch.float32)
            state = {"model": m.state_dict(), "step": -1}
        else:
            state = torch.load(ck, weights_only=False)
        model.load_state_dict(state["model"], strict=False)
        for red in [None] + [(m, float(b), sc) for m, b, sc in args.reduce or []]:
            acc = evaluate_cached(model, tok, ev, n_images=args.images, reduce=red)
            what = "full" if red is None else "{}@{}/{}".format(*red)
            log.info("%s step %d %s: %s", ck, state["step"], what, " ".join(f"{k}={v:.3f}" for k, v in acc.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = ap.add_subparsers(dest="cmd", required=True)
    c = sp.add_parser("cache")
    c.add_argument("--root", default=ROOT)
    c.add_argument("--clips", type=int, default=8000)
    c.add_argument("--images", type=int, default=3000)
    c.add_argument("--eval-clips", type=int, default=300)
    c.add_argument("--eval-images", type=int, default=250)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--vary-p", type=float, default=0.0, help="share of training clips from the varied split")
    c.add_argument("--eval-sets", default="clips", help="held-out clip sets to cache: clips, clips2, clipsv")
    t = sp.add_parser("train")
    t.add_argument("--root", default=ROOT)
    t.add_argument("--steps", type=int, default=3450)
    t.add_argument("--clips-per-step", type=int, default=12)
    t.add_argument("--images-per-step", type=int, default=4)
    t.add_argument("--lr", type=float, default=7e-4)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--decay", type=int, default=350)
    t.add_argument("--aux", type=float, default=0.3)
    t.add_argument("--att", type=float, default=0.3)
    t.add_argument("--att-layer", type=int, default=2)
    t.add_argument("--color-w", type=float, default=2.0)
    t.add_argument("--move-w", type=float, default=2.0, help="loss weight of move answers")
    t.add_argument("--reverse-p", type=float, default=0.5, help="reverse a move / appear / disappear / change clip")
    t.add_argument(
        "--kind-w", default="move=2,appear=1.5,change=1.5,disappear=1.2", help="clip sampling weights by kind"
    )
    t.add_argument("--pos-read", type=float, default=0.5, help="weight of the answer-row position read (0: off)")
    t.add_argument("--temporal", type=float, default=0.3, help="weight of the temporal head's attention (0: off)")
    t.add_argument("--temporal-head", type=int, nargs=2, default=(0, 3), help="its layer and head")
    t.add_argument("--temporal-rows", type=int, default=32, help="video tokens supervised per clip and step")
    t.add_argument("--reduce-p", type=float, default=0.0, help="share of clips seen in a reduced layout (0: off)")
    t.add_argument(
        "--reduce-methods",
        default=",".join(AUGMENT),
        help="how they are reduced: method-agnostic layouts (subset, merge, local, mixed: the default; no evaluated "
        "method's output) or plugin method names (the shipped step-4550 fine-tune used temporal,tome,random)",
    )
    t.add_argument(
        "--reduce-budgets", default="0.06:0.6", help="budgets: 'lo:hi' log-uniform, or a list like 0.5,0.25,0.1"
    )
    t.add_argument("--vertical", type=int, default=2, help="training-only up / down questions per image")
    t.add_argument("--max-q", type=int, default=10)
    t.add_argument("--n-exists", type=int, default=2)
    t.add_argument("--describe-p", type=float, default=0.3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--no-bf16", dest="bf16", action="store_false")
    t.add_argument("--reload-every", type=int, default=50)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--save-every", type=float, default=240)
    t.add_argument("--keep-every", type=int, default=500, help="also keep stepNNNNN.pt every N steps (0: never)")
    e = sp.add_parser("export")
    e.add_argument("--root", default=ROOT)
    e.add_argument("--ckpt", default=None, help="checkpoint file (default ROOT/ckpt/last.pt)")
    e.add_argument("--out", required=True)
    v = sp.add_parser("eval")
    v.add_argument("--root", default=ROOT)
    v.add_argument("--clips", type=int, default=300)
    v.add_argument("--seed", type=int, default=1)
    v.add_argument("--sets", default="clips,clips2", help="held-out clip sets: clips, clips2, clipsv")
    v.add_argument("--images", type=int, default=250, help="held-out images (0: none)")
    v.add_argument("--threads", type=int, default=1)
    v.add_argument(
        "--reduce", nargs=3, action="append", metavar=("METHOD", "BUDGET", "SCOPE"), help="also: reduced clips"
    )
    v.add_argument("ckpt", nargs="+", help="checkpoint files (ROOT/ckpt/*.pt)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.cmd == "cache":
        cache(args)
    elif args.cmd == "train":
        train(args)
    elif args.cmd == "eval":
        evaluate_checkpoints(args)
    else:
        export(args)


if __name__ == "__main__":
    main()
