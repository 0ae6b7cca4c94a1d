"""Gradio demo: image and video Q&A, the accelerated model beside the full one.

    vlm-accel demo [--model DIR] [--port 7860] [--host 127.0.0.1] [--share]   # needs: pip install "vlm-accel[demo]"

The handlers (:class:`Demo`) are plain functions of the inputs, usable and tested without Gradio; :func:`build_app`
wires them into a ``gradio.Blocks`` app (errors become messages in the page, never tracebacks). The app binds to
127.0.0.1 unless ``--host`` says otherwise; ``--share`` asks Gradio for a public link.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .api import accelerate
from .media import load_image
from .methods import names as _method_names
from .zoo import ask, build_prompt

logger = logging.getLogger(__name__)


class Demo:
    """Question answering on one loaded model, full budget vs ``budget`` with ``method``."""

    def __init__(self, model, processor, max_new_tokens: int = 16):
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens

    @torch.no_grad()
    def answer_image(self, image, question: str, budget: float = 0.33, method: str = "auto"):
        """``(full answer, accelerated answer, overlay, stats)``. The overlay dims the patches the method dropped
        (square token grids, e.g. LLaVA-1.5 / the default model, and Qwen grids; anyres images (LLaVA-NeXT /
        OneVision): the base view's tokens, the whole image at the tower's resolution)."""
        image = load_image(image)
        t0 = time.perf_counter()
        full = ask(self.model, self.processor, image, question, self.max_new_tokens)
        t_full = time.perf_counter() - t0
        with accelerate(self.model, budget=budget, method=method) as sess:
            t0 = time.perf_counter()
            fast = ask(self.model, self.processor, image, question, self.max_new_tokens)
            t_fast = time.perf_counter() - t0
            stats = sess.stats
            overlay = self._overlay(sess, image, question)
        info = {
            "method": sess.method_name,
            "budget": budget,
            "visual tokens": f"{stats.visual_tokens_kept} of {stats.visual_tokens_in}",
            "selection ms": round(stats.selection_ms, 2),
            "full answer s": round(t_full, 3),
            "accelerated answer s": round(t_fast, 3),
            "speedup": round(t_full / t_fast, 2) if t_fast > 0 else None,
        }
        self.last_table = comparison_table(full, fast, stats.visual_tokens_in, stats.visual_tokens_kept, t_full, t_fast)
        return full, fast, overlay, info

    def warm_up(self) -> None:
        """One full and one accelerated answer on a bundled sample, so the first click's timings are not cold."""
        from .zoo import samples

        s = samples("image")[0]
        self.answer_image(s["path"], s["question"])

    def _overlay(self, sess, image: Image.Image, question: str) -> Image.Image:
        inputs = self.processor(images=image, text=build_prompt(self.processor, question), return_tensors="pt")
        vision = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "image_sizes") if k in inputs}
        vision["pixel_values"] = vision["pixel_values"].to(self.model.device, self.model.dtype)
        enc = sess.encode_images(detailed=True, **vision)[0]
        n = int((inputs["input_ids"] == self.model.config.image_token_id).sum())
        index = enc.index.cpu()
        if "image_sizes" in vision:  # anyres: the base view (the whole image squashed to the tower's square) first
            vc = self.model.config.vision_config
            side = vc.image_size // vc.patch_size
            gh = gw = side
            index = index[index < side * side]
        elif "image_grid_thw" in vision:
            merge = self.model.config.vision_config.spatial_merge_size
            _, gh, gw = (int(v) for v in vision["image_grid_thw"][0])
            gh, gw = gh // merge, gw // merge
        else:
            gh = gw = math.isqrt(n)
        if gh * gw > n or ("image_sizes" not in vision and gh * gw != n):
            return image
        return dim_dropped(image, index, (gh, gw))

    def answer_video(self, path, question: str, budget: float = 0.33, method: str = "auto", frames: int = 8):
        """``(answer, stats, gallery)``: ``frames`` frames sampled uniformly, each reduced to ``budget``; a model with
        a video input (LLaVA-OneVision, Qwen-VL) gets them through it, an image-only model as a stream of images.

        ``gallery``: per sampled frame ``(image, caption)``, the dropped tokens dimmed (single-view token grids), a
        frame reused from the frame cache (threshold 0: exact repeats) framed in orange and captioned so. ``stats``:
        frames sampled / encoded / reused from the frame cache, and the visual tokens kept (video input: of the
        clip's tokens) or held in the stream (image-only)."""
        from .video import ask_video
        from .zoo import has_video_input

        if path is None:
            raise ValueError("no video: upload a video file first")
        if isinstance(frames, bool) or not float(frames).is_integer() or frames < 1:
            raise ValueError(f"frames must be a whole number >= 1, got {frames!r}")
        if has_video_input(self.model, self.processor):
            return self._answer_video_input(path, question, budget, method, int(frames))
        gallery = []

        def on_frame(frame, last):
            image = Image.fromarray(frame)
            n = len(gallery) + 1
            if last is None:
                gallery.append((mark_reused(image), f"frame {n}: reused from the frame cache"))
                return
            kept, (gh, gw) = last
            if gh * gw > 0 and int(kept.max()) < gh * gw:
                image = dim_dropped(image, kept.cpu(), (gh, gw))
            gallery.append((image, f"frame {n}: {kept.numel()} tokens kept"))

        answer, st = ask_video(
            self.model, self.processor, path, question, budget, method, int(frames), self.max_new_tokens, on_frame
        )
        info = {
            "frames sampled": st.frames_seen,
            "frames encoded": st.frames_encoded,
            "frames reused (frame cache)": st.frames_seen - st.frames_encoded,
            "frames held": st.frames_held,
            "visual tokens held": st.tokens_held,
        }
        return answer, info, gallery

    @torch.no_grad()
    def _answer_video_input(self, path, question: str, budget: float, method: str, frames: int):
        """A model with a video input (LLaVA-OneVision, Qwen-VL): ``frames`` frames sampled uniformly go through it
        (``zoo.ask``), reduced to ``budget`` per frame, with the frame cache at threshold 0 (a frame equal to the
        last encoded one reuses its features). The gallery shows each sampled frame with the tokens the language
        model dropped dimmed, a frame reused from the frame cache framed in orange."""
        from .video import load
        from .zoo import answer_inputs, load_media, media_inputs

        clip = load(path, num_frames=frames)  # a clear ValueError naming the file before any model work
        kind, images = load_media(clip, frames)
        inputs = media_inputs(self.model, self.processor, kind, images, question, self.max_new_tokens)
        with accelerate(self.model, budget=budget, method=method, frame_cache=VIDEO_FRAME_CACHE) as sess:
            answer = answer_inputs(self.model, self.processor, inputs, self.max_new_tokens)
            stats, trace = sess.stats, sess.trace
            reused = sess.frame_cache.stats.reused[0] if sess.frame_cache is not None else None
        units = _video_units(self.model, inputs, trace)
        gallery = []
        for i, (f, t) in enumerate(zip(clip.frames, clip.timestamps, strict=True)):
            image, caption = Image.fromarray(f), f"frame {i + 1} (t = {t:.2f} s)"
            if units is not None:
                u = min(i * len(units) // len(clip.frames), len(units) - 1)  # Qwen: a unit spans 2 frames
                kept, grid = units[u]
                image = dim_dropped(image, kept, grid)
                caption = f"frame {i + 1}: {kept.numel()} tokens kept"
                if reused is not None and reused[u]:
                    image = mark_reused(image)
                    caption = f"frame {i + 1}: reused from the frame cache, {kept.numel()} tokens kept"
            gallery.append((image, caption))
        info = {
            "input": "the model's video input",
            "method": sess.method_name,
            "budget per frame": budget,
            "frames sampled": len(clip.frames),
            "frames encoded": stats.frames_encoded,
            "frames reused (frame cache)": stats.frames_in - stats.frames_encoded,
            "visual tokens": f"{stats.visual_tokens_kept} of {stats.visual_tokens_in}",
        }
        return answer, info, gallery


VIDEO_FRAME_CACHE = 0.0  # the video tab's frame-cache threshold: exact repeats only (changes no answer)


def _video_units(model, inputs, trace) -> list[tuple[torch.Tensor, tuple[int, int]]] | None:
    """Per encoding unit of the one video in ``inputs`` (a frame; a temporal patch for Qwen): the flat indices of
    its tokens the language model's last layer processed (``trace``), and its token grid ``(h, w)``.

    The video's placeholders in the prompt are its units' tokens in order, ``h * w`` each, then any structural ones
    (LLaVA-OneVision's trailing newline). ``None`` when the layout does not fit that."""
    if trace is None:
        return None
    cfg = model.config
    video_id = getattr(cfg, "video_token_id", None)
    video_id = getattr(cfg, "video_token_index", None) if video_id is None else video_id
    where = (inputs["input_ids"][0] == video_id).nonzero().flatten().cpu()
    if "video_grid_thw" in inputs:
        merge = cfg.vision_config.spatial_merge_size
        n_units, gh, gw = (int(v) for v in inputs["video_grid_thw"][0])
        grid = (gh // merge, gw // merge)
    else:
        n_units = inputs["pixel_values_videos"].shape[1]
        side = math.isqrt(where.numel() // max(n_units, 1))
        grid = (side, side)
    per = grid[0] * grid[1]
    if per == 0 or n_units * per > where.numel() or where.numel() - n_units * per > n_units:
        return None
    index = trace.output_index if trace.output_index is not None else trace.index
    valid = trace.output_valid if trace.output_valid is not None else trace.valid
    kept_pos = index[0][valid[0].bool()].cpu()
    local = torch.searchsorted(where, kept_pos).clamp(max=where.numel() - 1)  # place among the video's placeholders
    local = local[(where[local] == kept_pos) & (local < n_units * per)]
    return [(local[(local >= u * per) & (local < (u + 1) * per)] - u * per, grid) for u in range(n_units)]


def comparison_table(full: str, fast: str, tokens_in: int, tokens_kept: int, t_full: float, t_fast: float):
    """Rows ``[run, answer, visual tokens, seconds, speedup]`` of the full and the accelerated run."""
    speed = f"{t_full / t_fast:.2f}x" if t_fast > 0 else "-"
    return [
        ["all tokens", full, tokens_in, round(t_full, 3), "1.00x"],
        ["accelerated", fast, tokens_kept, round(t_fast, 3), speed],
    ]


TABLE_HEADERS = ["run", "answer", "visual tokens", "seconds", "speedup"]


def mark_reused(image: Image.Image, width: int = 4) -> Image.Image:
    """``image`` framed in orange: a frame whose tokens were reused from the frame cache (not encoded again)."""
    out = np.asarray(image.convert("RGB")).copy()
    out[:width], out[-width:], out[:, :width], out[:, -width:] = (
        (255, 140, 0),
        (255, 140, 0),
        (255, 140, 0),
        (255, 140, 0),
    )
    return Image.fromarray(out)


def dim_dropped(image: Image.Image, kept: torch.Tensor, grid: tuple[int, int], factor: float = 0.25) -> Image.Image:
    """``image`` with the token-grid cells not in ``kept`` (flat indices into ``grid`` ``(h, w)``) dimmed."""
    gh, gw = grid
    mask = np.zeros(gh * gw, dtype=np.float32)
    mask[kept.numpy()] = 1.0
    cells = Image.fromarray((mask.reshape(gh, gw) * 255).astype(np.uint8)).resize(image.size, Image.NEAREST)
    keep = np.asarray(cells, dtype=np.float32)[..., None] / 255.0
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray((pixels * (factor + (1 - factor) * keep)).astype(np.uint8))


SAMPLE_VIDEO = Path(__file__).resolve().parent.parent / "demo" / "samples" / "scenes.mp4"


def checked_image(gr, **kwargs):
    """A ``gr.Image(**kwargs)`` whose upload is checked by the demo: a file that is not an image (a text file named
    ``.png``, 0 bytes) shows the demo's message instead of Gradio's generic error (Gradio opens it with PIL before any
    handler). The check wraps the instance's ``preprocess`` (a subclass would make Gradio write a ``.pyi`` stub)."""
    image = gr.Image(**kwargs)
    preprocess = image.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
            name = getattr(payload, "orig_name", None) or "the upload"
            logger.info("demo: unreadable image %s: %s", name, e)
            raise gr.Error(f"{name}: not a readable image file", print_exception=False) from None

    image.preprocess = checked
    return image


def _user_errors(fn, gr):
    """``fn`` with user errors (bad file, unsupported format, too long a question) shown as a message in the page."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, RuntimeError, FileNotFoundError, NotImplementedError) as e:
            logger.info("demo: %s: %s", type(e).__name__, e)
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise gr.Error(message, print_exception=False) from None

    return run


def build_app(demo: Demo):
    """The Gradio Blocks app (not launched). Budget and method are read on every click (no restart); a progress bar
    runs while the model works; errors show as messages."""
    try:
        import gradio as gr
    except ImportError as e:
        raise ImportError('the demo needs Gradio: pip install "vlm-accel[demo]"') from e
    from .zoo import has_video_input, samples

    choices = ["auto", *_method_names()]
    video_input = has_video_input(demo.model, demo.processor)  # the bundled clips' questions need it

    def ask_image(image, question, budget, method, progress=gr.Progress()):  # noqa: B008  (Gradio's way)
        progress(0.1, desc="running the full and the accelerated model")
        full, fast, overlay, info = demo.answer_image(image, question, float(budget), method)
        progress(1.0, desc="done")
        return full, fast, overlay, demo.last_table, info

    def ask_video(video, question, budget, method, frames, progress=gr.Progress()):  # noqa: B008  (Gradio's way)
        progress(0.1, desc="decoding, encoding and reducing frames")
        answer, info, gallery = demo.answer_video(video, question, float(budget), method, int(frames))
        progress(1.0, desc="done")
        return answer, gallery, info

    with gr.Blocks(title="vlm-accel") as app:
        gr.Markdown("# vlm-accel\nThe same model on every visual token and on a budget, side by side.")
        with gr.Tab("Image", elem_id="tab-image"):
            with gr.Row():
                with gr.Column():
                    image = checked_image(gr, type="pil", label="image", elem_id="image-input")
                    question = gr.Textbox(label="question", value="What color is the circle?", elem_id="question")
                    budget = gr.Slider(
                        0.02, 1.0, value=0.33, step=0.01, label="budget (fraction of visual tokens)", elem_id="budget"
                    )
                    method = gr.Dropdown(choices, value="auto", label="method", elem_id="method")
                    go = gr.Button("Ask", variant="primary", elem_id="ask")
                with gr.Column():
                    full = gr.Textbox(label="answer, all tokens", elem_id="answer-full")
                    fast = gr.Textbox(label="answer, accelerated", elem_id="answer-fast")
                    overlay = gr.Image(type="pil", label="kept tokens (dropped ones dimmed)", elem_id="overlay")
                    table = gr.Dataframe(headers=TABLE_HEADERS, label="full vs accelerated", elem_id="table")
                    stats = gr.JSON(label="stats", elem_id="stats")
            go.click(
                _user_errors(ask_image, gr), [image, question, budget, method], [full, fast, overlay, table, stats]
            )
            gr.Examples([[str(s["path"]), s["question"]] for s in samples("image")], [image, question])
        with gr.Tab("Video", elem_id="tab-video"):
            with gr.Row():
                with gr.Column():
                    video = gr.Video(label="video", elem_id="video-input")
                    vquestion = gr.Textbox(label="question", value="What color is the shape?", elem_id="vquestion")
                    vbudget = gr.Slider(0.02, 1.0, value=0.25, step=0.01, label="budget per frame", elem_id="vbudget")
                    vframes = gr.Slider(1, 32, value=8, step=1, label="frames", elem_id="vframes")
                    vmethod = gr.Dropdown(choices, value="auto", label="method", elem_id="vmethod")
                    vgo = gr.Button("Ask", variant="primary", elem_id="vask")
                with gr.Column():
                    vanswer = gr.Textbox(label="answer", elem_id="vanswer")
                    vgallery = gr.Gallery(
                        label="frames: kept tokens (dropped dimmed); orange = reused from the frame cache",
                        columns=4,
                        elem_id="vgallery",
                    )
                    vstats = gr.JSON(label="stats", elem_id="vstats")
            vgo.click(
                _user_errors(ask_video, gr),
                [video, vquestion, vbudget, vmethod, vframes],
                [vanswer, vgallery, vstats],
            )
            clips = [[s["path"], s["question"]] for s in samples("video")] if video_input else []
            if SAMPLE_VIDEO.is_file():
                clips.append([str(SAMPLE_VIDEO), "What color is the shape?"])
            gr.Examples(clips, [video, vquestion])
    return app


def launch_options(host: str | None = None, port: int = 7860, share: bool = False) -> dict:
    """``gradio.Blocks.launch`` keywords: 127.0.0.1 unless ``host`` is given (``0.0.0.0`` for every interface)."""
    return {"server_name": host or "127.0.0.1", "server_port": port, "share": share}


def launch(model_dir: str | None = None, port: int = 7860, share: bool = False, host: str | None = None) -> None:
    """Load the model (default: the embedded one) and serve the app on ``host:port`` (default 127.0.0.1)."""
    from .loading import load_model

    model, processor = load_model(model_dir)
    demo = Demo(model, processor)
    demo.warm_up()
    build_app(demo).launch(**launch_options(host, port, share))


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="vlm-accel demo", description="Gradio app: image and video Q&A")
    add_arguments(ap)
    a = ap.parse_args(argv)
    launch(a.model, a.port, a.share, a.host)
    return 0


def add_arguments(ap) -> None:
    ap.add_argument("--model", default=None, help="local model directory (default: the embedded model)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--host", default=None, help="address to bind (default 127.0.0.1; 0.0.0.0: every interface)")
    ap.add_argument("--share", action="store_true", help="a public Gradio link")


if __name__ == "__main__":
    raise SystemExit(main())
