"""lmms-eval model ``vlm_accel``: any supported local checkpoint (or the embedded default), accelerated.

    python -m vlm_accel.lmms_eval --model vlm_accel \\
        --model_args pretrained=DIR,budget=0.25,method=visionzip --tasks TASK [--include_path DIR] ...

``python -m vlm_accel.lmms_eval`` is lmms-eval's own command line with this model registered first. With the entry
point ``[project.entry-points."lmms_eval.models"] vlm_accel = "vlm_accel.lmms_eval:manifest"`` installed, plain
``lmms-eval --model vlm_accel ...`` finds it too (lmms-eval >= 0.7 reads the group ``lmms_eval.models``).

Model arguments: ``pretrained`` (a checkpoint directory; ``default`` or absent: the embedded model), ``budget`` (as in
:func:`vlm_accel.accelerate`: a float in (0, 1] is a fraction, an int a token count; ``1.0``: unaccelerated),
``method`` (default ``auto``), ``batch_size`` (default 1; prompts are left-padded), ``max_new_tokens`` (default 16,
a task's ``generation_kwargs`` win), ``frames`` (video visuals: frames sampled per clip, default 8).

Only ``generate_until`` (generation tasks) is supported: greedy decoding, in the order lmms-eval gives the requests,
so a batch holds the same questions as ``vlm-accel bench vqa --batch`` on the same data.
"""

from __future__ import annotations

import logging

import torch
from lmms_eval.api.model import lmms

from .api import accelerate
from .control.budget import Budget
from .loading import load_model
from .media import check_context

logger = logging.getLogger(__name__)

MODEL_ID = "vlm_accel"
CLASS_PATH = "vlm_accel.lmms_eval.VlmAccel"


class VlmAccel(lmms):
    """lmms-eval model: ``pretrained`` loaded offline and accelerated to ``budget`` with ``method``."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        budget=1.0,
        method: str = "auto",
        batch_size: int = 1,
        max_new_tokens: int = 16,
        frames: int = 8,
        **kwargs,
    ):
        super().__init__()
        if kwargs:
            logger.warning("vlm_accel: ignoring model_args %s", sorted(kwargs))
        if not str(batch_size).isdigit() or int(batch_size) < 1:  # lmms-eval's --batch_size arrives as text
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        path = None if pretrained in (None, "", "default") else str(pretrained)
        self.model, self.processor = load_model(path)
        self.budget = Budget.of(budget)
        self.method = method
        self.batch_size_per_gpu = self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.frames = int(frames)
        self._rank, self._world_size = 0, 1
        self.session = None if self.budget.is_full else accelerate(self.model, budget=self.budget, method=method)
        logger.info(
            "vlm_accel: %s, budget %s, method %s",
            path or "embedded default model",
            budget,
            self.session.method_name if self.session else "none (full budget)",
        )

    # --- lmms-eval API ------------------------------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        out: list[str] = []
        batch: list = []
        for req in requests:
            if batch and not _same_batch(batch[0], req):
                out += self._answer(batch)
                batch = []
            batch.append(req)
            if len(batch) == self.batch_size:
                out += self._answer(batch)
                batch = []
        if batch:
            out += self._answer(batch)
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError("vlm_accel answers generation tasks (output_type: generate_until) only")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vlm_accel answers single-round generation tasks only")

    # --- internals ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _answer(self, batch) -> list[str]:
        contexts, visuals, gen_kwargs = [], [], dict(batch[0].args[1] or {})
        for req in batch:
            context, _, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            contexts.append(context)
            visuals.append(_flatten(doc_to_visual(doc)) if doc_to_visual is not None else [])
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
        if any(isinstance(v, str) for vs in visuals for v in vs):  # video files: one clip per request
            answers = [self._answer_video(c, vs, max_new) for c, vs in zip(contexts, visuals, strict=True)]
        else:
            answers = self._answer_images(contexts, visuals, max_new)
        return [_cut(a, until) for a in answers]

    def _answer_images(self, contexts, visuals, max_new: int) -> list[str]:
        proc = self.processor
        prompts = []
        for context, images in zip(contexts, visuals, strict=True):
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": context}]
            prompts.append(proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        images = [im.convert("RGB") for vs in visuals for im in vs]
        proc.tokenizer.padding_side = "left"
        kwargs = {"images": images} if images else {}
        inputs = proc(text=prompts, return_tensors="pt", padding=True, **kwargs).to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        check_context(self.model, inputs["input_ids"], max_new)
        out = self.model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        return [s.strip() for s in proc.batch_decode(new, skip_special_tokens=True)]

    def _answer_video(self, context: str, visuals: list, max_new: int) -> str:
        from .video import ask_video

        (path,) = [v for v in visuals if isinstance(v, str)]
        budget = self.budget if not self.budget.is_full else 1.0
        method = self.method if self.session is None else self.session.method_name
        answer, _ = ask_video(self.model, self.processor, path, context, budget, method, self.frames, max_new)
        if self.session is not None:  # ask_video's stream restored the model: accelerate it again
            self.session = accelerate(self.model, budget=self.budget, method=self.method)
        return answer


def _same_batch(a, b) -> bool:
    """Requests batch together when they come from the same task split with the same generation arguments."""
    return a.args[4:6] == b.args[4:6] and a.args[1] == b.args[1]


def _flatten(visuals) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    return [v for item in visuals for v in _flatten(item)]


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


def manifest():
    """The entry point payload for the ``lmms_eval.models`` group."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def register() -> None:
    """Register ``vlm_accel`` with lmms-eval's model registry in this process (no entry point needed)."""
    from lmms_eval import models

    models.MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    models.AVAILABLE_MODELS[MODEL_ID] = CLASS_PATH.rsplit(".", 1)[-1]


def main() -> None:
    """``python -m vlm_accel.lmms_eval ARGS``: lmms-eval's command line with ``--model vlm_accel`` available."""
    register()
    from lmms_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
