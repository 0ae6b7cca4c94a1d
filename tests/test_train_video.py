"""The video training recipe's data plumbing (no training here): labels, packing, attention targets."""

import random

import numpy as np
import pytest
import torch

from training.train_video import (
    FRAMES,
    VIDEO_TOKENS,
    Seq,
    clip_att_targets,
    clip_turns,
    crop_labels,
    grid_labels,
    image_token_labels,
    pooled_labels,
    reverse_clip,
)
from vlm_accel.zoo import render
from vlm_accel.zoo.clips import render_clip, sampled


def _meta(clip):
    return {
        "seed": clip.meta["seed"],
        "kind": clip.kind,
        "T": clip.num_frames,
        "index": clip.index.tolist(),
        "tracks": [t.to_dict() for t in clip.tracks],
    }


def test_pooled_labels_take_the_majority_of_each_2x2_cell():
    lab = torch.full((16, 16), -1, dtype=torch.int8)
    lab[0:2, 0:2] = 0  # full cell -> 0
    lab[2, 2] = 1  # one patch of four -> 1 (any object beats background)
    lab[4:6, 4] = 2
    lab[4, 5] = 3  # 2 vs 1 -> 2
    out = pooled_labels(lab)
    assert out.shape == (8, 8)
    assert out[0, 0] == 0 and out[1, 1] == 1 and out[2, 2] == 2 and out[0, 1] == -1


def test_grid_and_crop_labels_follow_the_shapes():
    scene = render.render_scene(11, "heldout")
    lm = scene.meta["label_map"]
    from PIL import Image

    square = np.asarray(Image.fromarray(lm).resize((224, 224), Image.NEAREST))
    np.testing.assert_array_equal(grid_labels(square, len(scene.objects)), scene.patch_labels)
    crop = crop_labels(lm, len(scene.objects))
    assert set(np.unique(crop).tolist()) == set(np.unique(scene.patch_labels).tolist())


def test_image_token_labels_align_with_the_packed_features():
    from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration

    from vlm_accel.zoo import DEFAULT_DIR
    from vlm_accel.zoo.onevision import build_config, build_processor, is_onevision

    processor = build_processor()
    cfg = AutoConfig.from_pretrained(DEFAULT_DIR)
    model = LlavaOnevisionForConditionalGeneration(
        cfg if is_onevision(DEFAULT_DIR) else build_config(cfg, processor.tokenizer)
    )
    for seed in (3, 4, 5):
        scene = render.render_scene(seed, "train")
        enc = processor.image_processor(scene.image, return_tensors="pt")
        labels = torch.from_numpy(
            np.stack([scene.patch_labels, crop_labels(scene.meta["label_map"], len(scene.objects))])
        )
        tl = image_token_labels(model, labels, enc["image_sizes"][0])
        n_prompt = processor(images=scene.image, text="USER: <image> x ASSISTANT:", return_tensors="pt")["input_ids"]
        assert len(tl) == int((n_prompt == model.config.image_token_index).sum())
        assert torch.equal(tl[:256], labels[0].reshape(-1).long())  # base view first, in raster order
        assert set(tl[256:].unique().tolist()) <= set(range(-1, len(scene.objects)))


def test_turns_are_independent_single_question_prompts():
    from vlm_accel.zoo.onevision import build_tokenizer

    tok = build_tokenizer()
    s = Seq(tok, 90, VIDEO_TOKENS, [("What shape disappears?", "circle"), ("How many shapes are there?", "2")], {})
    prefix = s.media_start + VIDEO_TOKENS
    assert s.ids[s.media_start : prefix] == [90] * VIDEO_TOKENS
    starts = [i for i in range(prefix, len(s.ids)) if s.seg[i] != s.seg[i - 1]]
    assert [s.pos[i] for i in starts] == [prefix, prefix]  # every turn's positions restart after the media
    for row in s.rows:
        assert s.labels[row] == -100 and s.labels[row + 1] != -100 and tok.decode([s.ids[row]]) == ":"


