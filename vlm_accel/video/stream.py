"""Streaming video Q&A: frames arrive live, each is encoded and reduced once, memory stays under a token bound,
and a question can come at any time."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..tower.frame_cache import check_threshold, frames_match

logger = logging.getLogger(__name__)

REDUNDANT = 0.95  # cosine of mean features above which a frame repeats its predecessor
REDUNDANT_ALLOCATED = 0.999  # with a controller budget only (near-)exact repeats are folded; the rest is allocated
QUESTION_TOKENS = 64  # room left for the question and the answer beside the held tokens


@dataclass
class _Entry:
    t_start: float
    t_end: float
    features: torch.Tensor  # [K, D] kept visual tokens of the frame
    frames: int = 1  # frames this entry stands for
    index: torch.Tensor | None = None  # [K] kept tokens' places in the frame's (merged) token grid (M-RoPE models)
    grid: tuple[int, int] = (0, 0)  # merged token grid (h, w) of the frame (M-RoPE models)
    deepstack: list[torch.Tensor] = field(default_factory=list)  # per deepstack layer [K, D] (Qwen3-VL)


_LLAVA = (
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
)
_MROPE = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration")


@dataclass
class StreamStats:
    frames_seen: int = 0
    frames_encoded: int = 0
    frames_held: int = 0
    tokens_held: int = 0
    evicted: int = 0
    merged: int = 0


class StreamSession:
    """A live video: ``add_frame`` as frames arrive, ``ask`` whenever a question comes.

    Every frame is encoded once by the vision tower (a frame whose pixels did not change beyond ``frame_cache``
    is not encoded again), reduced to the per-frame ``budget`` by ``method``, and held as visual tokens. When the held
    tokens exceed ``max_tokens``, the frame most similar to its predecessor is folded into it; if no pair is
    redundant, the oldest frame is evicted. ``ask`` answers from the held frames (frames-as-images), in order.

    A budget with a total target goes through the budget controller: ``Budget(tokens=N)`` bounds the held tokens by
    ``N``, ``memory_gb`` by what the KV cache and activations of the question's prefill allow, ``latency_ms`` by what
    the calibrated language model prefills in that time (the frames are encoded already when the question comes).
    The bound (the smallest of these and ``max_tokens``) is then split over the held frames by their information
    (what changed since the previous frame): busy frames keep more tokens, static ones fewer (each re-selected by
    diversity within its kept tokens), and frames are folded or evicted only when there are more frames than tokens.

    Supported: LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision (e.g. the embedded default; each frame is an image, anyres
    crops included, and held tokens are numbered consecutively) and Qwen2-VL / Qwen2.5-VL / Qwen3-VL (every held
    token keeps the M-RoPE position, and for Qwen3-VL the deepstack features, it has in its frame, exactly as if the
    frames were passed as images and pruned by :func:`vlm_accel.accelerate`).
    """

    def __init__(
        self,
        model,
        processor,
        budget=0.25,
        method: str = "auto",
        max_tokens: int = 4096,
        frame_cache: float | None = 0.0,
    ):
        from ..api import accelerate

        if type(model).__name__ not in _LLAVA + _MROPE:
            raise TypeError(f"streaming supports {', '.join(_LLAVA + _MROPE)}, not {type(model).__name__}")
        self.mrope = type(model).__name__ in _MROPE
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        check_threshold(frame_cache)
        self.model, self.processor = model, processor
        self.max_tokens = max_tokens
        self.frame_cache = frame_cache
        self.session = accelerate(model, budget=budget, method=method)
        self.allocate = self.session.budget.has_target
        if self.allocate:
            self.max_tokens = min(max_tokens, _target_bound(model, self.session))
            logger.info("vlm_accel stream: at most %d visual tokens held (budget %s)", self.max_tokens, budget)
        self.entries: list[_Entry] = []
        self.stats = StreamStats()
        self._clock = 0.0
        self._last_pixels: torch.Tensor | None = None  # the last encoded frame, for the frame cache
        self._closed = False
        # the last add_frame: ``(kept token indices [K], token grid (h, w))``, or None when the frame cache reused it
        self.last_frame: tuple[torch.Tensor, tuple[int, int]] | None = None

    # --- frames -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def add_frame(self, image, t: float | None = None) -> None:
        """Take one frame (PIL image, ``[H, W, 3]`` uint8 array or path) seen at time ``t`` seconds (default: +1 s)."""
        from ..media import load_image

        self._check_open()
        t = self._clock + 1.0 if t is None else float(t)
        self._clock = t
        inputs = self.processor.image_processor(images=load_image(image), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.model.device, self.model.dtype)
        vision = {"pixel_values": pixels}
        for key in ("image_grid_thw", "image_sizes"):  # Qwen grids, anyres sizes
            if key in inputs:
                vision[key] = inputs[key].to(self.model.device)
        self.stats.frames_seen += 1
        last = self.entries[-1] if self.entries else None
        if (
            last is not None
            and self.frame_cache is not None
            and frames_match(pixels, self._last_pixels, self.frame_cache)
        ):
            last.t_end, last.frames = t, last.frames + 1  # same view: no encoding, no new tokens
            self.last_frame = None
            return
        enc = self.session.encode_images(detailed=True, **vision)[0]
        self.stats.frames_encoded += 1
        self._last_pixels = pixels
        grid = (0, 0)
        if self.mrope:
            m = self.model.config.vision_config.spatial_merge_size
            _, h, w = vision["image_grid_thw"][0].tolist()
            grid = (h // m, w // m)
            self.last_frame = (enc.index, grid)
        elif pixels.dim() == 4:  # one view (no anyres crops): the patch grid of the tower
            patch = self.model.config.vision_config.patch_size
            self.last_frame = (enc.index, (pixels.shape[-2] // patch, pixels.shape[-1] // patch))
        else:
            self.last_frame = (enc.index, (0, 0))
        self.entries.append(_Entry(t, t, enc.features, index=enc.index, grid=grid, deepstack=enc.deepstack))
        self._enforce_bound()
        self._refresh()

    def _enforce_bound(self) -> None:
        if self.allocate:
            return self._allocate()
        while self.tokens_held > self.max_tokens and len(self.entries) > 1:
            means = torch.stack([e.features.float().mean(0) for e in self.entries])
            sims = torch.nn.functional.cosine_similarity(means[1:], means[:-1], dim=-1)
            j = int(sims.argmax())
            if float(sims[j]) >= REDUNDANT:  # fold entry j+1 into j: it adds nothing new
                self._fold(j)
            else:
                self.entries.pop(0)
                self.stats.evicted += 1
        if self.tokens_held > self.max_tokens:  # one frame larger than the bound: keep its first max_tokens
            e = self.entries[0]
            n = self.max_tokens
            e.features, e.index, e.deepstack = e.features[:n], e.index[:n], [d[:n] for d in e.deepstack]

    def _allocate(self) -> None:
        """The controller's split: frames identical to their predecessor folded, then (only while there are more
        frames than tokens) the oldest evicted, then every frame cut to its share of the bound by information."""
        from ..control.controller import allocate, information
        from ..methods import Context
        from ..methods.diversity import divprune

        self._fold_repeats()
        while len(self.entries) > self.max_tokens:
            self.entries.pop(0)
            self.stats.evicted += 1
        if self.tokens_held <= self.max_tokens:
            return
        sizes = [e.features.shape[0] for e in self.entries]
        weights, prev = [], None
        for e in self.entries:
            weights.append(information(e.features, prev))
            prev = e.features
        for e, q in zip(self.entries, allocate(self.max_tokens, sizes, weights), strict=True):
            if q < e.features.shape[0]:
                keep = divprune(e.features, q, Context()).keep
                e.features, e.index = e.features[keep], e.index[keep]
                e.deepstack = [d[keep] for d in e.deepstack]

    def _fold_repeats(self) -> None:
        j = 0
        while j + 1 < len(self.entries):
            a, b = self.entries[j], self.entries[j + 1]
            sim = torch.nn.functional.cosine_similarity(a.features.float().mean(0), b.features.float().mean(0), dim=0)
            if float(sim) >= REDUNDANT_ALLOCATED:
                self._fold(j)
            else:
                j += 1

    def _fold(self, j: int) -> None:
        """Entry ``j + 1`` repeats entry ``j``: ``j`` now stands for both (its features, their time span)."""
        a, b = self.entries[j], self.entries.pop(j + 1)
        a.t_end, a.frames = b.t_end, a.frames + b.frames
        self.stats.merged += 1

    def _refresh(self) -> None:
        self.stats.frames_held = len(self.entries)
        self.stats.tokens_held = self.tokens_held

    @property
    def tokens_held(self) -> int:
        return sum(e.features.shape[0] for e in self.entries)

    @property
    def bytes_held(self) -> int:
        """Bytes of held visual tokens plus the one cached frame."""
        feats = sum(e.features.numel() * e.features.element_size() for e in self.entries)
        pix = 0 if self._last_pixels is None else self._last_pixels.numel() * self._last_pixels.element_size()
        return feats + pix

    # --- questions --------------------------------------------------------------------------------------------
    def prompt_inputs(self, question: str) -> dict:
        """What :meth:`ask` feeds the language model: ``inputs_embeds`` ``[1, L, D]``, ``attention_mask`` ``[1, L]``
        and, for M-RoPE models, ``position_ids`` ``[3, 1, L]`` (held tokens at their places in their frames) and, for
        Qwen3-VL, ``visual_pos_masks`` ``[1, L]`` + ``deepstack_visual_embeds`` (per layer ``[N_held, D]``)."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        self._check_open()
        if not self.entries:
            raise ValueError("no frames yet: call add_frame() first")
        proc, model = self.processor, self.model
        content = [{"type": "image"} for _ in self.entries] + [{"type": "text", "text": question}]
        prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        ids = proc.tokenizer(prompt, return_tensors="pt")["input_ids"][0]
        image_id = model.config.image_token_id
        pieces, frame, pos, p = [], 0, [], 0
        for tok in ids.tolist():  # each image placeholder becomes that frame's kept tokens
            if tok != image_id:
                pieces.append(tok)
                pos.append(torch.full((3, 1), p))
                p += 1
                continue
            if frame >= len(self.entries):
                raise RuntimeError("the chat template placed more image tokens than there are frames")
            e = self.entries[frame]
            pieces += [image_id] * e.features.shape[0]
            if self.mrope:  # M-RoPE of an image: (t, row, col) offset by the text position before it
                rows, cols = e.index.cpu() // e.grid[1], e.index.cpu() % e.grid[1]
                pos.append(torch.stack([torch.zeros_like(rows), rows, cols]) + p)
                p += max(e.grid)
            frame += 1
        if frame != len(self.entries):
            raise RuntimeError("the chat template did not place one image token per frame")
        from ..media import check_context

        check_context(model, len(pieces))
        input_ids = torch.tensor([pieces], device=model.device)
        embeds = model.get_input_embeddings()(input_ids)
        feats = torch.cat([e.features for e in self.entries]).to(embeds.dtype)
        embeds = embeds.masked_scatter((input_ids == image_id)[..., None], feats)
        out = {"inputs_embeds": embeds, "attention_mask": torch.ones_like(input_ids)}
        if self.mrope:
            out["position_ids"] = torch.cat(pos, 1)[:, None, :].to(model.device)
        if self.entries[0].deepstack:
            out["visual_pos_masks"] = input_ids == image_id
            layers = zip(*(e.deepstack for e in self.entries), strict=True)
            out["deepstack_visual_embeds"] = [torch.cat(d).to(embeds.dtype) for d in layers]
        return out

    @torch.no_grad()
    def logits(self, question: str) -> torch.Tensor:
        """The prefill logits ``[1, L, V]`` :meth:`ask` starts from (the held frames + ``question``)."""
        inputs = self.prompt_inputs(question)
        if not self.mrope:
            return self.model(**inputs).logits
        return _lm(self.model, inputs)[0]

    @torch.no_grad()
    def ask(self, question: str, max_new_tokens: int = 16) -> str:
        """Answer ``question`` from the frames held now (greedy)."""
        inputs = self.prompt_inputs(question)
        if not self.mrope:
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            return self.processor.decode(out[0], skip_special_tokens=True).strip()
        return self.processor.decode(
            _greedy_mrope(self.model, inputs, max_new_tokens), skip_special_tokens=True
        ).strip()

    # --- lifetime ---------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this stream is closed; start a new one with vlm_accel.stream(model, processor, ...)")
        if not self.session.active:
            raise RuntimeError(
                "this stream's model was re-configured by another vlm_accel.stream() / accelerate() (or its session "
                "was restored), so this stream no longer holds it; start a new stream"
            )

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Restore the model and drop the held frames (closing twice is harmless)."""
        self._closed = True
        self.session.restore()
        self.entries.clear()
        self._last_pixels = None
        self._refresh()

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _target_bound(model, session) -> int:
    """Held visual tokens a total target allows (``tokens``; ``memory_gb``: KV + activations of the question's
    prefill; ``latency_ms``: the calibrated prefill)."""
    from ..control.controller import activation_bytes, kv_bytes_per_entry, largest

    b, lm = session.budget, session.adapter.language_model
    bound = b.tokens if b.tokens is not None else 1 << 30
    if b.memory_gb is not None:
        limit, per = b.memory_gb * 1e9, kv_bytes_per_entry(lm)

        def fits(held: int) -> bool:  # the question's prefill over ``held`` tokens: KV + activations
            n = held + QUESTION_TOKENS
            return per * n + activation_bytes(lm, 1, n) <= limit

        bound = min(bound, largest(0, 1 << 20, fits))
    if b.latency_ms is not None:
        bound = min(bound, session.controller.cost.max_tokens(1, b.latency_ms) - QUESTION_TOKENS)
    if bound < 1:
        raise ValueError(
            f"budget {b} leaves no room for a single held visual token beside a {QUESTION_TOKENS}-token question; "
            "raise the target"
        )
    return int(bound)


def stream(
    model, processor, budget=0.25, method: str = "auto", max_tokens: int = 4096, frame_cache: float | None = 0.0
) -> StreamSession:
    """Start a streaming session on ``model`` (see :class:`StreamSession`)."""
    return StreamSession(model, processor, budget, method, max_tokens, frame_cache)


def _lm(model, inputs: dict, **kwargs):
    """Language model + head on explicit embeddings and positions: ``(logits [B, L, V], LM output)``."""
    out = model.model.language_model(**inputs, use_cache=True, **kwargs)
    return model.lm_head(out.last_hidden_state), out


@torch.no_grad()
def _greedy_mrope(model, inputs: dict, max_new_tokens: int) -> list[int]:
    """Greedy decoding with explicit M-RoPE positions (``generate`` would recompute them from input ids)."""
    import inspect

    lm = model.model.language_model
    cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    logits, out = _lm(model, inputs)
    nxt = int(inputs["position_ids"].max()) + 1
    mask, tokens = inputs["attention_mask"], []
    for step in range(max_new_tokens):
        tok = int(logits[0, -1].argmax())
        if tok in eos:
            break
        tokens.append(tok)
        if step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
        step_in = {
            "inputs_embeds": model.get_input_embeddings()(torch.tensor([[tok]], device=mask.device)),
            "attention_mask": mask,
            "position_ids": torch.full((3, 1, 1), nxt + step, device=mask.device),
        }
        logits, out = _lm(model, step_in, **{cache_kw: getattr(out, cache_kw)})
    return tokens


def ask_video(
    model,
    processor,
    video,
    question: str,
    budget=1.0,
    method: str = "auto",
    frames: int = 8,
    max_new_tokens: int = 16,
    on_frame=None,
) -> tuple[str, StreamStats]:
    """Answer ``question`` about ``video`` (a file path, of which ``frames`` frames are sampled uniformly, or a loaded
    :class:`~vlm_accel.video.Video`): its frames are streamed as images (each reduced to ``budget``) into a stream
    bounded at half the language model's context.

    ``on_frame(frame [H, W, 3], last_frame)`` is called after each frame with :attr:`StreamSession.last_frame` (the
    kept tokens and grid, or ``None`` for a frame reused from the frame cache).

    Returns ``(answer, stats)``. Raises ``ValueError`` for a missing or unreadable video."""
    from .io import Video, load

    clip = video if isinstance(video, Video) else load(video, num_frames=frames)
    context = getattr(model.config.get_text_config(), "max_position_embeddings", 8192)
    with stream(model, processor, budget=budget, method=method, max_tokens=max(1, context // 2)) as live:
        for frame, t in zip(clip.frames, clip.timestamps, strict=True):
            live.add_frame(frame, float(t))
            if on_frame is not None:
                on_frame(frame, live.last_frame)
        answer = live.ask(question, max_new_tokens=max_new_tokens)
        stats = StreamStats(**vars(live.stats))
    return answer, stats
