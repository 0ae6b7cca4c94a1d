"""vLLM plugin: the library's reducers inside vLLM, as pruned variants of vLLM's own model classes.

Installed with ``pip install "vlm-accel[vllm]"``; vLLM loads :func:`register` in every process through the
``vllm.general_plugins`` entry point. A served model opts in with ``hf_overrides``::

    vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides '{"architectures":
        ["VlmAccelLlavaForConditionalGeneration"], "vlm_accel": {"budget": 64, "method": "divprune"}}'

``vlm_accel`` keys: ``budget`` (float in (0, 1] = fraction of each image's tokens, int >= 1 = tokens per image;
default 0.25), ``method`` (default ``"auto"``: ``visionzip`` for CLIP towers, ``divprune`` elsewhere), ``seed``
(``random`` only; seeded per image). Each image gets exactly the quota ``vlm_accel.Budget.visual_quota`` gives, so
the prompt holds that many placeholders; the kept tokens keep their original positions (1-D positions for LLaVA,
M-RoPE 3-D positions for Qwen), so answers equal ``transformers`` + :func:`vlm_accel.accelerate` at the same budget
and method. Images only: videos pass through unchanged.

Importing this module imports nothing from vLLM; :func:`register` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..control.budget import Budget

#: pruned architecture name -> ``module:class`` of the variant (each extends vLLM's class of the same name)
ARCHITECTURES = {
    "VlmAccelLlavaForConditionalGeneration": "vlm_accel.vllm.models:VlmAccelLlavaForConditionalGeneration",
    "VlmAccelQwen2_5_VLForConditionalGeneration": "vlm_accel.vllm.models:VlmAccelQwen2_5_VLForConditionalGeneration",
    "VlmAccelQwen3VLForConditionalGeneration": "vlm_accel.vllm.models:VlmAccelQwen3VLForConditionalGeneration",
}

CONFIG_KEY = "vlm_accel"
_KEYS = ("budget", "method", "seed")


@dataclass(frozen=True)
class Settings:
    """What one served model prunes: ``budget`` (per image), ``method`` (a registered name, resolved), ``seed``."""

    budget: Budget
    method: str
    seed: int = 0

    def quota(self, n_tokens: int) -> int:
        """Placeholder tokens of an image whose encoder gives ``n_tokens`` tokens."""
        return self.budget.visual_quota(n_tokens, 1)


def supported_methods() -> list[str]:
    """Methods that work in vLLM: they act between the vision encoder and the LLM, need no question, and return
    exactly the quota (vLLM fixes the number of placeholders before the encoder runs)."""
    from ..methods import get, names

    return [n for n in names() if _unsupported_reason(get(n)) is None]


def _unsupported_reason(method) -> str | None:
    if getattr(method, "stage", "pre") != "pre":
        return "acts inside the LLM (vLLM's attention kernels and paged KV cache expose no per-token attention)"
    if "query" in method.needs:
        return "needs the question, but vLLM encodes images without the prompt text (and caches them by image)"
    if "clip" in method.needs:
        return "merges across the frames of a clip, but the plugin reduces each image on its own in vLLM"
    if not method.exact:
        return "may keep fewer tokens than its quota; vLLM needs an exact count per image"
    return None


def settings_from_config(hf_config, auto: str = "divprune") -> Settings:
    """Parse and validate ``hf_config.vlm_accel`` (a dict from ``hf_overrides``); ``auto`` is the family's default.

    Raises ``TypeError`` / ``ValueError`` naming what to pass."""
    from ..methods import get

    raw = getattr(hf_config, CONFIG_KEY, None)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TypeError(f"hf_overrides[{CONFIG_KEY!r}] must be a dict like {{'budget': 0.25, 'method': 'divprune'}}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ValueError(f"hf_overrides[{CONFIG_KEY!r}] has unknown key(s) {unknown}; valid keys: {list(_KEYS)}")
    budget = Budget.of(raw.get("budget", 0.25))
    if budget.kv != 1.0 or budget.video != "frame":
        raise ValueError("vlm_accel in vLLM takes a visual budget only (a float in (0, 1] or an int >= 1)")
    name = raw.get("method", "auto")
    name = auto if name == "auto" else name
    reason = _unsupported_reason(get(name))  # get() raises ValueError for unknown names
    if reason is not None:
        raise ValueError(
            f"method {name!r} does not work in vLLM: it {reason}. Methods that work in vLLM: "
            f"{supported_methods()} (or 'auto')"
        )
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"hf_overrides[{CONFIG_KEY!r}]['seed'] must be an int, got {seed!r}")
    return Settings(budget, name, seed)


def register() -> None:
    """Entry point (``vllm.general_plugins``): register the pruned architectures with vLLM's model registry and
    their config hooks. Called by vLLM in every process; safe to call again."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .config import CONFIG_HOOKS

    for arch, target in ARCHITECTURES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, target)
        MODELS_CONFIG_MAP[arch] = CONFIG_HOOKS[arch]


__all__ = ["ARCHITECTURES", "Settings", "register", "settings_from_config", "supported_methods"]
