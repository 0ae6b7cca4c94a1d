"""Question-aware frame selection before the vision tower: score low-resolution candidate frames against the question
with a small CLIP and keep ``k`` that balance relevance and temporal coverage.

The rule (:func:`pick`) is Adaptive Keyframe Sampling, "judge and split" — X. Tang, J. Qiu, L. Xie, Y. Tian,
J. Jiao, Q. Ye, *Adaptive Keyframe Sampling for Long Video Understanding*, CVPR 2025 (arXiv:2502.21271), as in
their code (github.com/ncTimTang/AKS, ``frame_select.py``): scores are min-max normalised over the video; a segment
that must give ``m`` frames keeps its top ``m`` when their mean exceeds the segment's mean by more than a threshold
(default 0.8, theirs) — relevance — and is otherwise split into halves that give ``m / 2`` each — coverage. Where
their code stops at a fixed depth and gives each leaf ``int(m / 2**depth)`` frames (which can be zero), here the
recursion stops when a segment gives one frame (its best) or has no more frames than it must give, and an odd
``m`` sends the extra frame to the half whose top scores are higher (and moves the cut so that each part's length
follows its share), so exactly ``k`` frames come back. Ties go to the frame nearest the segment's middle, so flat
scores give uniform coverage.

The default scorer is the embedded tiny CLIP (``vlm_accel/zoo/clip``, open_clip format, trained on the renderer's
frames by ``training/tiny_clip.py``), loaded through open_clip's own API by :func:`load_clip`; open_clip is
imported only when a scorer is loaded.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import Video, sample_indices

DEFAULT_CLIP = Path(__file__).resolve().parent.parent / "zoo" / "clip"
THRESHOLD = 0.8  # AKS t1: normalised top-m mean minus segment mean above which a segment keeps its top m
CANDIDATES = 256  # candidate frames scored per video (uniformly spread) unless told otherwise
BATCH = 32  # candidate frames decoded and encoded at a time (memory is bounded by this, not by the video)


# ------------------------------------------------------------------------------------------------ the rule
def pick(scores, k: int, threshold: float = THRESHOLD, max_depth: int | None = None) -> np.ndarray:
    """Choose ``k`` of ``len(scores)`` frames by AKS judge-and-split (see the module docstring).

    Args:
        scores: ``[N]`` relevance of each candidate frame to the question, in temporal order (any scale).
        k: frames to keep (``k >= N`` keeps all).
        threshold: how far (in min-max normalised units) a segment's top-``m`` mean must exceed its mean for the
            segment to keep its top ``m`` instead of splitting; above 1 never (pure coverage: the best frame of each
            of ``k`` equal parts), 0 always at the top level (plain top-``k``).
        max_depth: stop splitting at this depth and take the top frames of each segment (default: no limit).

    Returns:
        sorted positions into ``scores`` (``int64``), ``min(k, N)`` of them.

    Raises:
        ValueError: ``k < 1``, empty or non-finite scores.
    """
    k = _check_k(k)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("no scores to pick from")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    n = s.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    span = s.max() - s.min()
    z = (s - s.min()) / span if span > 0 else np.zeros(n)
    out: list[int] = []

    def top(a: int, b: int, m: int) -> list[int]:
        mid = (a + b - 1) / 2
        return sorted(range(a, b), key=lambda i: (-z[i], abs(i - mid), i))[:m]

    def top_mean(a: int, b: int, m: int) -> float:
        return float(np.sort(z[a:b])[-m:].mean()) if b > a and m > 0 else -1.0

    def rec(a: int, b: int, m: int, depth: int) -> None:
        if m <= 0 or b <= a:
            return
        if b - a <= m:
            out.extend(range(a, b))
            return
        if m == 1 or (max_depth is not None and depth >= max_depth):
            out.extend(top(a, b, m))
            return
        if top_mean(a, b, m) - float(z[a:b].mean()) > threshold:  # judge: the segment's best stand out
            out.extend(top(a, b, m))
            return
        c = (a + b) // 2  # split: coverage
        m1 = m2 = m // 2
        if m % 2:  # the extra frame goes to the half whose best frames score higher; the cut follows the shares
            if top_mean(a, c, m1 + 1) >= top_mean(c, b, m2 + 1):
                m1 += 1
            else:
                m2 += 1
            c = a + round((b - a) * m1 / m)
        if m1 > c - a:
            m1, m2 = c - a, m2 + m1 - (c - a)
        if m2 > b - c:
            m1, m2 = m1 + m2 - (b - c), b - c
        rec(a, c, m1, depth + 1)
        rec(c, b, m2, depth + 1)

    rec(0, n, k, 0)
    return np.array(sorted(out), dtype=np.int64)


def _check_k(k) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be a whole number >= 1, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def _check_question(question) -> str:
    if not isinstance(question, str):
        raise TypeError(f"question must be a string, got {type(question).__name__}")
    if not re.search(r"[^\W_]", question):
        raise ValueError(f"question has no words to match frames against: {question!r}")
    return question


# ------------------------------------------------------------------------------------------------ scorers
class ClipScorer:
    """An open_clip model with its tokenizer and preprocessing.

    ``encode_image(frames)`` takes ``[N, H, W, 3]`` uint8 frames (squashed to ``image_size``, normalised with the
    model's mean / std) or an already preprocessed ``[N, 3, S, S]`` float tensor; ``encode_text(texts)`` a list of
    strings. Both return L2-normalised ``[N, D]`` float tensors. ``model``, ``tokenizer`` and ``name`` are open_clip's.
    """

    def __init__(self, model, tokenizer, name: str | None = None, device="cpu"):
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))

    def preprocess(self, frames: np.ndarray):
        import torch

        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        s = self.image_size
        if frames.shape[1:3] != (s, s):
            frames = np.stack([resize(f, s) for f in frames])
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    def encode_image(self, frames):
        import torch

        x = frames if isinstance(frames, torch.Tensor) and frames.is_floating_point() else self.preprocess(frames)
        with torch.inference_mode():
            return self.model.encode_image(x.to(self.device), normalize=True).float().cpu()

    def encode_text(self, texts):
        import torch

        texts = [texts] if isinstance(texts, str) else list(texts)
        with torch.inference_mode():
            return self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True).float().cpu()

    def __repr__(self) -> str:
        return f"ClipScorer({self.name or type(self.model).__name__}, image_size={self.image_size})"


def _is_config(path: Path) -> bool:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and all(key in cfg for key in ("embed_dim", "vision_cfg", "text_cfg"))


_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors")


def load_clip(path: str | os.PathLike | None = None, name: str | None = None, device="cpu") -> ClipScorer:
    """Load an open_clip model from local files through open_clip's own API (``add_model_config``,
    ``create_model_and_transforms``, ``get_tokenizer``); nothing is downloaded.

    Args:
        path: ``None`` for the embedded tiny CLIP (``vlm_accel/zoo/clip``); a folder holding an open_clip model
            config (``NAME.json`` with ``embed_dim``, ``vision_cfg``, ``text_cfg``) and its weights
            (``*.safetensors``, ``*.bin``, ``*.pt`` or ``*.pth``); or a weights file (its architecture is ``name``,
            or a config JSON beside it).
        name: the open_clip architecture (a built-in one such as ``"ViT-B-32"``, or the stem of a config in the
            folder); default: the folder's only config.
        device: where the model runs.

    Returns:
        a :class:`ClipScorer` (``encode_image`` / ``encode_text``).

    Raises:
        ValueError: no such file, no weights or no config found.
    """
    import open_clip

    p = Path(DEFAULT_CLIP if path is None else path).expanduser()
    if not p.exists():
        raise ValueError(f"open_clip model not found: {p}")
    folder = p if p.is_dir() else p.parent
    configs = sorted(c for c in folder.glob("*.json") if _is_config(c))
    for c in configs:  # each config file (open_clip would parse every JSON of a folder)
        open_clip.add_model_config(str(c))
    if p.is_dir():
        weights = [folder / w for w in _WEIGHT_NAMES if (folder / w).is_file()]
        weights += sorted(x for ext in ("safetensors", "bin", "pt", "pth") for x in folder.glob(f"*.{ext}"))
        if not weights:
            raise ValueError(f"no open_clip weights (*.safetensors, *.bin, *.pt, *.pth) in {folder}")
        weights = weights[0]
    else:
        weights = p
    if name is None:
        if len(configs) != 1:
            found = [c.name for c in configs] or "none"
            raise ValueError(f"say which open_clip architecture (name=...) the weights {weights} are; configs: {found}")
        name = configs[0].stem
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {name!r}: put its NAME.json beside the weights")
    model, _, _ = open_clip.create_model_and_transforms(
        name, pretrained=str(weights), device=device, image_resize_mode="squash"
    )
    return ClipScorer(model, open_clip.get_tokenizer(name), name=name, device=device)


@functools.lru_cache(maxsize=1)
def _default_scorer() -> ClipScorer:
    return load_clip()


def as_scorer(scorer=None):
    """``None`` -> the embedded tiny CLIP; a path -> :func:`load_clip`; ``(name, path)`` -> ``load_clip(path, name)``;
    a bare open_clip model -> wrapped with open_clip's default tokenizer; any object with ``encode_image`` /
    ``encode_text`` as is."""
    if scorer is None:
        return _default_scorer()
    if isinstance(scorer, (str, os.PathLike)):
        return load_clip(scorer)
    if isinstance(scorer, tuple) and len(scorer) == 2 and isinstance(scorer[0], str):
        return load_clip(scorer[1], name=scorer[0])
    if hasattr(scorer, "visual") and hasattr(scorer, "logit_scale") and hasattr(scorer, "encode_text"):
        from open_clip.tokenizer import SimpleTokenizer

        return ClipScorer(scorer, SimpleTokenizer(context_length=getattr(scorer, "context_length", 77)))
    if hasattr(scorer, "encode_image") and hasattr(scorer, "encode_text"):
        return scorer
    raise TypeError(
        "scorer must be None (the embedded tiny CLIP), a path to open_clip weights, (name, path), an open_clip "
        f"model or an object with encode_image / encode_text; got {type(scorer).__name__}"
    )


# ------------------------------------------------------------------------------------------------ decoding
def resize(frame: np.ndarray, size: int) -> np.ndarray:
    """Squash one ``[H, W, 3]`` uint8 frame to ``[size, size, 3]`` (bilinear, antialiased)."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(frame)).resize((size, size), Image.BILINEAR))


