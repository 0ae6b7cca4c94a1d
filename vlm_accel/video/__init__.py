"""Video: loading (decord, PyAV fallback), question-aware frame selection, streaming sessions."""

from .io import Video, load, sample_indices
from .select import Selection, load_clip, pick, select_frames
from .stream import StreamSession, ask_video, stream

__all__ = [
    "Selection",
    "StreamSession",
    "Video",
    "ask_video",
    "load",
    "load_clip",
    "pick",
    "sample_indices",
    "select_frames",
    "stream",
]
