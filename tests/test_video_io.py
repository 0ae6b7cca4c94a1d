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


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"num_frames": 0}, ValueError, "num_frames must be >= 1"),
        ({"num_frames": -3}, ValueError, "num_frames must be >= 1"),
        ({"num_frames": 2.5}, TypeError, "whole number"),
        ({"num_frames": True}, TypeError, "whole number"),
        ({"fps": 0}, ValueError, "fps must be"),
        ({"fps": -1.0}, ValueError, "fps must be"),
        ({"fps": float("nan")}, ValueError, "fps must be"),
    ],
)
def test_sampling_arguments_are_checked_before_the_file(tmp_path, kwargs, err, match):
    """Bad sampling arguments are named (not silently replaced: ``num_frames=0`` used to mean 8, ``2.5`` to mean 3),
    and before the file is touched: a missing file is not what the message blames."""
    with pytest.raises(err, match=match):
        video.load(tmp_path / "missing.mp4", **kwargs)


def test_bad_sampling_arguments_do_not_blame_a_valid_file(clip):
    with pytest.raises(ValueError, match="num_frames"):
        video.load(clip, num_frames=0)
    with pytest.raises(ValueError, match="fps must be") as e:
        video.load(clip, fps=0)
    assert "cannot read video" not in str(e.value)
    assert len(video.load(clip, num_frames=np.int64(3))) == 3  # numpy integers are whole numbers