def probe(video) -> tuple[int, float]:
    """``(frames, fps)`` of a path, :class:`Video` or ``[T, H, W, 3]`` array, without decoding frames."""
    if isinstance(video, Video):
        return len(video), float(video.fps)
    if isinstance(video, (str, os.PathLike)):
        p = _check_path(video)
        try:
            import decord

            vr = decord.VideoReader(str(p), ctx=decord.cpu(0), num_threads=1)
            return len(vr), float(vr.get_avg_fps() or 25.0)
        except ImportError:
            pass
        except Exception:  # decord failed on this file: PyAV may still read it
            pass
        return _probe_av(str(p))
    arr = _check_array(video)
    return len(arr), 25.0


def _check_path(path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"video not found: {p}")
    if p.stat().st_size == 0:
        raise ValueError(f"video file is empty: {p}")
    return p


def _check_array(video) -> np.ndarray:
    arr = video if isinstance(video, np.ndarray) else np.asarray(video)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"video array must be [T, H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"video array must be uint8, got {arr.dtype}")
    if len(arr) == 0:
        raise ValueError("video has no frames")
    return arr


def _probe_av(path: str) -> tuple[int, float]:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 25.0)
        total = int(stream.frames or 0)
        if total <= 0:  # container does not say: count packets (no decoding)
            total = sum(1 for packet in container.demux(stream) if packet.size)
    if total <= 0:
        raise ValueError(f"video has no frames: {path}")
    return total, fps


