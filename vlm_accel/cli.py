"""``vlm-accel`` command line: ``ask`` (image or video), ``demo``, ``methods``, ``bench speed|vqa|videoqa|video``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from .loading import load_model  # noqa: F401  (the library function; still importable from here)

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``vlm-accel: error: ...``) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"vlm-accel: error: {message} (see: {self.prog} --help)\n")


def _budget(text: str):
    """``--budget``: a float in (0, 1] is a fraction of visual tokens, an integer a token count (as in the library:
    ``1`` keeps one token per image / frame, ``1.0`` keeps them all)."""
    import math

    from .control.budget import Budget

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"budget must be a finite number, got {text!r}")
    if "." not in text and "e" not in text.lower():
        value = int(value)
    try:
        Budget.of(value)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _method(text: str) -> str:
    from .methods import names

    known = names()
    for part in text.split("+"):  # tower, pre-LLM and in-LLM methods may be joined: tome_vit+visionzip, visionzip+fastv
        if part != "auto" and part not in known:
            raise argparse.ArgumentTypeError(f"unknown method {part!r}; choose auto or one of: {', '.join(known)}")
    return text


def _option(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` (the value read as a Python literal when it is one: ``layer=2``, ``layers=[4,8]``)."""
    import ast

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--budget -inf`` → ``--budget=-inf``: argparse would read a value starting with ``-`` as an option."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--budget", "--frames") and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


def cmd_ask(a) -> int:
    import vlm_accel

    from . import zoo
    from .media import load_image

    if a.budget == 1 and isinstance(a.budget, int):
        logger.warning(
            "--budget 1 keeps ONE visual token per image / frame (an integer is a token count); "
            "pass --budget 1.0 to keep all of them"
        )
    if a.budget is None and (a.method != "auto" or a.option):
        raise ValueError(
            f"--method / --option choose how to reduce, but without --budget nothing is reduced: add --budget "
            f"(e.g. --budget 0.25) to run {a.method!r}"
        )
    if Path(a.image).is_dir():
        raise ValueError(f"{a.image} is a directory, not an image or a video file")
    if Path(a.image).suffix.lower() in VIDEO_SUFFIXES:
        return _ask_video(a)
    image = load_image(a.image)  # clear ValueError before loading any model
    model, processor = load_model(a.model)
    if a.budget is not None:  # 1.0 too: bit-identical, and the method and its options are checked
        options = dict(a.option) or None
        with vlm_accel.accelerate(model, budget=a.budget, method=a.method, method_options=options) as sess:
            answer = zoo.ask(model, processor, image, a.question, max_new_tokens=a.max_new_tokens)
        logger.info("visual tokens kept: %d of %d", sess.stats.visual_tokens_kept, sess.stats.visual_tokens_in)
    else:
        answer = zoo.ask(model, processor, image, a.question, max_new_tokens=a.max_new_tokens)
    print(answer)  # noqa: T201
    return 0


def _ask_video(a) -> int:
    """A video: through the model's own video input when it has one (``zoo.ask``, ``--frames`` sampled uniformly,
    ``--budget`` per frame), else its frames streamed as images (:func:`vlm_accel.video.ask_video`)."""
    import vlm_accel

    from . import zoo
    from .video import ask_video, load

    clip = load(a.image, num_frames=a.frames)  # decoded once; a clear ValueError before loading any model
    model, processor = load_model(a.model)
    budget = 1.0 if a.budget is None else a.budget
    if zoo.has_video_input(model, processor):
        if a.budget is None:
            answer = zoo.ask(model, processor, clip, a.question, a.max_new_tokens, num_frames=a.frames)
        else:
            options = dict(a.option) or None
            with vlm_accel.accelerate(model, budget=budget, method=a.method, method_options=options) as sess:
                answer = zoo.ask(model, processor, clip, a.question, a.max_new_tokens, num_frames=a.frames)
            logger.info("visual tokens kept: %d of %d", sess.stats.visual_tokens_kept, sess.stats.visual_tokens_in)
        print(answer)  # noqa: T201
        return 0
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
    """Every registered name by pipeline stage, from the one registry (:mod:`vlm_accel.methods`)."""
    from .methods import STAGES, get, names

    for stage, label in STAGES.items():
        print(f"{label}:")  # noqa: T201
        for n in names(stage):
            m = get(n, (stage,))
            print(f"  {n:12s} {m.description}")  # noqa: T201
            for k, o in m.options.items():
                print(f"{'':16s}--option {k}=...  {o.doc} (default {o.default!r})")  # noqa: T201
    return 0


def cmd_calibrate(a) -> int:
    from .control.calibration import cache_dir, calibrate
    from .loading import load_model

    size = _view_size(a.tower) if a.tower else None
    model, _ = load_model(a.model)
    model.to(a.device)
    cost = calibrate(model, model.model.language_model)
    print(f"prefill cost: {cost.describe()}")  # noqa: T201
    print(f"measured: {dict(zip(cost.lengths, [round(m, 2) for m in cost.measured_ms], strict=True))} (tokens: ms)")  # noqa: T201
    print(f"cached in {cache_dir() / 'calibration.json'} under {cost.key}")  # noqa: T201
    if a.tower:
        _calibrate_tower(model, size)
    return 0


