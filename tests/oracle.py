"""Independent references for the tests: what the unpatched language model computes on a kept subset."""

from __future__ import annotations

import torch

import tiny


@torch.no_grad()
def lm_inputs(model, inputs: dict) -> dict:
    """Keyword arguments the unpatched model hands its language model for ``inputs`` (full sequence)."""
    seen = {}

    def grab(mod, args, kwargs):
        seen.update(kwargs)

    h = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        h.remove()
    return seen


def full_positions(model, family: str, input_ids, attention_mask, inputs: dict) -> torch.Tensor:
    """Positions ``generate`` gives every token of ``input_ids`` (prompt + generated) in the unpatched model."""
    if family.startswith("qwen"):
        types = (input_ids == tiny.IMAGE_ID).long() + 2 * (input_ids == tiny.VIDEO_ID).long()
        pos, _ = model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=types,
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=attention_mask,
        )
        return pos
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the sequence axis: ``[..., B, L]`` or ``[B, L, D]`` at ``index`` ``[B, L']``."""
    if x.dim() == 3 and x.shape[0] == index.shape[0]:
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
    return x.gather(-1, index.expand(*x.shape[:-2], *index.shape))


@torch.no_grad()
def run_lm(model, embeds, position_ids, attention_mask, full_kwargs=None, index=None, valid=None, extra=None):
    """Unpatched language model + head on explicit embeddings and positions.

    Qwen3-VL: the deepstack features are pruned in step from ``full_kwargs`` (or taken as given in ``extra``)."""
    if extra:
        pad = embeds.shape[1] - extra["visual_pos_masks"].shape[1]
        vpm = extra["visual_pos_masks"]
        extra = dict(extra, visual_pos_masks=torch.cat([vpm, vpm.new_zeros(vpm.shape[0], pad)], 1))
    elif full_kwargs is not None and full_kwargs.get("visual_pos_masks") is not None:
        vpm = full_kwargs["visual_pos_masks"]
        b, n = vpm.shape
        new_vpm = vpm.gather(1, index) & valid
        deep = []
        for e in full_kwargs["deepstack_visual_embeds"]:
            full = e.new_zeros(b, n, e.shape[-1])
            full[vpm] = e
            kept = take(full, index)[new_vpm]
            deep.append(kept)
        pad = embeds.shape[1] - new_vpm.shape[1]
        if pad:
            new_vpm = torch.cat([new_vpm, new_vpm.new_zeros(b, pad)], 1)
        extra = {"visual_pos_masks": new_vpm, "deepstack_visual_embeds": deep}
    else:
        extra = {}
    out = model.model.language_model(
        inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask, use_cache=False, **extra
    )
    return model.lm_head(out.last_hidden_state)