def iter_frames(
    video, indices: Sequence[int], size: int, batch: int = BATCH
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices, frames [n, size, size, 3] uint8)`` chunks of at most ``batch`` of the given (sorted) frame
    indices, squashed to ``size`` as they are decoded: decord decodes at that size and seeks to each chunk; PyAV
    (the fallback) decodes in order, seeking past gaps, and keeps only the wanted frames, shrunk; an array or
    :class:`Video` is shrunk a chunk at a time. Memory is bounded by ``batch`` frames, not by the video's length."""
    idx = np.asarray(indices, dtype=np.int64)
    if isinstance(video, Video):
        video = video.frames
    if isinstance(video, (str, os.PathLike)):
        path = str(_check_path(video))
        try:
            yield from _iter_decord(path, idx, size, batch)
            return
        except ImportError:
            pass
        yield from _iter_av(path, idx, size, batch)
        return
    arr = _check_array(video)
    for i in range(0, len(idx), batch):
        chunk = idx[i : i + batch]
        yield chunk, np.stack([resize(arr[j], size) for j in chunk.tolist()])


def _iter_decord(path: str, idx: np.ndarray, size: int, batch: int):
    import decord

    vr = decord.VideoReader(path, ctx=decord.cpu(0), width=size, height=size, num_threads=1)
    for i in range(0, len(idx), batch):
        chunk = idx[i : i + batch]
        yield chunk, vr.get_batch(chunk.tolist()).asnumpy()


