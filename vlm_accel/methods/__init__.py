"""Token reducers: pure tensor functions behind one registry.

Every method has the signature ``fn(x [N, D], k, ctx: Context) -> Reduction`` and registers itself with
:func:`register`; adapters and the controller look methods up by name only.
"""

from . import baselines, diversity, importance, inllm, merge, relevance, temporal  # noqa: F401  (registration)
from .base import Context, Method, Option, Reduction, get, names, register

__all__ = ["Context", "Method", "Option", "Reduction", "get", "names", "register"]
