"""Model-family adapters; :func:`adapter_for` picks one by the model's class."""

from __future__ import annotations

from torch import nn

from .base import Adapter, ImageInfo, Segment
from .generic import (
    Gemma3Adapter,
    GenericAdapter,
    InternVLAdapter,
    LlavaOnevision15Adapter,
    SmolVLMAdapter,
    missing,
)
from .llava import LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter
from .qwen import Glm4vAdapter, Qwen2VLAdapter, Qwen3VLAdapter, Qwen25VLAdapter, Qwen35Adapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    Qwen25VLAdapter,
    Qwen3VLAdapter,
    Qwen35Adapter,
    Glm4vAdapter,
    Gemma3Adapter,
    InternVLAdapter,
    LlavaOnevision15Adapter,
    SmolVLMAdapter,
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
    lacks = missing(model)
    if not lacks:
        return GenericAdapter(model)
    raise TypeError(
        f"{name} is not supported: the generic adapter needs {'; '.join(lacks)}. Families with their own adapter: "
        f"{', '.join(supported())} (load the model with its ...ForConditionalGeneration class)"
    )


__all__ = ["ADAPTERS", "Adapter", "GenericAdapter", "ImageInfo", "Segment", "adapter_for", "supported"]
