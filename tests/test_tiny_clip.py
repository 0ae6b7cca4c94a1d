"""The embedded tiny CLIP's recipe (training/tiny_clip.py): open_clip config, captions, a 2-step smoke train."""

import json
import random
import time

import numpy as np
import open_clip  # (imported here so that its import time is not counted in the smoke train)
import torch

from training import tiny_clip as tc
from vlm_accel.video.select import DEFAULT_CLIP, load_clip


def test_model_builds_from_its_open_clip_config(tmp_path):
    model, tokenizer = tc.build_model(tmp_path)
    assert (tmp_path / f"{tc.NAME}.json").is_file() and tc.NAME in open_clip.list_models()
    (tmp_path / "notes.json").write_text("not json")  # other files beside the config do not matter
    tc.build_model(tmp_path)
    assert model.token_embedding.num_embeddings == 49408 == tc.CONFIG["text_cfg"]["vocab_size"]
    assert tokenizer(["the red circle"]).shape == (1, tc.CONFIG["text_cfg"]["context_length"])
    n = sum(p.numel() for p in model.parameters())
    assert n * 2 < 5 * 2**20  # a few MB in fp16
    out = model.encode_image(torch.zeros(2, 3, tc.IMAGE_SIZE, tc.IMAGE_SIZE), normalize=True)
    assert out.shape == (2, tc.CONFIG["embed_dim"])
    # the shipped folder is this config
    assert json.loads((DEFAULT_CLIP / f"{tc.NAME}.json").read_text()) == tc.CONFIG


def test_captions_and_compatibility():
    red = tc.Thing("red", "circle", 0.2, 0.3)
    blue = tc.Thing("blue", "triangle", 0.8, 0.7)
    assert tc.parse_atoms("Which way does the red circle move?") == [("red", "circle", None, None)]
    assert tc.parse_atoms("What color is the shape that appears?") == []
    assert tc.holds([("red", "circle", "left", None)], None, [red, blue])
    assert not tc.holds([("red", "circle", "right", None)], None, [red, blue])
    assert tc.holds([(None, "triangle", None, "bottom")], 2, [red, blue])
    assert not tc.holds([], 1, [red, blue])
    rng = random.Random(0)
    for _ in range(200):
        text, atoms, count = tc.caption([red, blue], rng)
        assert text and tc.holds(atoms, count, [red, blue]), text
    m = tc.compat_matrix([[red], [blue]], [[("red", None, None, None)], [(None, "circle", None, None)]], [None, None])
    assert m.tolist() == [[True, False], [True, True]]  # the diagonal always holds


def test_smoke_train_resume_and_export(tmp_path):
    root = tmp_path / "ckpt"
    kw = dict(n_scenes=3, n_clips=1, per_clip=3, eval_clips=1, eval_scenes=16, log=lambda s: None)
    t0 = time.time()
    res = tc.train(root, 2, **kw)
    assert time.time() - t0 < 20
    assert res["step"] == 2 and 0 <= res["scenes"] <= 1 and (root / "last.pt").is_file()
    res = tc.train(root, 3, **kw)  # continues from last.pt
    assert res["step"] == 3
    out = tc.export(root, tmp_path / "clip")
    info = json.loads((out / "train_info.json").read_text())
    assert info["step"] in (2, 3)
    scorer = load_clip(out)  # through open_clip's API, from the exported folder
    f = scorer.encode_image(np.zeros((1, 64, 64, 3), np.uint8))
    assert torch.isfinite(f).all()
