"""The held-out images and clips are fixed: benchmarks and recorded results depend on them. Their pixels are
pinned by hash (recorded from the renderers before the renderer was unified and before the varied training split
existed), so no change to the one renderer (:mod:`vlm_accel.zoo.render`) may move a default output."""

import hashlib

import numpy as np

from vlm_accel.zoo.clips import heldout_clips, render_clip, shape_clip
from vlm_accel.zoo.render import heldout, render_scene

GOLDEN = {
    "heldout_img_s0": [
        "75e4e692dbeeab7b",
        "263dbd90dd1ebd1d",
        "95fec50627bbce3f",
        "bfa7ec3f3ba129c4",
        "d6f0b9c473c55829",
        "04949c1e2961c721",
        "a82c7fc34b68991c",
        "e38f84f7bdeef5cc",
        "f6be04c32e46feb6",
        "557afdaf85c8ba94",
    ],
    "heldout_img_s1": [
        "8f0b771f1c101503",
        "f6bfcd6fc0bd752b",
        "feae095e9d60a42c",
        "79d0b1c6a33ae0db",
        "3e87b402e3780f81",
    ],
    "heldout_clips_s0": [
        "ffcacc540d9876dc",
        "1812f39d74121706",
        "49dbbbd78ab95cda",
        "b227c559d57e4a6b",
        "deb69fece10eddcd",
        "3491ee1d7403a968",
    ],
    "heldout_clips_s7_full": [
        "1d91ba69506951e3",
        "40f37f4b2bb131c6",
        "62d067fc76ca7142",
        "17733957265aee10",
        "7e9aee948e28bcd0",
        "5172aa2bf25170d7",
    ],
    "train_clip": ["86c48378246a0c4e", "04d600c3ac314048", "88517a1d5ff3d38a"],
    "train_clip_labels": ["5a9e8c7fe309be10", "755aa7573940f86b", "41d8d04c66634247"],
    "train_scene": ["2c57ad001263becc", "b3e5a24e344c9b50", "82207e644242edc8"],
    "shape_clip": [
        "4604da7a84aa2566",
        "6861e77d6b5de1cf",
        "5ce874e771e8276b",
        "ab61e5175c188822",
        "7bc65c56a9eb61f3",
        "2fcb26846ba3d1b0",
    ],
}


def _h(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def test_heldout_images_unchanged():
    assert [_h(np.asarray(it["image"])) for it in heldout(10, 0)] == GOLDEN["heldout_img_s0"]
    assert [_h(np.asarray(it["image"])) for it in heldout(5, 1)] == GOLDEN["heldout_img_s1"]
    assert [_h(np.asarray(render_scene(s, "train").image)) for s in range(3)] == GOLDEN["train_scene"]


def test_heldout_clips_unchanged():
    assert [_h(it["frames"]) for it in heldout_clips(6, 0)] == GOLDEN["heldout_clips_s0"]
    assert [_h(it["frames"]) for it in heldout_clips(6, 7, frames=None)] == GOLDEN["heldout_clips_s7_full"]
    clips = [render_clip(s, "train") for s in range(3)]
    assert [_h(c.frames) for c in clips] == GOLDEN["train_clip"]
    assert [_h(c.label_maps) for c in clips] == GOLDEN["train_clip_labels"]


def test_legacy_clips_unchanged():
    assert [_h(shape_clip(s)["frames"]) for s in range(6)] == GOLDEN["shape_clip"]