def _iter_av(path: str, idx: np.ndarray, size: int, batch: int, seek_gap: int = 64):
    import av

    wanted = idx.tolist()
    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 25.0)
        tb = float(stream.time_base) if stream.time_base else 1.0 / fps
        start = stream.start_time or 0
        buf_i: list[int] = []
        buf_f: list[np.ndarray] = []
        w = 0  # next wanted position in `wanted`
        pos = -1  # index of the last decoded frame
        while w < len(wanted):
            target = wanted[w]
            if target - pos > seek_gap:  # jump to the keyframe before the target instead of decoding the gap
                container.seek(start + int(target / fps / tb), stream=stream, backward=True, any_frame=False)
            got = took = False
            for frame in container.decode(stream):
                got = True
                pos = round((frame.pts - start) * tb * fps) if frame.pts is not None else pos + 1
                while w < len(wanted) and wanted[w] < pos:  # missing in the file: take the next frame there is
                    wanted[w] = pos
                if w < len(wanted) and pos == wanted[w]:
                    img = frame.to_ndarray(format="rgb24", width=size, height=size)
                    while w < len(wanted) and wanted[w] == pos:
                        buf_i.append(pos)
                        buf_f.append(img)
                        w += 1
                    took = True
                    if len(buf_i) >= batch:
                        yield np.array(buf_i), np.stack(buf_f)
                        buf_i, buf_f = [], []
                if w >= len(wanted) or (took and wanted[w] - pos > seek_gap):  # seek only once a target is in
                    break
            if not got:  # past the end
                break
        if buf_i:
            yield np.array(buf_i), np.stack(buf_f)


