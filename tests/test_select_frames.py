"""Question-aware frame selection (vlm_accel.video.select): the AKS rule on hand-made scores, bad inputs, streaming
decode with bounded memory, and the shipped tiny CLIP loaded through open_clip."""

import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vlm_accel.video.select import DEFAULT_CLIP, iter_frames, load_clip, pick, probe, select_frames


class RedScorer:
    """Stub scorer: a frame's feature is its share of strongly red pixels; every question scores by it."""

    image_size = 32

    def __init__(self):
        self.images = 0

    def encode_image(self, frames):
        frames = np.asarray(frames, dtype=np.int16)
        self.images += len(frames)
        red = ((frames[..., 0] > 150) & (frames[..., 1] < 100) & (frames[..., 2] < 100)).mean(axis=(1, 2))
        return np.stack([red, np.full_like(red, 0.05)], 1)

    def encode_text(self, texts):
        return np.array([[1.0, 0.0]] * len(texts))


def _frame(shapes=(), size=(96, 128), bg=(235, 232, 228)):
    img = Image.new("RGB", (size[1], size[0]), bg)
    d = ImageDraw.Draw(img)
    for kind, color, cx, cy, r in shapes:
        box = [cx - r, cy - r, cx + r, cy + r]
        if kind == "circle":
            d.ellipse(box, fill=color)
        elif kind == "rectangle":
            d.rectangle(box, fill=color)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return np.asarray(img)


RED, BLUE, GREEN = (215, 35, 35), (35, 70, 215), (40, 165, 50)


# ------------------------------------------------------------------------------------------------ the rule
def test_pick_sharp_peak_is_taken():
    for n, k, at in [(100, 8, 37), (256, 4, 3), (64, 1, 60), (300, 16, 299)]:
        s = np.zeros(n)
        s[at] = 1.0
        got = pick(s, k)
        assert at in got and len(got) == k


def test_pick_flat_scores_cover_uniformly():
    for n, k in [(100, 8), (256, 16), (9, 3), (1000, 7), (50, 32)]:
        got = pick(np.full(n, 0.3), k)
        assert len(got) == k and (np.diff(got) > 0).all()
        ideal = (np.arange(k) + 0.5) * n / k  # segment centres
        assert np.abs(got - ideal).max() <= n / k + 1, (n, k, got)
    assert pick(np.zeros(9), 3).tolist() == [1, 4, 7]


def test_pick_relevant_block_keeps_its_frames_coverage_otherwise():
    s = np.full(256, 0.1)
    s[100:120] = 1.0  # an event that stands out: AKS keeps the top frames (relevance)
    got = pick(s, 8)
    assert ((got >= 100) & (got < 120)).all()
    spread = pick(s, 8, threshold=2.0)  # the judge never fires: best frame of each eighth (coverage)
    assert len(spread) == 8 and np.diff(spread).min() >= 16
    assert ((spread >= 100) & (spread < 120)).sum() == 1
    top = pick(s, 8, threshold=0.0)  # plain top-k (ties: nearest the middle)
    assert len(top) == 8 and ((top >= 100) & (top < 120)).all()


def test_pick_returns_exactly_k_sorted():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 400))
        k = int(rng.integers(1, 40))
        got = pick(rng.normal(size=n), k)
        assert len(got) == min(k, n) and len(set(got.tolist())) == len(got)
        assert (np.diff(got) > 0).all() and got.min() >= 0 and got.max() < n


def test_pick_k_at_least_n_gives_all_and_bad_k():
    assert pick([0.2, 0.9, 0.1], 3).tolist() == [0, 1, 2]
    assert pick([0.2, 0.9, 0.1], 10).tolist() == [0, 1, 2]
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be >= 1"):
            pick([1.0, 2.0], k)
    for k in (1.5, True, "3"):
        with pytest.raises(TypeError):
            pick([1.0, 2.0], k)
    with pytest.raises(ValueError):
        pick([], 2)
    with pytest.raises(ValueError):
        pick([1.0, float("nan")], 1)


# ------------------------------------------------------------------------------------------------ select_frames
def _red_clip(T=40, red=range(25, 29)):
    return np.stack(
        [_frame([("circle", RED, 60, 48, 20)] if t in red else [("rectangle", BLUE, 60, 48, 20)]) for t in range(T)]
    )