def test_attention_targets_sit_on_the_object_before_and_after_the_event():
    for seed in range(6):
        clip = render_clip(seed, "train", kind="move", index=None)
        T = clip.num_frames
        small = render_clip(seed, "train", kind="move", index=sampled(T))
        lab8 = pooled_labels(torch.from_numpy(small.patch_labels()))
        meta = _meta(small)
        qs = clip_turns(meta, random.Random(0))
        (q,) = [q for q in qs if q["type"] == "move"]
        t = clip_att_targets(meta, q, lab8)
        frame_of = torch.arange(VIDEO_TOKENS) // 64
        assert set(frame_of[t[0]].tolist()) <= {0, 1, 2} and set(frame_of[t[1]].tolist()) <= {5, 6, 7}
        (k,) = q["objs"]
        flat = torch.cat([lab8.reshape(FRAMES * 64), torch.tensor([-1])])
        assert (flat[t[0] | t[1]] == k).all()
    for seed in range(6):  # disappear: the late head looks where the vanished object was in frame 0
        T = render_clip(seed, "train", kind="disappear", index=[0]).num_frames
        small = render_clip(seed, "train", kind="disappear", index=sampled(T))
        lab8 = pooled_labels(torch.from_numpy(small.patch_labels()))
        meta = _meta(small)
        (q,) = [q for q in clip_turns(meta, random.Random(0)) if q["type"] == "disappear"]
        t = clip_att_targets(meta, q, lab8)
        (k,) = q["objs"]
        flat = lab8.reshape(FRAMES, 64)
        late = t[1][: FRAMES * 64].reshape(FRAMES, 64)
        assert late[5:].any() and not late[:5].any()
        assert (flat[0][late[5:].any(0)] == k).all() and not (flat[5:][late[5:]] == k).any()
        assert set((torch.arange(VIDEO_TOKENS) // 64)[t[0]].tolist()) <= {0, 1, 2}
    with pytest.raises(StopIteration):  # a clip without a mover has no move question
        next(
            q
            for q in clip_turns(_meta(render_clip(0, "train", kind="appear", index=[0])), random.Random(0))
            if q["type"] == "move"
        )


@pytest.mark.parametrize("kind", ["move", "appear", "disappear", "change"])
def test_a_clip_played_backwards_asks_the_reversed_questions(kind):
    from training.train_video import _tracks
    from vlm_accel.zoo.clips import clip_questions

    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    for seed in range(4):
        T = render_clip(seed, "train", kind=kind, index=[0]).num_frames
        clip = render_clip(seed, "train", kind=kind, index=sampled(T))
        lab = torch.from_numpy(clip.patch_labels())
        meta = _meta(clip)
        feats = torch.arange(FRAMES, dtype=torch.float32)[:, None, None].expand(FRAMES, 256, 2)
        f2, l2, p2, m2 = reverse_clip(feats, lab, pooled_labels(lab), meta)
        assert f2[:, 0, 0].tolist() == list(range(FRAMES))[::-1] and torch.equal(l2, lab.flip(0))
        fwd, back = _tracks(meta), _tracks(m2)
        for f in range(FRAMES):  # the reversed tracks describe the reversed frames
            i, j = meta["index"][FRAMES - 1 - f], m2["index"][f]
            for a, b in zip(fwd, back, strict=True):
                assert a.present(i) == b.present(j) and a.color_at(i) == b.color_at(j)
                assert np.allclose(a.pos(i), b.pos(j))
        q1 = {q["type"]: q["answer"] for q in clip_questions(fwd, random.Random(0), T, meta["kind"])}
        q2 = {q["type"]: q["answer"] for q in clip_questions(back, random.Random(0), T, m2["kind"])}
        if kind == "move":
            assert q2["move"] == opposite[q1["move"]]
        elif kind == "appear":  # the shape that appeared is the one that disappears
            k = next(k for k, t in enumerate(fwd) if t.t_in > 0)
            assert m2["kind"] == "disappear" and q2["disappear"] == fwd[k].shape
        elif kind == "disappear":
            k = next(k for k, t in enumerate(fwd) if t.t_out < T)
            assert m2["kind"] == "appear" and q2["appear"] == fwd[k].color
        else:
            assert q2["change"] == q1["change"]
        n0 = sum(t.present(0) for t in back)
        assert q2["count"] == str(sum(t.present(T - 1) for t in back)) and n0 == sum(t.present(T - 1) for t in fwd)


def test_image_turns_add_up_down_questions_about_uniquely_named_objects():
    from training.train_video import image_turns

    objs = [("circle", "red", 0.3, 0.2, 0.2), ("triangle", "blue", 0.7, 0.8, 0.2), ("circle", "green", 0.5, 0.52, 0.2)]
    objs += [("rectangle", "teal", 0.2, 0.9, 0.1), ("rectangle", "teal", 0.8, 0.1, 0.1)]  # same name: never asked
    qs = [q for q in image_turns(objs, random.Random(0), 10, 2, vertical=5) if q["type"] == "x_vert"]
    got = {q["question"]: q["answer"] for q in qs}
    assert got == {"Is the red circle up or down?": "up", "Is the blue triangle up or down?": "down"}
    assert all(objs[q["obj"]][1] in q["question"] for q in qs)


def test_reduced_clips_are_the_plugins_layout():
    """Training on reduced clips: the plugin's quotas per frame / per clip, merged features in the kept slots, the
    dropped slots and the trailing newline hidden from every query, attention targets moved to the kept slots."""
    from training.train import segment_mask
    from training.train_video import FRAMES, follow_merge, reduce_clip, reduced_clips
    from vlm_accel.methods import Context, get

    n = FRAMES * 64
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(0))
    for method, scope in (("tome", "frame"), ("tome", "clip"), ("temporal", "frame"), ("random", "frame")):
        keep, w = reduce_clip(x, method, 0.25, scope, seed=0)
        assert keep.numel() == n // 4 and torch.equal(keep, keep.sort().values)
        torch.testing.assert_close(w.sum(1), torch.ones(keep.numel()))
        if scope == "frame" and method != "temporal":  # per frame: each frame keeps its own quarter
            assert torch.bincount(keep // 64, minlength=FRAMES).tolist() == [16] * FRAMES
    keep, w = reduce_clip(x, "temporal", 0.25, "frame", seed=0)
    red = get("temporal")(x, n // 4, Context(grid=(8, 8), frames=FRAMES))  # clip-wide, as the session runs it
    assert torch.equal(keep, red.keep)
    keep, _ = reduce_clip(x, "random", 0.25, "frame", seed=0)
    g = torch.Generator().manual_seed(0)  # one generator through the clip's frames, as the session's
    frames = [f * 64 + get("random")(x[f * 64 : (f + 1) * 64], 16, Context(grid=(8, 8), generator=g)).keep
              for f in range(FRAMES)]  # fmt: skip
    assert torch.equal(keep, torch.cat(frames)) and not torch.equal(frames[0], frames[1] - 64)

    class S:
        media_start = 3

    vid = torch.randn(1, n + 1, 16)
    seg = torch.zeros(1, 3 + n + 1 + 4, dtype=torch.long)
    out, mask, kept = reduced_clips(vid, segment_mask(seg), [S()], {0: ("tome", 0.25, "frame")}, seed=0)
    keep, w = kept[0]
    torch.testing.assert_close(out[0, keep], w @ vid[0, :n])
    visible = mask[0, 0, -1, 3 : 3 + n + 1]  # what the last text token sees of the media
    assert visible[:n].nonzero()[:, 0].tolist() == keep.tolist() and not visible[n]
    target = torch.zeros(n + 1, dtype=torch.bool)
    target[[5, 70, n]] = True
    moved = follow_merge(target, keep, w)
    assert not moved[n] and set(moved.nonzero()[:, 0].tolist()) == {
        int(keep[i]) for i in range(keep.numel()) if w[i, 5] > 0 or w[i, 70] > 0
    }
