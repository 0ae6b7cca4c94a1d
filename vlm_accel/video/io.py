"""Video loading: decord first, PyAV as fallback; uniform or fps sampling; clear errors for bad files."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class Video:
    """Sampled frames of a video file.

    Attributes:
        frames: ``[T, H, W, 3]`` uint8 RGB.
        timestamps: ``[T]`` seconds of each sampled frame.
        fps: the file's frame rate.
        path: where it came from.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    fps: float
    path: str

    def __len__(self) -> int:
        return len(self.frames)

    def images(self):
        """The frames as a list of ``PIL.Image``."""
        from PIL import Image

        return [Image.fromarray(f) for f in self.frames]


def check_sampling(num_frames=None, fps=None) -> tuple[int | None, float | None]:
    """Validate ``num_frames`` (an int >= 1, or ``None``) and ``fps`` (a finite number > 0, or ``None``) before any
    file is touched; returns them as ``(int | None, float | None)``. ``ValueError`` / ``TypeError`` say what to pass."""
    if num_frames is not None:
        if isinstance(num_frames, (bool, np.bool_)) or not isinstance(num_frames, (int, np.integer)):
            raise TypeError(f"num_frames must be a whole number >= 1, got {num_frames!r}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        num_frames = int(num_frames)
    if fps is not None:
        if isinstance(fps, (bool, np.bool_)) or not isinstance(fps, (int, float, np.integer, np.floating)):
            raise TypeError(f"fps must be a number > 0 (frames sampled per second), got {fps!r}")
        if not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"fps must be a finite number > 0 (frames sampled per second), got {fps}")
        fps = float(fps)
    return num_frames, fps


def sample_indices(
    total: int, fps: float, num_frames: int | None = None, sample_fps: float | None = None
) -> np.ndarray:
    """Frame indices to decode: ``num_frames`` uniformly spaced (segment centres) or one every ``1 / sample_fps`` s."""
    num_frames, sample_fps = check_sampling(num_frames, sample_fps)
    if total <= 0:
        raise ValueError("video has no frames")
    if sample_fps is not None:
        if sample_fps <= 0:
            raise ValueError(f"fps must be > 0, got {sample_fps}")
        step = max(fps / sample_fps, 1.0)
        idx = np.arange(0, total, step)
        if num_frames is not None and len(idx) > num_frames:  # fps sampling capped at num_frames, uniformly
            idx = idx[np.linspace(0, len(idx) - 1, num_frames).round().astype(int)]
        return np.unique(idx.round().astype(int).clip(0, total - 1))
    n = 8 if num_frames is None else num_frames
    if n <= 0:
        raise ValueError(f"num_frames must be >= 1, got {n}")
    return np.unique(((np.arange(n) + 0.5) * total / n).astype(int).clip(0, total - 1))


def _load_decord(path: str, num_frames, sample_fps) -> Video:
    import decord

    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    total, fps = len(vr), float(vr.get_avg_fps() or 25.0)
    idx = sample_indices(total, fps, num_frames, sample_fps)
    frames = vr.get_batch(list(idx)).asnumpy()
    return Video(frames, idx / fps, fps, path)


def _load_av(path: str, num_frames, sample_fps) -> Video:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 25.0)
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    idx = sample_indices(len(decoded), fps, num_frames, sample_fps)
    return Video(np.stack([decoded[i] for i in idx]), idx / fps, fps, path)


def load(path: str | os.PathLike, num_frames: int | None = None, fps: float | None = None) -> Video:
    """Decode a video file into sampled RGB frames.

    Args:
        path: a video file readable by decord or PyAV (mp4, avi, mkv, webm, ...).
        num_frames: frames to sample uniformly over the whole clip (default 8 when ``fps`` is not given); with
            ``fps``, the most frames to keep.
        fps: sample one frame every ``1 / fps`` seconds instead.

    Raises:
        ValueError: the file is missing, empty, unreadable or not a video (the message names the file), or
            ``num_frames`` < 1 / ``fps`` <= 0 (checked first).
        TypeError: ``num_frames`` is not a whole number, or ``fps`` not a number.
    """
    num_frames, fps = check_sampling(num_frames, fps)
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"video not found: {p}")
    if p.stat().st_size == 0:
        raise ValueError(f"video file is empty: {p}")
    errors = []
    for loader in (_load_decord, _load_av):
        try:
            video = loader(str(p), num_frames, fps)
        except ImportError as e:
            errors.append(f"{loader.__name__[6:]} not installed ({e})")
            continue
        except Exception as e:  # decoders raise many types for bad data
            errors.append(f"{loader.__name__[6:]}: {type(e).__name__}: {e}")
            continue
        if len(video) == 0:
            errors.append(f"{loader.__name__[6:]}: no frames decoded")
            continue
        return video
    raise ValueError(f"cannot read video {p}: " + "; ".join(errors))
