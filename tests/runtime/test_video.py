"""Video decoding with PyAV: uniform frame sampling, streaming, errors. Each test writes its own video."""

import numpy as np
import pytest
from PIL import Image

from apet_export.errors import VideoError
from apet_export.runtime.video import (
    count_frames,
    frame_indices,
    iter_video_frames,
    synthetic_frames,
    write_video,
)


def solid_frames(count: int) -> list[Image.Image]:
    """Frame i is a flat grey of level 8 * i: which frame was decoded can be read back from its mean."""
    return [Image.new("RGB", (64, 48), (8 * i,) * 3) for i in range(count)]


def test_frame_indices_are_uniform_and_include_both_ends():
    assert frame_indices(24, 8) == [0, 3, 6, 9, 13, 16, 19, 23]
    assert frame_indices(3, 5) == [0, 0, 1, 1, 2]  # a short video repeats frames
    assert frame_indices(1, 2) == [0, 0]


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_sampled_frames_are_the_right_ones(tmp_path, codec):
    path = write_video(tmp_path / f"v-{codec}.mp4", solid_frames(24), codec=codec)
    assert count_frames(path) == 24
    frames = list(iter_video_frames(path, 8))
    assert len(frames) == 8 and all(f.size == (64, 48) and f.mode == "RGB" for f in frames)
    levels = [float(np.asarray(f).mean()) / 8 for f in frames]
    np.testing.assert_allclose(levels, frame_indices(24, 8), atol=0.5)  # lossy codecs: within half a step


def test_frames_are_yielded_as_they_are_decoded(tmp_path):
    path = write_video(tmp_path / "v.mkv", synthetic_frames(16), codec="ffv1")
    stream = iter_video_frames(path, 4)
    first = next(stream)  # one frame available before the rest is decoded
    source = synthetic_frames(16)
    error = [np.abs(np.asarray(first, np.float32) - np.asarray(s, np.float32)).mean() for s in (source[0], source[15])]
    assert error[0] < 8 < error[1]  # frame 0 up to yuv420p chroma subsampling (ffv1 itself is lossless)
    assert len(list(stream)) == 3


def test_errors_name_the_file(tmp_path):
    with pytest.raises(VideoError, match="does not exist"):
        list(iter_video_frames(tmp_path / "missing.mp4"))
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    with pytest.raises(VideoError, match="not a readable video"):
        list(iter_video_frames(bad))
    with pytest.raises(VideoError, match="num_frames"):
        list(iter_video_frames(bad, 0))
