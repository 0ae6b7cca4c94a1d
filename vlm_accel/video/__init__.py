"""Video: loading (decord, PyAV fallback), frame cache and streaming sessions."""

from .io import Video, load, sample_indices
from .stream import StreamSession, ask_video, stream

__all__ = ["StreamSession", "Video", "ask_video", "load", "sample_indices", "stream"]