# ------------------------------------------------------------------------------------------------ selection
@dataclass
class Selection:
    """What :func:`select_frames` chose.

    Attributes:
        indices: ``[k]`` sorted frame indices into the video (file frame numbers for a path; positions in
            ``frames`` for a :class:`Video` or an array).
        scores: ``[N]`` relevance (cosine similarity to the question) of each candidate frame.
        candidates: ``[N]`` sorted frame indices that were scored.
        total: frames in the video.
        fps: its frame rate (25 for a bare array).
    """

    indices: np.ndarray
    scores: np.ndarray
    candidates: np.ndarray
    total: int
    fps: float

    @property
    def timestamps(self) -> np.ndarray:
        """Seconds of the selected frames."""
        return self.indices / self.fps

    @property
    def selected_scores(self) -> np.ndarray:
        """Scores of the selected frames."""
        return self.scores[np.searchsorted(self.candidates, self.indices)]


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def score_frames(video, question: str, scorer=None, candidates=CANDIDATES, batch: int = BATCH):
    """``(candidate indices [N], scores [N])``: cosine similarity of each candidate frame to ``question``, decoded
    and encoded ``batch`` frames at a time at the scorer's resolution. ``candidates``: how many frames, spread
    uniformly (segment centres), or the frame indices themselves."""
    question = _check_question(question)
    total, fps = probe(video)
    if isinstance(candidates, (int, np.integer)) and not isinstance(candidates, bool):
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        cand = np.arange(total) if candidates >= total else sample_indices(total, fps, int(candidates))
    else:
        cand = np.unique(np.asarray(candidates, dtype=np.int64))
        if cand.size == 0 or cand[0] < 0 or cand[-1] >= total:
            raise ValueError(f"candidate frame indices must lie in [0, {total}); got {candidates!r}")
    sc = as_scorer(scorer)
    size = int(getattr(sc, "image_size", 224))
    t = _to_numpy(sc.encode_text([question]))[0]
    t = t / (np.linalg.norm(t) + 1e-12)
    got_i, got_s = [], []
    for chunk, frames in iter_frames(video, cand, size, batch):
        f = _to_numpy(sc.encode_image(frames))
        f = f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-12)
        got_i.append(chunk)
        got_s.append(f @ t)
    idx = np.concatenate(got_i) if got_i else np.zeros(0, np.int64)
    scores = np.concatenate(got_s) if got_s else np.zeros(0, np.float32)
    return idx, scores


def select_frames(
    video,
    question: str,
    k: int,
    scorer=None,
    candidates=CANDIDATES,
    threshold: float = THRESHOLD,
    batch: int = BATCH,
) -> Selection:
    """Pick ``k`` frames of ``video`` for ``question``: relevance to the question and coverage of the video (AKS,
    :func:`pick`).

    Args:
        video: a video file path (decord, else PyAV; decoded at the scorer's low resolution with seeking, never
            whole at full size), a :class:`~vlm_accel.video.Video`, or a ``[T, H, W, 3]`` uint8 array (a
            ``np.memmap`` works: frames are read a chunk at a time).
        question: the question (must contain a word).
        k: frames to keep. A video with ``k`` frames or fewer gives all of them (there are no more to give).
        scorer: ``None`` for the embedded tiny CLIP; a folder / weights path of a local open_clip model; an
            ``(open_clip model name, local checkpoint path)`` pair; an open_clip model; or any object with
            ``encode_image(frames [n, S, S, 3] uint8)`` and ``encode_text(list[str])`` (and optionally
            ``image_size``, the ``S`` to decode at; default 224).
        candidates: how many frames to score, spread uniformly (at least ``k`` are scored), or their indices.
        threshold: AKS's judge threshold (see :func:`pick`).
        batch: frames decoded and encoded at a time (bounds memory).

    Returns:
        a :class:`Selection`: ``indices`` (sorted frame indices), ``scores`` / ``candidates`` (every scored frame).

    Raises:
        ValueError: a question with no words, ``k < 1``, a missing / empty / unreadable video, a malformed array.
        TypeError: ``k`` not a whole number, ``question`` not a string, an unusable ``scorer``.
    """
    question = _check_question(question)
    k = _check_k(k)
    total, fps = probe(video)
    if isinstance(candidates, (int, np.integer)) and not isinstance(candidates, bool):
        candidates = max(int(candidates), k)
    cand, scores = score_frames(video, question, scorer, candidates, batch)
    if len(cand) == 0:
        raise ValueError("no frames could be decoded from the video")
    chosen = pick(scores, k, threshold)
    return Selection(cand[chosen], scores, cand, total, fps)


__all__ = [
    "DEFAULT_CLIP",
    "ClipScorer",
    "Selection",
    "as_scorer",
    "iter_frames",
    "load_clip",
    "pick",
    "probe",
    "score_frames",
    "select_frames",
]
