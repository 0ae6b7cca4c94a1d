"""The clip renderer: answers are correct by construction — checked on the rendered pixels, not on the metadata."""

import json
import random
import re
from collections import Counter

import numpy as np
import pytest

from vlm_accel.video import load
from vlm_accel.zoo.clips import (
    COLORS,
    DIRECTIONS,
    KINDS,
    QTYPES,
    SHAPES,
    clip_questions,
    heldout_clips,
    render_clip,
    sampled,
    write_heldout_clips,
)

FORMS = {
    "move": r"Which way does the (\w+) (\w+) move\?",
    "appear": r"What color is the shape that appears\?",
    "disappear": r"What shape disappears\?",
    "count": r"How many shapes are there at the end\?",
    "change": r"Does the (\w+) change color\?",
    "order": r"Which appears first, the (\w+) (\w+) or the (\w+) (\w+)\?",
}
SEEDS = range(60)


def clips(kind, n=12):
    return [render_clip(s, "train", kind=kind, index=None) for s in range(n)]


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean() / mask.shape[1], ys.mean() / mask.shape[0]])


def mean_color(clip, f: int, k: int) -> np.ndarray:
    """Mean RGB of track k's pixels on rendered frame f (its interior: edges may be blurred)."""
    m = clip.label_maps[f] == k + 1
    inner = m & np.roll(m, 2, 0) & np.roll(m, -2, 0) & np.roll(m, 2, 1) & np.roll(m, -2, 1)
    return clip.frames[f][inner if inner.sum() > 4 else m].reshape(-1, 3).mean(0)


def nearest_color(rgb) -> str:
    return min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - rgb).sum())


def test_deterministic_and_split_disjoint():
    a, b = render_clip(7, "heldout"), render_clip(7, "heldout")
    assert np.array_equal(a.frames, b.frames) and a.kind == b.kind
    c = render_clip(7, "train")
    assert a.frames.shape != c.frames.shape or not np.array_equal(a.frames, c.frames)
    part = render_clip(7, "heldout", index=sampled(a.num_frames))
    assert np.array_equal(part.frames, a.frames[sampled(a.num_frames)])  # content does not depend on the index
    with pytest.raises(ValueError, match="split"):
        render_clip(0, "test")


def test_lengths_sizes_kinds_vary():
    got = [render_clip(s, "train", index=[0]) for s in SEEDS]
    lengths = {c.num_frames for c in got}
    sizes = {c.meta["size"] for c in got}
    assert min(lengths) >= 16 and max(lengths) <= 32 and len(lengths) > 8
    assert all(224 <= w <= 384 and 224 <= h <= 384 for w, h in sizes) and any(w != h for w, h in sizes)
    assert set(Counter(c.kind for c in got)) == set(KINDS)
    assert len({c.frames[0][2, 2].tobytes() for c in got}) > 20  # backgrounds vary


def test_eight_sampled_frames_bracket_every_event():
    for c in (render_clip(s, "train") for s in SEEDS):
        T, s = c.num_frames, sampled(c.num_frames)
        assert len(s) == 8
        for t in c.tracks:
            for e in [t.t_in if t.t_in > 0 else None, t.t_out if t.t_out < T else None, t.t_change]:
                if e is not None:
                    assert T / 3 <= e <= 2 * T / 3 and s[2] < e <= s[5], (c.meta, e)


def test_move_centroid_goes_the_answered_way():
    seen = set()
    for c in clips("move", 16):
        (q,) = [q for q in clip_questions(c, random.Random(0)) if q["type"] == "move"]
        color, shape = re.fullmatch(FORMS["move"], q["question"]).groups()
        (k,) = [i for i, t in enumerate(c.tracks) if (t.color, t.shape) == (color, shape)]  # named uniquely
        d = centroid(c.label_maps[-1] == k + 1) - centroid(c.label_maps[0] == k + 1)
        axis = 0 if q["answer"] in ("left", "right") else 1
        sign = 1 if q["answer"] in ("right", "down") else -1
        assert sign * d[axis] > 0.2 and abs(d[1 - axis]) < 0.02, (q, d)
        assert nearest_color(mean_color(c, 0, k)) == color
        seen.add(q["answer"])
    assert seen == set(DIRECTIONS)


