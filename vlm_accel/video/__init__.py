"""Video: loading (decord, PyAV fallback), frame cache and streaming sessions."""

from .io import Video, load, sample_indices
from .stream import StreamSession, stream

__all__ = ["StreamSession", "Video", "load", "sample_indices", "stream"]
