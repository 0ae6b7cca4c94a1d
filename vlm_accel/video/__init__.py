"""Video: loading (decord, PyAV fallback), frame cache and streaming sessions."""

from .io import Video, load, sample_indices

__all__ = ["Video", "load", "sample_indices"]