def _view_size(spec: str) -> tuple[int, int]:
    try:
        h, _, w = spec.lower().partition("x")
        return int(h), int(w or h)
    except ValueError:
        raise ValueError(f"--tower takes the view size in pixels, e.g. 224 or 336x336; got {spec!r}") from None


def _calibrate_tower(model, size: tuple[int, int]) -> None:
    """``--tower 224`` / ``336x336`` (``size``: height, width): the vision encoder's cost per view for ``tome_vit``
    under ``latency_ms`` (the configured schedule and the fallback), measured now instead of on the first request."""
    from . import accelerate
    from .control.budget import Budget
    from .control.calibration import calibrate_tower

    sess = accelerate(model, Budget(latency_ms=1e12), method="tome_vit")  # ValueError for towers it cannot merge
    try:
        lm = sess.adapter.language_model
        for schedule in sess.steering.schedules:
            cost = calibrate_tower(model, lm, sess.steering.probe, size, schedule)
            print(f"vision encoder per {size[0]}x{size[1]} view, {schedule} schedule: {cost.describe()}")  # noqa: T201
    finally:
        sess.restore()


def main(argv=None) -> int:
    p = _Parser(prog="vlm-accel", description="Make vision-language models fast with one line.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    q = sub.add_parser(
        "ask", help="answer a question about an image or a video (the answer is the last line of stdout)"
    )
    q.add_argument("image", help="image file, or video file (.mp4, .avi, .mov, .mkv, .webm)")
    q.add_argument("question")
    q.add_argument(
        "--budget",
        type=_budget,
        default=None,
        help="fraction of visual tokens kept, e.g. 0.25 (1.0: all), or an integer count per image / frame (1: one)",
    )
    q.add_argument("--method", type=_method, default="auto", help="auto or a name from `vlm-accel methods`")
    q.add_argument(
        "--option", type=_option, action="append", default=[], help="method option NAME=VALUE, e.g. layer=2 (repeat)"
    )
    q.add_argument("--model", default=None, help="local model directory (default: the embedded model)")
    q.add_argument("--max-new-tokens", type=_positive_int, default=8)
    q.add_argument("--frames", type=_positive_int, default=8, help="video: frames sampled uniformly")
    q.set_defaults(fn=cmd_ask)

    from . import demo

    d = sub.add_parser("demo", help="start the Gradio app: image and video Q&A, full vs accelerated")
    demo.add_arguments(d)
    d.set_defaults(fn=lambda a: demo.launch(a.model, a.port, a.share, a.host))

    m = sub.add_parser("methods", help="list the registered token-reduction methods")
    m.set_defaults(fn=cmd_methods)

    c = sub.add_parser("calibrate", help="measure the latency cost model used by Budget(latency_ms=...) and cache it")
    c.add_argument("--model", default=None, help="local model directory (default: the embedded model)")
    c.add_argument("--device", default="cpu", help="device to calibrate on (cpu, cuda, cuda:1 ...)")
    c.add_argument(
        "--tower", default=None, metavar="SIZE", help="also the vision encoder per view for tome_vit (224, 336x336)"
    )
    c.set_defaults(fn=cmd_calibrate)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    from .bench import controller, encoder, inllm, kernels, kv, patch_cache, speed, video, videoqa, vqa

    benches = [  # (name, module, help): each module has add_arguments(parser) and cli(args)
        ("speed", speed, "prefill / end-to-end speed vs the token-count ideal"),
        ("vqa", vqa, "accuracy retained vs budget on a VQA set"),
        ("videoqa", videoqa, "video Q&A accuracy retained vs budget"),
        ("video", video, "video prefill speed vs frames and frame-cache savings"),
        ("kernels", kernels, "selection time per method vs one decoder layer (kernel vs reference)"),
        ("kv", kv, "KV compression: bytes held, decode speed, accuracy retained"),
        ("controller", controller, "budget controller: latency / memory targets met, information-aware split"),
        ("inllm", inllm, "in-LLM pruning vs pre-LLM at equal mean tokens; LLM prefill speed"),
        ("encoder", encoder, "token merging inside the vision tower: end-to-end speed, ViT share, accuracy"),
        ("patch-cache", patch_cache, "per-patch vs whole-frame video frame cache: tower time, feature error"),
    ]
    for name, module, text in benches:
        bp = bsub.add_parser(name, help=text)
        module.add_arguments(bp)
        bp.set_defaults(fn=module.cli)

    a = p.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        with _quiet_transformers(a.verbose):
            return a.fn(a) or 0
    except (ValueError, TypeError, OSError, RuntimeError) as e:  # one line, no traceback (-v logs it)
        logger.debug("traceback", exc_info=True)
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"vlm-accel: error: {message}", file=sys.stderr)  # noqa: T201
        return 2


@contextlib.contextmanager
def _quiet_transformers(verbose: bool):
    """Without ``-v``: no weight-loading progress bars or tokenizer warnings from transformers on stderr (restored
    after the command)."""
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
