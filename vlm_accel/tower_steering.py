"""Latency targets spent inside the vision tower (``tome_vit`` under ``Budget(latency_ms=...)``).

Before a forward that brings images runs, :meth:`TowerSteering.before_forward` reads the request's shape (views per
image, placeholders and text tokens per row), asks the controller for the most tokens per view whose predicted
encoder time plus language-model prefill meets the target (:meth:`Controller.tower_keep`), and sets the tower merge's
budget for this request: the configured merge schedule when it can meet the target, else the fastest one
(``front``). The encoder's cost per view comes from :class:`~vlm_accel.calibration.TowerCost`, measured by
:meth:`TowerSteering.probe` on first use and cached.
"""

from __future__ import annotations

import torch

from .budget import Budget
from .calibration import tower_calibrated

FASTEST = "front"  # the schedule a target falls back to: halving at every layer (costs accuracy, see the README)


class TowerSteering:
    """Chooses the tower merge of every request under a latency target.

    Args:
        tower: the session's :class:`~vlm_accel.encoder_merge.TowerMerge` (its ``budget`` / ``schedule`` are set
            per request).
        controller: the session's :class:`~vlm_accel.controller.Controller`.
        model: the accelerated VLM (its config: image token, patch size, channels; calibration key).
        adapter: the family adapter (``tower``, ``inner``, ``language_model``).
    """

    def __init__(self, tower, controller, model, adapter):
        self.tower, self.controller, self.model, self.adapter = tower, controller, model, adapter
        self.schedule = tower.schedule  # the configured one, tried first on every request

    def before_forward(self, kwargs: dict) -> None:
        """``kwargs``: the VLM forward's keywords; nothing to do without ``pixel_values`` and ``input_ids``.
        ``ValueError`` with the nearest reachable value when no schedule meets the target."""
        pv, ids = kwargs.get("pixel_values"), kwargs.get("input_ids")
        token = getattr(self.model.config, "image_token_id", None)
        if pv is None or ids is None or token is None or pv.dim() not in (4, 5):
            return
        attn = kwargs.get("attention_mask")
        lens = attn.sum(1) if torch.is_tensor(attn) and attn.dim() == 2 else torch.full((ids.shape[0],), ids.shape[1])
        n_vis = (ids == token).sum(1)
        size = tuple(pv.shape[-2:])
        patch = self.model.config.vision_config.patch_size
        per_view = (size[0] // patch) * (size[1] // patch)
        views = pv.shape[0] if pv.dim() == 4 else pv.shape[0] * pv.shape[1]  # anyres: padded crops counted too
        unmet = None
        for schedule in dict.fromkeys((self.schedule, FASTEST)):
            cost = tower_calibrated(self.model, self.adapter.language_model, self.probe, size, schedule)
            try:
                k = self.controller.tower_keep((lens - n_vis).tolist(), n_vis.tolist(), views, per_view, cost)
            except ValueError as e:
                unmet = e
                continue
            self.tower.schedule, self.tower.budget = schedule, Budget(visual=k)
            return
        raise unmet

    @torch.no_grad()
    def probe(self, keep: float, size: tuple[int, int], schedule: str) -> None:
        """Run the vision tower once on one random view of ``size`` pixels, with ``keep`` of its tokens leaving it
        under ``schedule``, and the projector on those tokens (the calibration of
        :class:`~vlm_accel.calibration.TowerCost`: what ``get_image_features`` spends per view)."""
        channels = getattr(self.model.config.vision_config, "num_channels", 3)
        p = next(self.adapter.tower.parameters())
        gen = torch.Generator().manual_seed(0)
        pv = torch.randn(1, channels, *size, generator=gen).to(p.device, p.dtype)
        saved = self.tower.budget, self.tower.schedule
        try:
            if keep < 1.0:
                self.tower.budget, self.tower.schedule = Budget(visual=float(keep)), schedule
                self.tower.begin({}, "image")
            hidden = self.adapter.tower(pv, output_hidden_states=True).hidden_states[-1]  # [1, tokens left, C]
        finally:
            self.tower.end()
            self.tower.budget, self.tower.schedule = saved
        # the projector runs on what leaves the tower, inside the same get_image_features: timed with it
        proj = getattr(self.adapter.inner, "multi_modal_projector", None)
        first = next((m for m in proj.modules() if isinstance(m, torch.nn.Linear)), None) if proj is not None else None
        if first is not None and first.in_features % hidden.shape[-1] == 0:  # several feature layers: concatenated
            proj(hidden.repeat(1, 1, first.in_features // hidden.shape[-1]))
