"""``vlm-accel`` command line: ``ask`` (image or video), ``demo``, ``methods``, ``bench speed|vqa|videoqa|video``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def _budget(text: str):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number, got {text!r}") from None
    return int(value) if ("." not in text and "e" not in text.lower()) else value


def load_model(path: str | None):
    """The embedded default (``path=None``) or any supported checkpoint directory, offline."""
    from . import zoo

    if path is None:
        return zoo.load_default()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"--model {path}: not a model directory (no config.json)")
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(path, local_files_only=True)


VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


def cmd_ask(a) -> int:
    import vlm_accel

    from . import zoo

    if Path(a.image).suffix.lower() in VIDEO_SUFFIXES:
        return _ask_video(a)
    image = zoo.load_image(a.image)  # clear ValueError before loading any model
    model, processor = load_model(a.model)
    if a.budget is not None and a.budget != 1.0:
        with vlm_accel.accelerate(model, budget=a.budget, method=a.method) as sess:
            answer = zoo.ask(model, processor, image, a.question, max_new_tokens=a.max_new_tokens)
        logger.info("visual tokens kept: %d of %d", sess.stats.visual_tokens_kept, sess.stats.visual_tokens_in)
    else:
        answer = zoo.ask(model, processor, image, a.question, max_new_tokens=a.max_new_tokens)
    print(answer)  # noqa: T201
    return 0


def _ask_video(a) -> int:
    from .video import ask_video, load

    clip = load(a.image, num_frames=a.frames)  # decoded once; a clear ValueError before loading any model
    model, processor = load_model(a.model)
    budget = 1.0 if a.budget is None else a.budget
    answer, st = ask_video(model, processor, clip, a.question, budget, a.method, max_new_tokens=a.max_new_tokens)
    logger.info(
        "frames: %d sampled, %d encoded, %d held (%d tokens)",
        st.frames_seen,
        st.frames_encoded,
        st.frames_held,
        st.tokens_held,
    )
    print(answer)  # noqa: T201
    return 0


def cmd_methods(a) -> int:
    from .methods import get, names

    for n in names():
        print(f"{n:12s} {get(n).description}")  # noqa: T201
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vlm-accel", description="Make vision-language models fast with one line.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser(
        "ask", help="answer a question about an image or a video (the answer is the last line of stdout)"
    )
    q.add_argument("image", help="image file, or video file (.mp4, .avi, .mov, .mkv, .webm)")
    q.add_argument("question")
    q.add_argument("--budget", type=_budget, default=None, help="fraction (0, 1] or tokens per image")
    q.add_argument("--method", default="auto")
    q.add_argument("--model", default=None, help="local model directory (default: the embedded model)")
    q.add_argument("--max-new-tokens", type=int, default=8)
    q.add_argument("--frames", type=int, default=8, help="video: frames sampled uniformly")
    q.set_defaults(fn=cmd_ask)

    from . import demo

    d = sub.add_parser("demo", help="start the Gradio app: image and video Q&A, full vs accelerated")
    demo.add_arguments(d)
    d.set_defaults(fn=lambda a: demo.launch(a.model, a.port, a.share))

    m = sub.add_parser("methods", help="list the registered token-reduction methods")
    m.set_defaults(fn=cmd_methods)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    from .bench import speed

    s = bsub.add_parser("speed", help="prefill / end-to-end speed vs the token-count ideal")
    speed.add_arguments(s)
    s.set_defaults(fn=lambda a: speed.run_args(a) and 0)
    from .bench import video, videoqa, vqa

    v = bsub.add_parser("vqa", help="accuracy retained vs budget on a VQA set")
    vqa.add_arguments(v)
    v.set_defaults(fn=vqa.cli)
    vq = bsub.add_parser("videoqa", help="video Q&A accuracy retained vs budget")
    videoqa.add_arguments(vq)
    vq.set_defaults(fn=videoqa.cli)
    vs = bsub.add_parser("video", help="video prefill speed vs frames and frame-cache savings")
    video.add_arguments(vs)
    vs.set_defaults(fn=video.cli)

    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return a.fn(a) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"vlm-accel: error: {e}", file=sys.stderr)  # noqa: T201
        return 2


if __name__ == "__main__":
    sys.exit(main())
