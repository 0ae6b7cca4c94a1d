"""The command line on careless input: one-line messages and exit code 2 instead of tracebacks; arguments checked
before any file or model is touched; one meaning of ``--budget``; the library never imports the command line."""

import ast
import importlib
import json
import logging
import re
from pathlib import Path

import pytest

from vlm_accel import cli, zoo

PKG = Path(cli.__file__).resolve().parent


def run_cli(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``vlm-accel ARGV``, whether it returns or exits."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlm-accel: error:"), err
    assert "Traceback" not in err and "_budget" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


SAMPLE = str(zoo.samples()[0]["path"])


@pytest.mark.parametrize(
    "value,needle",
    [
        ("inf", "finite"),
        ("nan", "finite"),
        ("-inf", "finite"),
        ("-3", ">= 1"),
        ("0", ">= 1"),
        ("1.5", "(0, 1]"),
        ("half", "number"),
    ],
)
def test_bad_budget_is_one_line(capsys, value, needle):
    rc, _, err = run_cli(capsys, "ask", SAMPLE, "What shape is in the image?", "--budget", value)
    assert_one_line_error(rc, err, "--budget", needle)


def test_unknown_method_is_refused_even_without_a_budget(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "ask", str(tmp_path / "missing.png"), "What shape?", "--method", "nope")
    assert_one_line_error(rc, err, "unknown method 'nope'", "divprune")  # the argument, before the missing file


@pytest.mark.parametrize("frames", ["0", "-3", "2.5"])
def test_bad_frames_blame_the_argument_not_the_file(capsys, tmp_path, frames):
    rc, _, err = run_cli(capsys, "ask", str(tmp_path / "missing.mp4"), "What colour?", "--frames", frames)
    assert_one_line_error(rc, err, "--frames", "whole number >= 1")


def test_budget_1_is_one_token_as_in_the_library(capsys, caplog):
    """``--budget 1`` keeps one visual token per image / view (an int is a count everywhere) and warns how to keep
    all; ``1.0`` keeps all (no acceleration)."""
    from test_zoo import image_views, kept_tokens

    import vlm_accel

    model, processor = vlm_accel.load_default()
    n, views = image_views(model, processor, zoo.load_image(SAMPLE))  # one view (LLaVA) or base + aspect (anyres)
    with caplog.at_level(logging.INFO, logger="vlm_accel.cli"):
        rc, out, _ = run_cli(capsys, "ask", SAMPLE, "What shape is in the image?", "--budget", "1")
    assert rc == 0 and out.strip()
    messages = [r.getMessage() for r in caplog.records]
    assert kept_tokens(1, n, views) == len(views)
    assert f"visual tokens kept: {len(views)} of {n}" in messages
    assert any("--budget 1.0" in m for m in messages if "ONE visual token" in m)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlm_accel.cli"):
        rc, out, _ = run_cli(capsys, "ask", SAMPLE, zoo.samples()[0]["question"], "--budget", "1.0")
    assert rc == 0 and out.strip().splitlines()[-1] == zoo.samples()[0]["answer"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def saved_tiny_llava(tmp_path_factory):
    """A tiny LLaVA checkpoint directory with weights and config but no processor files."""
    import tiny

    d = tmp_path_factory.mktemp("ckpt")
    tiny.build("llava").save_pretrained(d)
    return d


def test_model_dir_without_processor_files(capsys, saved_tiny_llava):
    rc, _, err = run_cli(capsys, "ask", SAMPLE, "What shape?", "--model", str(saved_tiny_llava))
    assert_one_line_error(rc, err, "cannot load the processor", str(saved_tiny_llava))


def test_model_dir_with_invalid_config(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    rc, _, err = run_cli(capsys, "ask", SAMPLE, "What shape?", "--model", str(tmp_path))
    assert_one_line_error(rc, err, "not a valid config file")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rc, _, err = run_cli(capsys, "ask", SAMPLE, "What shape?", "--model", str(tmp_path))
    assert_one_line_error(rc, err, "cannot load a vision-language model")
    rc, _, err = run_cli(capsys, "ask", SAMPLE, "What shape?", "--model", str(tmp_path / "nowhere"))
    assert_one_line_error(rc, err, "not a model directory")


def test_question_longer_than_the_context(capsys):
    """A 2,000-word question to the 1,024-position default model: a message naming both lengths, not a wrong answer
    (the library's ``ask`` and the CLI)."""
    import vlm_accel

    question = "Is there a red circle? " * 400
    rc, out, err = run_cli(capsys, "ask", SAMPLE, question)
    assert_one_line_error(rc, err, "context is 1024 positions")
    assert re.search(r"prompt is (\d+) tokens", err) and int(re.search(r"prompt is (\d+)", err)[1]) > 2000
    assert out == ""
    model, processor = vlm_accel.load_default()
    with pytest.raises(ValueError, match=r"prompt is \d+ tokens \+ 8 new tokens but the model's context is 1024"):
        vlm_accel.ask(model, processor, SAMPLE, question)


def test_one_line_error_for_argparse_mistakes(capsys):
    rc, _, err = run_cli(capsys, "ask", SAMPLE)  # no question
    assert_one_line_error(rc, err, "question")


# --- structure --------------------------------------------------------------------------------------------------


def _imports_cli(path: Path) -> list[str]:
    """The import statements in ``path`` that reach ``vlm_accel.cli``."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PKG.parent).with_suffix("").parts  # ('vlm_accel', 'bench', 'vqa')
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = list(rel[: len(rel) - node.level]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found += [t for t in targets if t == "vlm_accel.cli" or t.startswith("vlm_accel.cli.")]
    return found


def test_the_library_never_imports_the_command_line():
    offenders = {
        str(p.relative_to(PKG)): hits
        for p in sorted(PKG.rglob("*.py"))
        if p.name != "cli.py" and (hits := _imports_cli(p))
    }
    assert not offenders, offenders
    from vlm_accel import loading

    assert cli.load_model is loading.load_model  # still importable from the old place


def test_registry_is_reachable_beside_the_listing_function():
    import vlm_accel
    import vlm_accel.registry as reg
    from vlm_accel import methods, registry

    assert registry is reg
    assert methods() == vlm_accel.methods() == registry.names()  # DESIGN's API holds
    assert registry.get("divprune").name == "divprune"
    from vlm_accel.methods.base import Context, register

    assert registry.Context is Context and registry.register is register


def test_docstring_module_references_exist():
    """Every ``:mod:`vlm_accel.X``` named in the package's sources is importable."""
    refs = set()
    for p in PKG.rglob("*.py"):
        refs |= set(re.findall(r":mod:`~?(vlm_accel[\w.]*)`", p.read_text()))
    assert refs
    missing = []
    for ref in sorted(refs):
        try:
            importlib.import_module(ref)
        except ImportError:
            missing.append(ref)
    assert not missing, missing


def test_zoo_needs_weights_marker_does_something():
    import test_zoo

    mark = test_zoo.needs_weights.mark
    assert mark.name == "usefixtures" and mark.args, "an empty usefixtures() does nothing"
    assert all(callable(getattr(test_zoo, name, None)) for name in mark.args)
