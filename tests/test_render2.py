"""The second clip renderer (issue #32): its own drawing code, the same question text, answers right on the
pixels — one check per question type."""

import random
import re
from collections import Counter
from pathlib import Path

import numpy as np

from vlm_accel.zoo.clips import COLORS, QTYPES, QUESTION
from vlm_accel.zoo.render2 import _sampled, heldout_clips2, questions2, render_clip2

FORMS = {
    k: "^" + re.escape(v).replace(r"\{c\}", r"(\w+)").replace(r"\{s\}", r"(\w+)") + "$" for k, v in QUESTION.items()
}
FORMS["order"] = r"^Which appears first, the (\w+) (\w+) or the (\w+) (\w+)\?$"


def clips(kind, n=10):
    return [render_clip2(s, kind) for s in range(n)]


def ask(c, t, seed=0):
    return [q for q in questions2(c, random.Random(seed)) if q["type"] == t]


def color_of(c, f, k):
    m = c.masks[f] == k + 1
    inner = m & np.roll(m, 2, 0) & np.roll(m, -2, 0) & np.roll(m, 2, 1) & np.roll(m, -2, 1)
    rgb = c.frames[f][inner if inner.sum() > 4 else m].reshape(-1, 3).mean(0)
    return min(COLORS, key=lambda n: np.abs(np.array(COLORS[n]) - rgb).sum())  # the *model's* palette


def centroid(m):
    ys, xs = np.nonzero(m)
    return np.array([xs.mean() / m.shape[1], ys.mean() / m.shape[0]])


def test_own_drawing_code():
    src = Path(__file__).parents[1].joinpath("vlm_accel/zoo/render2.py").read_text()
    for name in ("ImageDraw", "draw_shape", "background(", "render_clip(", "_draw("):
        assert name not in src
    train = Path(__file__).parents[1].joinpath("training/train_video.py").read_text()
    assert train.count("render2") == 2  # imported for evaluation only (eval_clip_items)


def test_move():
    seen = set()
    for c in clips("move", 12):
        (q,) = ask(c, "move")
        color, shape = re.match(FORMS["move"], q["question"]).groups()
        (k,) = [i for i, t in enumerate(c.things) if t.name == f"{color} {shape}"]
        s = _sampled(c.length)
        d = centroid(c.masks[s[-1]] == k + 1) - centroid(c.masks[s[0]] == k + 1)
        axis, sign = (0 if q["answer"] in ("left", "right") else 1), (1 if q["answer"] in ("right", "down") else -1)
        assert sign * d[axis] > 0.15 and abs(d[1 - axis]) < 0.02
        assert color_of(c, s[0], k) == color
        seen.add(q["answer"])
    assert len(seen) >= 3


def test_appear():
    for c in clips("appear"):
        (q,) = ask(c, "appear")
        (k,) = [i for i, t in enumerate(c.things) if t.born > 0]
        s = _sampled(c.length)
        assert not (c.masks[s[0]] == k + 1).any() and (c.masks[s[-1]] == k + 1).any()
        assert color_of(c, s[-1], k) == q["answer"]
        assert sum(t.color == q["answer"] for t in c.things) == 1


def test_disappear():
    for c in clips("disappear"):
        (q,) = ask(c, "disappear")
        s = _sampled(c.length)
        gone = [
            i for i in range(len(c.things)) if (c.masks[s[0]] == i + 1).any() and not (c.masks[s[-1]] == i + 1).any()
        ]
        assert [c.things[i].shape for i in gone] == [q["answer"]]


def test_count():
    answers = set()
    for c in (render_clip2(s) for s in range(20)):
        (q,) = ask(c, "count")
        assert q["answer"] == str(len(set(np.unique(c.masks[-1]).tolist()) - {0}))
        answers.add(q["answer"])
    assert len(answers) >= 3


def test_change():
    answers = Counter()
    for c in clips("change") + clips("disappear", 5):
        for q in ask(c, "change"):
            (shape,) = re.match(FORMS["change"], q["question"]).groups()
            (k,) = [i for i, t in enumerate(c.things) if t.shape == shape]
            on = [f for f in range(c.length) if (c.masks[f] == k + 1).sum() > 4]
            assert q["answer"] == ("yes" if color_of(c, on[0], k) != color_of(c, on[-1], k) else "no")
            answers[q["answer"]] += 1
    assert answers["yes"] >= 8 and answers["no"] >= 5


def test_order():
    for c in clips("order"):
        (q,) = ask(c, "order", seed=1)
        c1, s1, c2, s2 = re.match(FORMS["order"], q["question"]).groups()
        s = _sampled(c.length)

        def first(name, c=c, s=s):
            (k,) = [i for i, t in enumerate(c.things) if t.name == name]
            return next(j for j, f in enumerate(s) if (c.masks[f] == k + 1).any())

        a, b = first(f"{c1} {s1}"), first(f"{c2} {s2}")
        assert a != b and q["answer"] == (f"{c1} {s1}" if a < b else f"{c2} {s2}")


def test_heldout_set_mirrors_heldout_clips():
    items = list(heldout_clips2(18, seed=2))
    assert Counter(it["type"] for it in items) == dict.fromkeys(QTYPES, 3)
    for it in items:
        assert re.match(FORMS[it["type"]], it["question"]), it["question"]
        assert it["frames"].shape[0] == 8 and it["frames"].dtype == np.uint8
    assert [it["question"] for it in heldout_clips2(18, seed=2)] == [it["question"] for it in items]
