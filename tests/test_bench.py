"""Benchmark runners end to end on a tiny model: files written, rows complete, retained % computed."""

import json

import numpy as np
import pytest
from PIL import Image

from vlm_accel.bench import videoqa, vqa
from vlm_accel.video import load
from vlm_accel.zoo.clips import COLORS, shape_clip, write_clips

import tiny


@pytest.fixture(scope="module")
def default_like():
    return tiny.build_default_like()


def test_synthetic_clips(tmp_path):
    pytest.importorskip("av")
    qfile = write_clips(tmp_path, n=4, frames=6)
    recs = [json.loads(x) for x in qfile.read_text().splitlines()]
    assert len(recs) == 4
    for r in recs:
        assert load(tmp_path / r["video"], num_frames=6).frames.shape[0] == 6
        assert r["answer"] in ("left", "right") or r["answer"] in COLORS
    a, b = shape_clip(3), shape_clip(3)
    assert np.array_equal(a["frames"], b["frames"]) and a["question"] == b["question"]


def test_videoqa_runner(tmp_path, default_like):
    pytest.importorskip("av")
    model, processor = default_like
    items = videoqa.load_items(write_clips(tmp_path / "clips", n=2, frames=4), n=2, frames=4)
    rows = videoqa.run(model, processor, items, ["random", "temporal"], [1.0, 0.5], tmp_path, "vq")
    assert [(r["method"], r["budget"]) for r in rows] == [("none", 1.0), ("random", 0.5), ("temporal", 0.5)]
    assert (tmp_path / "vq.json").is_file() and (tmp_path / "vq.csv").is_file() and (tmp_path / "vq.png").is_file()


def test_vqa_runner_on_a_user_jsonl(tmp_path, default_like):
    model, processor = default_like
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "q.jsonl").write_text(
        "".join(
            json.dumps({"image": f"im{i}.png", "question": "how many shapes are there?", "answer": "one"}) + "\n"
            for i in range(3)
        )
    )
    items = vqa.load_items(str(tmp_path / "q.jsonl"), n=10, seed=0)
    assert [it["answer"] for it in items] == ["one"] * 3
    rows = vqa.run(model, processor, items, ["pool"], [1.0, 0.33], batch=2, out_dir=tmp_path, name="v")
    assert len(rows) == 2 and rows[0]["accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)
    saved = json.loads((tmp_path / "v.json").read_text())
    assert saved["rows"][1]["method"] == "pool" and "command" in saved


def test_vqa_bad_data(tmp_path):
    with pytest.raises(ValueError, match="no such JSONL"):
        vqa.load_items(str(tmp_path / "missing.jsonl"), 5, 0)
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        vqa.load_items(str(tmp_path / "bad.jsonl"), 5, 0)


def test_controller_memory_and_allocation_runners():
    """The budget-controller evidence runners on the embedded default: memory targets met by the session's own
    accounting, both splits scored at every total."""
    from vlm_accel.bench import controller

    rows = controller.memory(n=2, method="auto", fractions=(0.5,))
    assert rows[0]["fraction"] == 1.0 and rows[1]["met"] is True
    assert rows[1]["max_kv_mb"] <= rows[1]["kv_limit_mb"] <= rows[1]["target_mb"]
    assert rows[1]["reached_pct"] == 100.0
    rows = controller.allocation(n=2, totals=[8], method="auto")
    assert [(r["total_tokens"], r["split"]) for r in rows] == [("all", "none"), (8, "information"), (8, "uniform")]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)


def test_controller_allocation_on_clips_runner():
    """Clips through a video model's video input (the embedded default in its OneVision form): both splits scored,
    the information split really spending the clip's total over its frames."""
    from vlm_accel.bench import controller
    from vlm_accel.zoo import onevision

    loaded = onevision.load_video_default()
    rows = controller.allocation_clips(n=2, totals=[16], method="auto", model_dir=None, loaded=loaded)
    assert [(r["total_tokens"], r["split"]) for r in rows] == [("all", "none"), (16, "information"), (16, "uniform")]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    model, processor = loaded
    with pytest.raises(ValueError, match="video input"):
        controller.allocation_clips(n=1, totals=[8], method="auto", model_dir=None, loaded=(model, None))


@pytest.mark.parametrize("method", ["visionzip", "tome_vit"])
def test_tower_memo_reuses_only_an_unobserved_tower(method):
    """The bench memo returns the tower's previous output for a bit-identical call (same logits as running it), and
    steps aside for methods that hook or patch the tower (CLS attention capture, merging inside it)."""
    import torch

    import vlm_accel
    from vlm_accel.bench.common import tower_memo

    model = tiny.build("llava")  # a CLIP tower: visionzip captures its CLS attention
    inputs = tiny.inputs_for(model, "llava", "image", batch=2)
    tower = model.model.vision_tower
    with torch.no_grad():
        ref = {}
        for m in ("temporal", method):
            with vlm_accel.accelerate(model, budget=0.5, method=m):
                ref[m] = model(**inputs).logits
        with tower_memo(tower) as counts:
            full = model(**inputs).logits
            for m in ("temporal", method):
                with vlm_accel.accelerate(model, budget=0.5, method=m):
                    assert torch.equal(model(**inputs).logits, ref[m]), m
            assert torch.equal(model(**inputs).logits, full)  # the observed run left nothing to reuse: it runs
            assert counts == {"hits": 1, "runs": 3}
            with pytest.raises(RuntimeError, match="already overridden"), tower_memo(tower):
                pass
    assert "forward" not in vars(tower)


def test_videoqa_cache_and_stream_rows_can_be_left_out():
    import argparse

    p = argparse.ArgumentParser()
    videoqa.add_arguments(p)
    a = p.parse_args(["--methods", "temporal", "--budgets", "1.0", "0.25", "--cache-thresholds", "--stream-fractions"])
    assert a.cache_thresholds == [] and a.stream_fractions == []
    assert videoqa.video_configs(a.methods, a.budgets, a.cache_thresholds, a.stream_fractions) == [
        ("none", "frame", 1.0), ("temporal", "frame", 0.25), ("temporal", "clip", 0.25)
    ]  # fmt: skip
    d = p.parse_args([])
    assert d.cache_thresholds == [0.0, 0.05, 0.15] and d.stream_fractions == [0.5, 0.25]
