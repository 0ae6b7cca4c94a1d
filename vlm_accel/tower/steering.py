"""Latency targets spent inside the vision tower (``tome_vit`` under ``Budget(latency_ms=...)``).

When a request starts (``generate`` or a forward with image placeholders) :meth:`TowerSteering.note_prompt` keeps its
prompt; right before the vision tower runs, :meth:`TowerSteering.before_tower` reads the request's shape (views,
placeholders and text tokens per row), asks the controller for the most tokens per view whose predicted
encoder time plus language-model prefill meets the target (:meth:`Controller.tower_keep`), and sets the tower merge's
budget for this request: the configured merge schedule when it can meet the target, else the fastest one
(``front``). The encoder's cost per view comes from :class:`~vlm_accel.control.calibration.TowerCost`, measured by
:meth:`TowerSteering.probe` on first use and cached.
"""

from __future__ import annotations

import functools

import torch

from ..control.budget import Budget
from ..control.calibration import tower_calibrated
from ..control.controller import TowerChoice

FASTEST = "front"  # the schedule a target falls back to: halving at every layer (costs accuracy, see the README)


class TowerSteering:
    """Chooses the tower merge of every request under a latency target.

    Args:
        tower: the session's :class:`~vlm_accel.tower.merge.TowerMerge` (its ``budget`` / ``schedule`` are set
            per request).
        controller: the session's :class:`~vlm_accel.control.controller.Controller`.
        model: the accelerated VLM (its config: image token, patch size, channels; calibration key).
        adapter: the family adapter (``tower``, ``inner``, ``language_model``).
    """

    def __init__(self, tower, controller, model, adapter):
        self.tower, self.controller, self.model, self.adapter = tower, controller, model, adapter
        self.schedule = tower.schedule  # the configured one, tried first on every request
        self._prompt: tuple | None = None  # (input_ids, attention_mask) of the request whose images come next
        self._costs: dict[tuple, object] = {}  # (view size, schedule) -> TowerCost: read from disk once per session

    @property
    def schedules(self) -> tuple[str, ...]:
        """The merge schedules a request may use, in order of preference."""
        return tuple(dict.fromkeys((self.schedule, FASTEST)))

    def note_prompt(self, kwargs: dict) -> None:
        """``kwargs`` of a ``generate`` / forward call: remember its prompt (``input_ids`` ``[B, L]`` with image
        placeholders, ``attention_mask``) for the tower call that follows (``generate`` encodes the images before
        its first forward)."""
        ids = kwargs.get("input_ids")
        token = getattr(self.model.config, "image_token_id", None)
        if torch.is_tensor(ids) and ids.dim() == 2 and token is not None and bool((ids == token).any()):
            self._prompt = (ids, kwargs.get("attention_mask"))

    def noting_prompt(self, orig):
        """``orig`` (the model's ``forward`` / ``generate``) noting its prompt when a request starts, for the merge
        chosen right before its tower runs."""

        @functools.wraps(orig)
        def call(*args, **kwargs):
            if not torch.compiler.is_compiling():
                self.note_prompt(kwargs)
            return orig(*args, **kwargs)

        return call

    def before_tower(self, call: dict) -> TowerChoice | None:
        """``call``: the ``get_image_features`` arguments, before the tower runs: set the merge of this request and
        return the choice (the request's prefill reports it), ``None`` for a call without pixels. ``ValueError``
        with the nearest reachable value when no schedule meets the target."""
        pv = call.get("pixel_values")
        if not torch.is_tensor(pv) or pv.dim() not in (4, 5):
            return None
        size = tuple(pv.shape[-2:])
        patch = self.model.config.vision_config.patch_size
        per_view = (size[0] // patch) * (size[1] // patch)
        views = pv.shape[0] if pv.dim() == 4 else pv.shape[0] * pv.shape[1]  # anyres: padded crops counted too
        n_text, n_vis = self._rows(views * per_view)
        unmet = None
        for schedule in self.schedules:
            cost = self._cost(size, schedule)
            try:
                choice = self.controller.tower_keep(n_text, n_vis, views, per_view, cost)
            except ValueError as e:
                unmet = e
                continue
            self.tower.schedule, self.tower.budget = schedule, Budget(visual=choice.tokens)
            return choice
        raise unmet

    def _cost(self, size: tuple[int, int], schedule: str):
        """The calibrated encoder cost (cached on disk, calibrated on first use), looked up once per session: the
        disk cache's key hashes the model config, too slow for every request."""
        if (size, schedule) not in self._costs:
            lm = self.adapter.language_model
            self._costs[size, schedule] = tower_calibrated(self.model, lm, self.probe, size, schedule)
        return self._costs[size, schedule]

    def _rows(self, visual: int) -> tuple[list[int], list[int]]:
        """Per prompt row: text tokens and visual placeholders, from the noted prompt (taken once); without one
        (the images encoded on their own), one row of ``visual`` placeholders and no text."""
        prompt, self._prompt = self._prompt, None
        if prompt is None:
            return [0], [visual]
        ids, attn = prompt
        n_vis = (ids == self.model.config.image_token_id).sum(1)
        lens = attn.sum(1) if torch.is_tensor(attn) and attn.dim() == 2 else torch.full((ids.shape[0],), ids.shape[1])
        return (lens - n_vis).tolist(), n_vis.tolist()

    @torch.no_grad()
    def probe(self, keep: float, size: tuple[int, int], schedule: str) -> None:
        """Run the vision tower once on one random view of ``size`` pixels, with ``keep`` of its tokens leaving it
        under ``schedule``, and the projector on those tokens (the calibration of
        :class:`~vlm_accel.control.calibration.TowerCost`: what ``get_image_features`` spends per view)."""
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