def test_appear_and_disappear_on_the_pixels():
    for c in clips("appear"):
        (q,) = [q for q in clip_questions(c, random.Random(0)) if q["type"] == "appear"]
        (k,) = [i for i, t in enumerate(c.tracks) if t.t_in > 0]
        present = [(c.label_maps[f] == k + 1).any() for f in range(c.num_frames)]
        assert not present[0] and present[-1] and present.index(True) == c.tracks[k].t_in
        assert nearest_color(mean_color(c, c.num_frames - 1, k)) == q["answer"]
        assert sum(t.color == q["answer"] for t in c.tracks) == 1
    for c in clips("disappear"):
        (q,) = [q for q in clip_questions(c, random.Random(0)) if q["type"] == "disappear"]
        gone = [
            i
            for i in range(len(c.tracks))
            if (c.label_maps[0] == i + 1).any() and not (c.label_maps[-1] == i + 1).any()
        ]
        assert [c.tracks[i].shape for i in gone] == [q["answer"]]


def test_count_at_the_end_counts_drawn_shapes():
    answers = set()
    for c in (render_clip(s, "train") for s in range(30)):
        (q,) = [q for q in clip_questions(c, random.Random(0)) if q["type"] == "count"]
        drawn = len(set(np.unique(c.label_maps[-1]).tolist()) - {0})
        assert q["answer"] == str(drawn) and 1 <= drawn <= 4
        answers.add(q["answer"])
    assert len(answers) >= 3


def test_change_color_yes_iff_the_pixels_change():
    answers = Counter()
    for c in clips("change") + clips("move", 6):
        for q in (q for q in clip_questions(c, random.Random(0)) if q["type"] == "change"):
            (shape,) = re.fullmatch(FORMS["change"], q["question"]).groups()
            (k,) = [i for i, t in enumerate(c.tracks) if t.shape == shape]  # the named shape is unique
            first, last = mean_color(c, 0, k), mean_color(c, c.num_frames - 1, k)
            changed = nearest_color(first) != nearest_color(last)
            assert q["answer"] == ("yes" if changed else "no")
            answers[q["answer"]] += 1
    assert answers["yes"] >= 10 and answers["no"] >= 5


def test_order_first_appearance_on_the_sampled_frames():
    for c in clips("order"):
        (q,) = [q for q in clip_questions(c, random.Random(1)) if q["type"] == "order"]
        c1, s1, c2, s2 = re.fullmatch(FORMS["order"], q["question"]).groups()
        idx = sampled(c.num_frames)

        def first_seen(color, shape, c=c, idx=idx):
            (k,) = [i for i, t in enumerate(c.tracks) if (t.color, t.shape) == (color, shape)]
            return next(j for j, f in enumerate(idx) if (c.label_maps[f] == k + 1).any())

        a, b = first_seen(c1, s1), first_seen(c2, s2)
        assert a != b  # a sampled frame shows one without the other
        assert q["answer"] == (f"{c1} {s1}" if a < b else f"{c2} {s2}")
        assert q["answer"].split()[1] in SHAPES


def test_heldout_questions_have_the_exact_forms_and_balance():
    items = list(heldout_clips(36, seed=3))
    assert Counter(it["type"] for it in items) == dict.fromkeys(QTYPES, 6)
    for it in items:
        assert re.fullmatch(FORMS[it["type"]], it["question"]), it["question"]
        assert it["frames"].shape[0] == 8 and it["frames"].dtype == np.uint8
    assert {it["answer"] for it in items if it["type"] == "change"} == {"yes", "no"}
    again = list(heldout_clips(36, seed=3))
    assert [it["question"] for it in again] == [it["question"] for it in items]


def test_written_clips_decode_to_eight_frames(tmp_path):
    pytest.importorskip("av")
    qfile = write_heldout_clips(tmp_path, n=3)
    recs = [json.loads(x) for x in qfile.read_text().splitlines()]
    assert [r["type"] for r in recs] == list(QTYPES[:3])
    video = load(tmp_path / recs[0]["video"], num_frames=8)
    assert video.frames.shape[0] == 8
