"""Frames from a video file, decoded with PyAV (FFmpeg) and sampled uniformly as Video-LLaVA samples them.

`iter_video_frames` yields each sampled frame as soon as it is decoded, so a pipeline can encode frame i
while frame i+1 is still being decoded (or, for a live source, still being captured).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from apet_export.errors import MissingDependencyError, VideoError
from apet_export.paths import require_file
from apet_export.runtime.images import synthetic_image


def frame_indices(total: int, num_frames: int) -> list[int]:
    """num_frames indices spread uniformly over [0, total) with both ends included (Video-LLaVA's
    np.linspace(0, total - 1, num_frames, dtype=int)); a short video repeats frames."""
    return np.linspace(0, total - 1, num_frames, dtype=int).tolist()


def is_still_picture(container) -> bool:
    """FFmpeg opens a PNG / JPEG / WebP ... as a one-frame 'video' (the image2 demuxer, or a *_pipe one)."""
    return container.format.name == "image2" or container.format.name.endswith("_pipe")


def import_av():
    """PyAV, which only video input needs (extra `video`)."""
    try:
        import av
    except ImportError as error:
        raise MissingDependencyError(
            f"reading a video needs PyAV, which is not installed ({error}): pip install 'apet-export[video]'"
        ) from error
    return av


def _open(path: Path):
    av = import_av()

    require_file(path, "a video", VideoError, "the path of a video file (mp4, mkv, webm, avi ...)")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as error:
        raise VideoError(f"{path} is not a readable video ({error}): pass a video file FFmpeg can decode") from error
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path} has no video stream: pass a file with video in it")
    if is_still_picture(container):
        codec = container.streams.video[0].codec_context.name
        container.close()
        raise VideoError(
            f"{path} is a still picture ({codec}), not a video: pass it with --image to a picture build, or pass "
            f"a video file (mp4, mkv, webm, avi ...)"
        )
    return container


def count_frames(path: str | Path) -> int:
    """Frames in the first video stream: from the container header, or by decoding when the header has no count."""
    av = import_av()

    with _open(Path(path)) as container:
        stream = container.streams.video[0]
        if stream.frames > 0:
            return stream.frames
        try:
            return sum(1 for _ in container.decode(stream))
        except av.error.FFmpegError as error:
            raise VideoError(f"decoding {path} failed ({error}): the file is damaged or truncated") from error


def iter_video_frames(path: str | Path, num_frames: int = 8) -> Iterator[Image.Image]:
    """num_frames RGB frames sampled uniformly from the video, each yielded as soon as it is decoded."""
    av = import_av()

    path = Path(path)
    if num_frames < 1:
        raise VideoError(f"num_frames must be >= 1, got {num_frames}")
    total = count_frames(path)
    if total == 0:
        raise VideoError(f"{path} has no frames: pass a non-empty video")
    wanted = frame_indices(total, num_frames)
    yielded = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for index, frame in enumerate(container.decode(stream)):
                repeats = wanted.count(index)
                if repeats:
                    image = frame.to_image().convert("RGB")
                    for _ in range(repeats):
                        yield image
                    yielded += repeats
                if yielded == num_frames:
                    return
        except av.error.FFmpegError as error:
            raise VideoError(f"decoding {path} failed ({error}): the file is damaged or truncated") from error
    if yielded != num_frames:  # the header promised more frames than the stream holds
        raise VideoError(f"{path} decoded to fewer frames than its header says ({yielded} of {num_frames} sampled)")


def synthetic_frames(num_frames: int = 8, seed: int = 0, size: tuple[int, int] = (320, 240)) -> list[Image.Image]:
    """Deterministic test frames: one synthetic picture panned a little further each frame."""
    base = np.asarray(synthetic_image(seed, (size[0] + 4 * num_frames, size[1])))
    return [Image.fromarray(base[:, 4 * i : 4 * i + size[0]]) for i in range(num_frames)]


def write_video(path: str | Path, frames: list[Image.Image], fps: int = 8, codec: str = "mpeg4") -> Path:
    """Encode RGB frames into a video file (tests and demos make their own videos; nothing is downloaded)."""
    av = import_av()

    path = Path(path)
    width, height = frames[0].size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image.convert("RGB"))):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    return path
