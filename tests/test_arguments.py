"""Every argument checked before anything runs, with messages that name it (issue #28, items 2-3)."""

import math

import pytest
import torch

import vlm_accel
from vlm_accel import cli, zoo

import tiny


@pytest.fixture(scope="module")
def llava():
    return tiny.build("llava")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(method="fastv", method_options="layer=2"), TypeError, "method_options must be a dict"),
        (dict(frame_cache="0.1"), TypeError, "frame_cache must be a number"),
        (dict(frame_cache=math.nan), ValueError, "frame_cache threshold must be a finite number"),
        (dict(frame_cache=-1.0), ValueError, "frame_cache threshold must be a finite number"),
        (dict(seed="x"), TypeError, "seed must be an int"),
        (dict(seed=True), TypeError, "seed must be an int"),
        (dict(method="tome_vit", method_options={"start": 99}), ValueError, r"start=99 but the vision tower has 3"),
        (dict(method="fastv", method_options={"layer": 9}), ValueError, "does not fit a language model of 2 layers"),
        (dict(method=3), TypeError, "method must be a string"),
    ],
)
def test_accelerate_names_the_bad_argument(llava, kwargs, error, match):
    with pytest.raises(error, match=match):
        vlm_accel.accelerate(llava, budget=0.25, **kwargs)
    assert not hasattr(llava, "_vlm_accel_session") and "forward" not in vars(llava)  # nothing was patched


def test_fastv_rows_longer_than_the_prompt_is_refused_not_an_index_error(llava):
    inputs = tiny.make_inputs(llava, "llava", batch=1)
    n = inputs["input_ids"].shape[1]
    with vlm_accel.accelerate(llava, budget=0.25, method="fastv", method_options={"rows": n + 1}) as sess:
        with pytest.raises(ValueError, match=f"rows={n + 1} scoring rows, but the shortest prompt .* tokens"):
            with torch.no_grad():
                llava(**inputs)
        assert not sess.capture.pending.infos and sess.stages.run is None  # the failed request left nothing behind


SAMPLE = str(zoo.samples("image")[0]["path"])


@pytest.mark.parametrize(
    "argv,match",
    [
        (["ask", SAMPLE, "q", "--method", "fastv"], "without --budget nothing is reduced"),
        (["ask", SAMPLE, "q", "--option", "layer=2"], "without --budget nothing is reduced"),
        (["ask", ".", "q", "--budget", "0.5"], "is a directory"),
        (["ask", "missing.png", "q"], "image not found"),
        (["ask", SAMPLE, "q", "--budget", "0.5", "--method", "fastv", "--option", "layer=abc"], "bad value 'abc'"),
        (["ask", SAMPLE, "q", "--budget", "1.0", "--method", "fastv", "--option", "layer=abc"], "bad value 'abc'"),
        (["ask", SAMPLE, "q", "--budget", "0.5", "--method", "fastv", "--option", "rows=1000000"], "rows=1000000"),
    ],
)
def test_cli_errors_are_one_line(capsys, argv, match):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlm-accel: error:"), captured.err
    assert pytest.importorskip("re").search(match, err[0]), err[0]
    assert "Traceback" not in captured.out + captured.err


@pytest.mark.parametrize(
    "kwargs", [dict(num_frames=2.5), dict(num_frames=0), dict(max_new_tokens="8"), dict(num_frames=True)]
)
def test_ask_checks_its_counts(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"{name} must be a whole number >= 1"):
        zoo.ask(None, None, SAMPLE, "What color is the circle?", **kwargs)


@pytest.mark.parametrize(
    "kwargs,error",
    [(dict(frame_cache="0"), TypeError), (dict(frame_cache=math.inf), ValueError), (dict(max_tokens=True), ValueError)],
)
def test_stream_checks_its_arguments(kwargs, error):
    model, processor = zoo.load_default()
    with pytest.raises(error, match=next(iter(kwargs))):
        vlm_accel.stream(model, processor, **kwargs)
    assert not hasattr(model, "_vlm_accel_session")
