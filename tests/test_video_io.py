"""Video loading: sampling, and clear errors for missing, empty, corrupt and non-video files."""

import numpy as np
import pytest

from vlm_accel import video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 2 s, 10 fps, 64x48 mp4 of a moving square, written with PyAV."""
    av = pytest.importorskip("av")
    path = tmp_path_factory.mktemp("v") / "square.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for t in range(20):
            img = np.zeros((48, 64, 3), np.uint8)
            img[10:30, 2 * t : 2 * t + 20] = (255, 0, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_uniform_sampling(clip):
    v = video.load(clip, num_frames=5)
    assert v.frames.shape == (5, 48, 64, 3) and v.frames.dtype == np.uint8
    assert np.all(np.diff(v.timestamps) > 0) and v.fps == pytest.approx(10, rel=0.01)
    assert v.frames[..., 0].mean() > v.frames[..., 2].mean()  # the red square is there
    assert len(v.images()) == 5


def test_fps_sampling(clip):
    v = video.load(clip, fps=2)
    assert len(v) == 4 and np.allclose(np.diff(v.timestamps), 0.5)
    assert len(video.load(clip, fps=5, num_frames=3)) == 3


def test_sample_indices_rules():
    assert video.sample_indices(100, 25, num_frames=4).tolist() == [12, 37, 62, 87]
    assert video.sample_indices(3, 25, num_frames=10).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="no frames"):
        video.sample_indices(0, 25, 4)


def test_bad_files(tmp_path, clip):
    with pytest.raises(ValueError, match="not found"):
        video.load(tmp_path / "missing.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        video.load(empty)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(clip.read_bytes()[:500])
    with pytest.raises(ValueError, match="corrupt.mp4"):
        video.load(corrupt)
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video")
    with pytest.raises(ValueError, match="notes.mp4"):
        video.load(text)
