"""Gradio demo: image and video Q&A, the accelerated model beside the full one.

    vlm-accel demo [--model DIR] [--port 7860] [--share]      # needs: pip install "vlm-accel[demo]"

The handlers (:class:`Demo`) are plain functions of the inputs, usable and tested without Gradio; :func:`build_app`
wires them into a ``gradio.Blocks`` app.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from PIL import Image

from .api import accelerate
from .loading import load_image
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
        (square token grids, e.g. LLaVA-1.5 / the default model, and Qwen grids; anyres images are shown as is)."""
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
            "visual tokens": f"{stats.visual_tokens_kept} of {stats.visual_tokens_in}",
            "selection ms": round(stats.selection_ms, 2),
            "full answer s": round(t_full, 3),
            "accelerated answer s": round(t_fast, 3),
        }
        return full, fast, overlay, info

    def _overlay(self, sess, image: Image.Image, question: str) -> Image.Image:
        inputs = self.processor(images=image, text=build_prompt(self.processor, question), return_tensors="pt")
        vision = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
        if "image_sizes" in inputs:  # anyres: base view and crops have no single grid to draw
            return image
        vision["pixel_values"] = vision["pixel_values"].to(self.model.device, self.model.dtype)
        enc = sess.encode_images(detailed=True, **vision)[0]
        n = int((inputs["input_ids"] == self.model.config.image_token_id).sum())
        if "image_grid_thw" in vision:
            merge = self.model.config.vision_config.spatial_merge_size
            _, gh, gw = (int(v) for v in vision["image_grid_thw"][0])
            gh, gw = gh // merge, gw // merge
        else:
            gh = gw = math.isqrt(n)
        if gh * gw != n:
            return image
        return dim_dropped(image, enc.index.cpu(), (gh, gw))

    def answer_video(self, path, question: str, budget: float = 0.33, method: str = "auto", frames: int = 8):
        """``(answer, stats)``: ``frames`` frames streamed as images, each reduced to ``budget``."""
        from .video import ask_video

        answer, st = ask_video(
            self.model, self.processor, path, question, budget, method, int(frames), self.max_new_tokens
        )
        info = {
            "frames sampled": st.frames_seen,
            "frames encoded": st.frames_encoded,
            "frames held": st.frames_held,
            "visual tokens held": st.tokens_held,
        }
        return answer, info


def dim_dropped(image: Image.Image, kept: torch.Tensor, grid: tuple[int, int], factor: float = 0.25) -> Image.Image:
    """``image`` with the token-grid cells not in ``kept`` (flat indices into ``grid`` ``(h, w)``) dimmed."""
    gh, gw = grid
    mask = np.zeros(gh * gw, dtype=np.float32)
    mask[kept.numpy()] = 1.0
    cells = Image.fromarray((mask.reshape(gh, gw) * 255).astype(np.uint8)).resize(image.size, Image.NEAREST)
    keep = np.asarray(cells, dtype=np.float32)[..., None] / 255.0
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray((pixels * (factor + (1 - factor) * keep)).astype(np.uint8))


def build_app(demo: Demo):
    """The Gradio Blocks app (not launched)."""
    try:
        import gradio as gr
    except ImportError as e:
        raise ImportError('the demo needs Gradio: pip install "vlm-accel[demo]"') from e
    from .zoo import samples

    choices = ["auto", *_method_names()]
    with gr.Blocks(title="vlm-accel") as app:
        gr.Markdown("# vlm-accel\nThe same model on every visual token and on a budget, side by side.")
        with gr.Tab("Image"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="pil", label="image")
                    question = gr.Textbox(label="question", value="What color is the circle?")
                    budget = gr.Slider(0.02, 1.0, value=0.33, step=0.01, label="budget (fraction of visual tokens)")
                    method = gr.Dropdown(choices, value="auto", label="method")
                    go = gr.Button("Ask", variant="primary")
                with gr.Column():
                    full = gr.Textbox(label="answer, all tokens")
                    fast = gr.Textbox(label="answer, accelerated")
                    overlay = gr.Image(type="pil", label="kept tokens (dropped ones dimmed)")
                    stats = gr.JSON(label="stats")
            go.click(demo.answer_image, [image, question, budget, method], [full, fast, overlay, stats])
            gr.Examples([[str(s["path"]), s["question"]] for s in samples()], [image, question])
        with gr.Tab("Video"):
            with gr.Row():
                with gr.Column():
                    video = gr.Video(label="video")
                    vquestion = gr.Textbox(label="question")
                    vbudget = gr.Slider(0.02, 1.0, value=0.25, step=0.01, label="budget per frame")
                    vframes = gr.Slider(1, 32, value=8, step=1, label="frames")
                    vmethod = gr.Dropdown(choices, value="auto", label="method")
                    vgo = gr.Button("Ask", variant="primary")
                with gr.Column():
                    vanswer = gr.Textbox(label="answer")
                    vstats = gr.JSON(label="stats")
            vgo.click(demo.answer_video, [video, vquestion, vbudget, vmethod, vframes], [vanswer, vstats])
    return app


def launch(model_dir: str | None = None, port: int = 7860, share: bool = False) -> None:
    """Load the model (default: the embedded one) and serve the app."""
    from .loading import load_model

    model, processor = load_model(model_dir)
    build_app(Demo(model, processor)).launch(server_port=port, share=share)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="vlm-accel demo", description="Gradio app: image and video Q&A")
    add_arguments(ap)
    a = ap.parse_args(argv)
    launch(a.model, a.port, a.share)
    return 0


def add_arguments(ap) -> None:
    ap.add_argument("--model", default=None, help="local model directory (default: the embedded model)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="a public Gradio link")


if __name__ == "__main__":
    raise SystemExit(main())
