"""Model-family adapters; :func:`adapter_for` picks one by the model's class."""

from __future__ import annotations

from torch import nn

from .base import Adapter, ImageInfo, Segment
from .llava import LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter
from .qwen import Qwen2VLAdapter, Qwen3VLAdapter, Qwen25VLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    Qwen25VLAdapter,
    Qwen3VLAdapter,
)


def supported() -> list[str]:
    return [c for a in ADAPTERS for c in a.model_classes]


def adapter_for(model) -> Adapter:
    """The adapter for ``model`` (a ``...ForConditionalGeneration`` instance); ``TypeError`` otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate() takes a transformers model instance, got {type(model).__name__}")
    name = type(model).__name__
    for cls in ADAPTERS:
        if name in cls.model_classes:
            return cls(model)
    raise TypeError(
        f"{name} is not supported; vlm_accel supports {', '.join(supported())} "
        "(load the model with its ...ForConditionalGeneration class)"
    )


__all__ = ["Adapter", "ImageInfo", "Segment", "adapter_for", "supported", "ADAPTERS"]
