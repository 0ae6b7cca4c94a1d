"""vlm-accel: make vision and video LLMs fast with one line.

>>> sess = vlm_accel.accelerate(model, budget=0.25)   # patches `model` in place
>>> sess.restore()                                     # bit-exact original model
"""

from __future__ import annotations

from . import methods as _methods
from . import registry
from .api import Session, Stats, accelerate
from .control.budget import Budget

__version__ = "0.1.0"


def methods(*stages: str) -> list[str]:
    """Names of the registered methods: by default every name ``accelerate(..., method=name)`` takes (stages
    ``"tower"``, ``"pre"``, ``"llm"``); ``methods("kv")`` the KV presses (``kv_press=name``), ``methods("pre")`` one
    stage. ``vlm_accel.registry.stage_of(name)`` tells a name's stage; ``vlm-accel methods`` lists them all.

    This function is what ``from vlm_accel import methods`` gives; the method registry itself (``register``, ``get``,
    ``Context``, ``Reduction`` ...) is :mod:`vlm_accel.registry`."""
    return _methods.names(*stages)


def stream(model, processor, budget=0.25, method: str = "auto", **kwargs):
    """A streaming video Q&A session: ``add_frame(image, t)``, ``ask(question)``. See :mod:`vlm_accel.video`."""
    from .video.stream import stream as _stream

    return _stream(model, processor, budget, method, **kwargs)


def load_default(*args, **kwargs):
    """The embedded default VLM: ``(model, processor)``. See :mod:`vlm_accel.zoo`."""
    from .zoo import load_default as _load

    return _load(*args, **kwargs)


def ask(*args, **kwargs):
    """Answer a question about an image or a video with a loaded model. See :func:`vlm_accel.zoo.ask`."""
    from .zoo import ask as _ask

    return _ask(*args, **kwargs)


__all__ = ["Budget", "Session", "Stats", "accelerate", "ask", "load_default", "methods", "registry", "stream"]
