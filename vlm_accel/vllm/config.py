"""Config hooks vLLM runs when it builds a ``ModelConfig`` for a pruned architecture (``MODELS_CONFIG_MAP``): they
validate ``hf_overrides["vlm_accel"]`` before anything loads, and give LLaVA's language model M-RoPE sections so
that kept tokens can keep their original positions (three equal position rows = plain 1-D RoPE)."""

from __future__ import annotations

from . import settings_from_config

LLAVA_TOWERS = ("clip_vision_model", "siglip_vision_model")


def llava_auto_method(hf_config) -> str:
    """``visionzip`` where the tower has a CLS token whose attention scores the kept features (as
    :func:`vlm_accel.accelerate`'s ``auto``), else ``divprune``."""
    cls_tower = hf_config.vision_config.model_type == "clip_vision_model"
    default = getattr(hf_config, "vision_feature_select_strategy", "default") == "default"
    return "visionzip" if cls_tower and default else "divprune"


class _Hook:
    """``MODELS_CONFIG_MAP`` protocol: two static hooks."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        return None

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return None


def _refuse_video_pruning(model_config) -> None:
    mm = getattr(model_config, "multimodal_config", None)
    rate = getattr(mm, "video_pruning_rate", None)
    if rate:
        raise ValueError(
            "vlm_accel architectures do not combine with vLLM's video pruning (video_pruning_rate); "
            "serve without --video-pruning-rate"
        )


class LlavaHook(_Hook):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        hf = model_config.hf_config
        tower = hf.vision_config.model_type
        if tower not in LLAVA_TOWERS:
            raise ValueError(
                f"VlmAccelLlavaForConditionalGeneration supports CLIP and SigLIP vision towers, not {tower!r}"
            )
        settings_from_config(hf, auto=llava_auto_method(hf))
        _refuse_video_pruning(model_config)
        text = hf.text_config
        rope = dict(getattr(text, "rope_parameters", None) or {})
        if "mrope_section" in rope:
            return
        kind = rope.get("rope_type", "default")
        if kind not in ("default", "yarn"):
            raise ValueError(
                f"VlmAccelLlavaForConditionalGeneration needs a language model with 'default' or 'yarn' RoPE, got "
                f"{kind!r}"
            )
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        half = int(head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
        third = half // 3
        rope.setdefault("rope_type", "default")
        rope.setdefault("rope_theta", getattr(text, "rope_theta", 10000.0))
        rope["mrope_section"] = [half - 2 * third, third, third]  # equal rows: any split is plain RoPE
        text.rope_parameters = rope


class QwenHook(_Hook):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        settings_from_config(model_config.hf_config, auto="divprune")
        _refuse_video_pruning(model_config)


CONFIG_HOOKS = {
    "VlmAccelLlavaForConditionalGeneration": LlavaHook,
    "VlmAccelQwen2_5_VLForConditionalGeneration": QwenHook,
    "VlmAccelQwen3VLForConditionalGeneration": QwenHook,
}