def test_select_frames_stub_scorer_relevance_and_coverage():
    video = _red_clip(red=range(25, 27))  # two of 40 frames: the rest of k = 4 covers the clip
    sel = select_frames(video, "Where is the red circle?", 4, scorer=RedScorer())
    assert len(sel.indices) == 4 and (np.diff(sel.indices) > 0).all()
    # first half: no frame stands out, split again, best (middle) frame of each quarter; second half: its two red
    # frames stand out, AKS keeps them
    assert sel.indices.tolist() == [4, 14, 25, 26]
    sel = select_frames(_red_clip(red=range(25, 29)), "the red circle", 4, scorer=RedScorer())
    assert sel.indices.tolist() == [25, 26, 27, 28]  # four that stand out fill k = 4 (AKS keeps its top)
    assert sel.scores.shape == sel.candidates.shape == (40,)
    assert sel.selected_scores.shape == (4,) and sel.timestamps.shape == (4,)


def test_select_frames_bad_inputs():
    video = _red_clip(T=12)
    scorer = RedScorer()
    for q in ("", "   ", "?!", "... _ ..."):
        with pytest.raises(ValueError, match="no words"):
            select_frames(video, q, 4, scorer=scorer)
    with pytest.raises(TypeError):
        select_frames(video, None, 4, scorer=scorer)
    for k in (0, -3):
        with pytest.raises(ValueError, match="k must be >= 1"):
            select_frames(video, "the red circle", k, scorer=scorer)
    with pytest.raises(TypeError):
        select_frames(video, "the red circle", 2.5, scorer=scorer)
    assert scorer.images == 0  # rejected before anything was decoded or encoded
    with pytest.raises(ValueError, match="not found"):
        select_frames("/nonexistent/video.mp4", "the red circle", 4, scorer=scorer)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        select_frames(np.zeros((4, 8, 8), np.uint8), "the red circle", 2, scorer=scorer)
    with pytest.raises(TypeError, match="scorer"):
        select_frames(video, "the red circle", 2, scorer=object())


def test_select_frames_k_larger_than_video_gives_all_frames():
    video = _red_clip(T=5, red=[2])
    sel = select_frames(video, "the red circle", 8, scorer=RedScorer())
    assert sel.indices.tolist() == [0, 1, 2, 3, 4] and sel.total == 5
    sel = select_frames(video, "the red circle", 5, scorer=RedScorer())
    assert sel.indices.tolist() == [0, 1, 2, 3, 4]
    sel = select_frames(video[:1], "the red circle", 3, scorer=RedScorer())
    assert sel.indices.tolist() == [0]


def test_candidates_are_spread_and_at_least_k():
    video = _red_clip(T=200, red=range(120, 130))
    scorer = RedScorer()
    sel = select_frames(video, "red", 8, scorer=scorer, candidates=50)
    assert len(sel.candidates) == 50 and scorer.images == 50
    sel = select_frames(video, "red", 8, scorer=RedScorer(), candidates=3)  # raised to k
    assert len(sel.candidates) == 8
    sel = select_frames(video, "red", 2, scorer=RedScorer(), candidates=[5, 121, 150])
    assert sel.candidates.tolist() == [5, 121, 150] and 121 in sel.indices


