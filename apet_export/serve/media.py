"""A request's media parts -> the checked images or video frames the Pipeline takes.

Each payload is written to a private temporary file and read by the loaders `apet-export run` uses
(load_image, iter_video_frames), so the server refuses exactly the pictures and videos `run` refuses
(too large, extreme aspect ratio, decompression bomb, unreadable), with the same messages, naming the
request's part instead of the temporary file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from PIL import Image

from apet_export.errors import ImageError, InvalidInputError, VideoError
from apet_export.runtime.images import load_image
from apet_export.serve.protocol import ApiError, MediaPart


def _renamed(error: InvalidInputError, path: Path, part: MediaPart) -> InvalidInputError:
    """The loader's error with the temporary path replaced by the part's name."""
    return type(error)(str(error).replace(str(path), f"media part {part.number} ({part.media_type})"))


def load_images(parts: list[MediaPart]) -> list[Image.Image]:
    """Checked RGB images, one per image part; ImageError for a picture `run` would refuse."""
    images = []
    with tempfile.TemporaryDirectory(prefix="apet-serve-") as folder:
        for part in parts:
            if part.kind != "image":
                raise ApiError(400, f"media part {part.number} is a video ({part.media_type}) and this build "
                               f"answers about images: send image_url parts", "invalid_media", param="messages")
            path = Path(folder) / f"part-{part.number}"
            path.write_bytes(part.data)
            try:
                images.append(load_image(path))
            except ImageError as error:
                raise _renamed(error, path, part) from None
            path.unlink()
    return images


def load_video_frames(part: MediaPart, num_frames: int) -> list[Image.Image]:
    """num_frames frames sampled uniformly from a video part, as `run --video --frames` samples them."""
    from apet_export.runtime.video import iter_video_frames

    with tempfile.TemporaryDirectory(prefix="apet-serve-") as folder:
        path = Path(folder) / f"part-{part.number}"
        path.write_bytes(part.data)
        try:
            return [load_image(frame) for frame in iter_video_frames(path, num_frames)]
        except (VideoError, ImageError) as error:
            raise _renamed(error, path, part) from None


def request_frames(parts: list[MediaPart], num_frames: int) -> list[Image.Image]:
    """A video build's frames: one video part (sampled), or several image parts (the frames themselves)."""
    videos = [part for part in parts if part.kind == "video"]
    if videos:
        if len(parts) != 1:
            raise ApiError(400, "send one video part, or frames as image parts, not both or several videos",
                           "invalid_media", param="messages")
        return load_video_frames(videos[0], num_frames)
    return load_images(parts)
