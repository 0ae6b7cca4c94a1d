"""Every method of every pipeline stage behind ONE registry: the pure tensor functions (reducers) and the entries
of the tower merge (``tome_vit``) and the KV presses (registered by :mod:`vlm_accel.kv.presses`).

A reducer has the signature ``fn(x [N, D], k, ctx: Context) -> Reduction`` and registers itself with :func:`register`
(``stage="pre"`` between the tower and the LLM, ``"llm"`` inside the LLM, ``"tower"`` inside the vision tower,
``"kv"`` a press); adapters, the controller and the session look methods up by name only.
"""

from . import baselines, diversity, importance, inllm, merge, relevance, temporal, tome_vit  # noqa: F401  (registration)
from .base import STAGES, Context, Method, Option, Reduction, get, names, register, stage_of

__all__ = ["STAGES", "Context", "Method", "Option", "Reduction", "get", "names", "register", "stage_of"]
