"""`vlm-accel ask` on the embedded model: images and videos, answer on the last stdout line, clear errors."""

import logging

import pytest

from vlm_accel import cli, zoo


def test_ask_image_prints_the_answer_last(capsys):
    s = zoo.samples("image")[0]
    assert cli.main(["ask", str(s["path"]), s["question"], "--budget", "0.33"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == s["answer"]


@pytest.mark.parametrize("name", ["missing.png", "missing.mp4"])
def test_ask_missing_file_is_a_clear_error(tmp_path, capsys, name):
    assert cli.main(["ask", str(tmp_path / name), "What shape is in the image?"]) == 2
    assert "not found" in capsys.readouterr().err


def test_ask_corrupt_image(tmp_path, capsys):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    assert cli.main(["ask", str(bad), "What shape is in the image?"]) == 2
    assert "cannot read image" in capsys.readouterr().err


@pytest.fixture(scope="module")
def image_only_dir(tmp_path_factory):
    """A tiny image-only LLaVA shaped like the default (DINOv2 at 224 px, 256 tokens per image; random weights) with
    the default image model's processor, saved as a model directory."""
    import tiny

    model, processor = tiny.build_default_like()
    d = tmp_path_factory.mktemp("image_only")
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def test_ask_video_streams_the_sampled_frames(tmp_path, capsys, caplog, image_only_dir):
    """An image-only model (``--model DIR``) answers a clip from its sampled frames streamed as images, each reduced
    to ``--budget`` tokens; the log says how many frames were sampled and how many tokens the stream held."""
    pytest.importorskip("av")
    from vlm_accel.zoo.clips import write_clips

    write_clips(tmp_path, n=1, frames=6)
    clip = tmp_path / "clip_0000.mp4"
    argv = ["ask", str(clip), "What color is the shape?", "--frames", "4", "--budget", "16"]
    with caplog.at_level(logging.INFO, logger="vlm_accel.cli"):
        rc = cli.main([*argv, "--model", str(image_only_dir)])
    assert rc == 0
    assert capsys.readouterr().out.strip().splitlines()  # an answer line (random weights: any words)
    (msg,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("frames:")]
    held = int(msg.split("(")[1].split()[0])
    assert msg.startswith("frames: 4 sampled") and held % 16 == 0 and 16 <= held <= 64


def test_in_llm_method_with_options_and_listing(capsys):
    """``--method fastv --option layer=1`` answers what the Python API answers with the same method and option."""
    import vlm_accel

    s = zoo.samples("image")[0]
    args = ["ask", str(s["path"]), s["question"], "--budget", "0.33", "--method", "fastv", "--option", "layer=1"]
    assert cli.main(args) == 0
    model, processor = zoo.load_default()
    with vlm_accel.accelerate(model, budget=0.33, method="fastv", method_options={"layer": 1}):
        expected = zoo.ask(model, processor, s["path"], s["question"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == expected
    assert cli.main(args[:-1] + ["K=1"]) == 2
    assert "valid options: layer" in capsys.readouterr().err
    assert cli.main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "fastv" in listing and "--option layer=" in listing and "snapkv" in listing


def test_tower_method_from_the_command_line(capsys):
    s = zoo.samples("image")[0]
    assert cli.main(["ask", str(s["path"]), s["question"], "--budget", "0.33", "--method", "tome_vit"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == s["answer"]
    assert cli.main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "inside the vision tower:\n  tome_vit " in listing


def test_methods_lists_the_one_registry_by_stage(capsys):
    """``vlm-accel methods`` prints every registered name under its stage, in pipeline order, from the registry."""
    import vlm_accel
    from vlm_accel.methods import STAGES

    assert cli.main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    headers = [i for i, line in enumerate(lines) if not line.startswith(" ")]
    assert [lines[i] for i in headers] == [f"{label}:" for label in STAGES.values()]
    for (start, end), stage in zip(zip(headers, [*headers[1:], len(lines)], strict=True), STAGES, strict=True):
        listed = [line.split()[0] for line in lines[start + 1 : end] if not line.startswith("    ")]
        assert listed == vlm_accel.methods(stage)
    assert vlm_accel.methods() == vlm_accel.methods("tower", "pre", "llm")  # every name accelerate(method=) takes