# ------------------------------------------------------------------------------------------------ streaming
def _peak_numpy_bytes(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_memory_is_bounded_for_a_long_array(tmp_path):
    peaks = {}
    for T in (300, 3000):
        # a sparse memmap: 3000 frames of 120x160 are 173 MB on "disk" and nothing is read until asked for
        video = np.lib.format.open_memmap(tmp_path / f"v{T}.npy", mode="w+", dtype=np.uint8, shape=(T, 120, 160, 3))
        video[T // 2, 40:80, 60:100] = RED
        video.flush()
        video = np.load(tmp_path / f"v{T}.npy", mmap_mode="r")
        out = {}
        peaks[T] = _peak_numpy_bytes(
            lambda v=video, o=out: o.update(sel=select_frames(v, "red", 4, scorer=RedScorer(), candidates=10**6))
        )
        assert len(out["sel"].candidates) == T and T // 2 in out["sel"].indices
    assert peaks[3000] < 8 * 2**20, peaks  # the video itself is 173 MB
    assert peaks[3000] < 1.5 * peaks[300] + 2**20, peaks  # flat in the video's length


def _write_video(path, T=300, red=range(200, 210)):
    from vlm_accel.zoo.clips import write_video

    frames = np.stack(
        [_frame([("circle", RED, 64, 48, 20)] if t in red else [("triangle", GREEN, 64, 48, 20)]) for t in range(T)]
    )
    return write_video(path, frames, fps=10)


def test_streaming_decode_of_a_file_decord_and_pyav(tmp_path):
    from vlm_accel.video.select import _iter_av

    path = _write_video(tmp_path / "long.mp4")
    assert probe(path) == (300, 10.0)
    idx = np.array([0, 5, 100, 201, 205, 299])
    chunks = list(iter_frames(path, idx, 32, batch=4))
    assert [len(c) for c, _ in chunks] == [4, 2]
    got = np.concatenate([f for _, f in chunks])
    assert got.shape == (6, 32, 32, 3) and got.dtype == np.uint8  # decoded small, never kept at full size
    assert np.concatenate([c for c, _ in chunks]).tolist() == idx.tolist()
    av_chunks = list(_iter_av(str(path), idx, 32, batch=4, seek_gap=8))  # the fallback, seeking past gaps
    assert np.concatenate([c for c, _ in av_chunks]).tolist() == idx.tolist()
    av_frames = np.concatenate([f for _, f in av_chunks])
    assert av_frames.shape == got.shape
    red = (got[..., 0] > 150) & (got[..., 1] < 100)
    assert red[3:5].mean() > 0.1 and red[[0, 1, 2, 5]].mean() < 0.01
    assert np.abs(av_frames.astype(int) - got.astype(int)).mean() < 12
    sel = select_frames(path, "the red circle", 3, scorer=RedScorer(), candidates=60)
    assert any(200 <= i < 210 for i in sel.indices) and sel.total == 300 and sel.fps == 10.0


# ------------------------------------------------------------------------------------------------ the shipped tiny CLIP
def test_import_does_not_import_open_clip():
    code = "import sys, vlm_accel, vlm_accel.video.select; assert 'open_clip' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_shipped_tiny_clip_loads_through_open_clip():
    import open_clip

    assert len(list(DEFAULT_CLIP.glob("*.json"))) >= 1
    weights = DEFAULT_CLIP / "open_clip_model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 6 * 2**20  # a few MB
    scorer = load_clip()
    assert scorer.name in open_clip.list_models()
    assert type(scorer.model).__module__.startswith("open_clip")
    assert scorer.image_size == 64
    f = scorer.encode_image(np.zeros((2, 100, 80, 3), np.uint8))
    t = scorer.encode_text(["the red circle", "a blue triangle"])
    assert f.shape[0] == 2 and t.shape == (2, f.shape[1])
    # the same weights through open_clip's own calls (add_model_config + create_model_and_transforms)
    open_clip.add_model_config(str(DEFAULT_CLIP))
    model, _, preprocess = open_clip.create_model_and_transforms(scorer.name, pretrained=str(weights))
    tok = open_clip.get_tokenizer(scorer.name)
    ref = model.encode_text(tok(["the red circle"]), normalize=True)
    assert np.allclose(ref.detach().numpy(), t[:1].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="not found"):
        load_clip("/nonexistent/clip")


def test_shipped_tiny_clip_ranks_the_red_circle_first():
    scorer = load_clip()
    red_circle = _frame([("circle", RED, 40, 50, 22), ("rectangle", BLUE, 95, 40, 16)])
    others = [
        _frame([("triangle", BLUE, 60, 50, 24)]),
        _frame([("circle", BLUE, 40, 50, 22), ("rectangle", RED, 95, 40, 16)]),
        _frame([("triangle", RED, 60, 50, 24)]),
        _frame([("circle", GREEN, 60, 50, 24)]),
    ]
    frames = np.stack([red_circle, *others])
    s = (scorer.encode_text(["the red circle"]) @ scorer.encode_image(frames).T)[0]
    assert int(s.argmax()) == 0, s
    # and through select_frames: the one frame of a clip that shows it is the one picked with k = 1
    clip = np.stack(
        [_frame([("triangle", BLUE, 60, 50, 24)])] * 6 + [red_circle] + [_frame([("circle", GREEN, 60, 50, 24)])] * 5
    )
    sel = select_frames(clip, "Which way does the red circle move?", 1, scorer=scorer)
    assert sel.indices.tolist() == [6]
