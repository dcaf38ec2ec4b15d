"""An empty or invalid value is an error, never the default; a path says what it is when it is not a file."""

import os

import pytest

from apet_export.errors import VideoError
from apet_export.runtime.images import synthetic_image
from apet_export.runtime.video import iter_video_frames, synthetic_frames, write_video
from tests.test_cli import run_cli


@pytest.mark.parametrize("command", ["parity", "bench"])
@pytest.mark.parametrize(("value", "message"), [(",", "empty entry"), ("", "empty entry"), ("64,,192", "empty entry"),
                                                ("0", "at least 1"), ("-64", "at least 1"), ("6x", "not a comma")])
def test_budgets_empty_or_invalid(capsys, tmp_path, command, value, message):
    code, _, err = run_cli(capsys, command, str(tmp_path), "--budgets", value)
    assert code == 2 and "Invalid value for '--budgets'" in err and message in err, err


def test_image_and_video_together(capsys, tmp_path):
    picture = tmp_path / "p.png"
    synthetic_image(0).save(picture)
    code, _, err = run_cli(capsys, "run", str(tmp_path), "--prompt", "x", "--image", str(picture), "--video", str(picture))
    assert code == 1 and err.strip() == "error: pass --image or --video, not both: a request is about pictures or one video"


def test_still_pictures_fifos_and_devices_are_not_videos(tmp_path):
    for suffix in (".png", ".jpg", ".webp"):
        picture = tmp_path / f"still{suffix}"
        synthetic_image(0).save(picture)
        with pytest.raises(VideoError, match=f"{picture} is a still picture .*, not a video: pass it with --image"):
            list(iter_video_frames(picture, 2))
    fifo = tmp_path / "camera.mp4"
    os.mkfifo(fifo)
    with pytest.raises(VideoError, match="is a named pipe \\(FIFO\\), not a video"):
        list(iter_video_frames(fifo, 2))
    with pytest.raises(VideoError, match="/dev/zero is a character device, not a video"):
        list(iter_video_frames("/dev/zero", 2))
    with pytest.raises(VideoError, match="is a folder, not a video"):
        list(iter_video_frames(tmp_path, 2))


def test_budget_zero_on_a_video_build_is_not_the_default(capsys, tmp_path, video_llava_build):
    video = write_video(tmp_path / "v.mp4", synthetic_frames(4))
    code, _, err = run_cli(capsys, "run", str(video_llava_build), "--video", str(video), "--frames", "4",
                           "--prompt", "x", "--budget", "0", "--max-new-tokens", "1")
    assert code == 1 and err.startswith("error: budget 0 over 4 frames keeps 0-0 tokens per frame"), err
    picture = tmp_path / "still.png"
    synthetic_image(0).save(picture)
    code, _, err = run_cli(capsys, "run", str(video_llava_build), "--video", str(picture), "--prompt", "x")
    assert code == 1 and "is a still picture" in err, err


def test_calibration_images_that_are_not_a_folder(tmp_path):
    from apet_export.calibration.data import find_images
    from apet_export.errors import CalibrationDataError

    picture = tmp_path / "one.png"
    synthetic_image(0).save(picture)
    with pytest.raises(CalibrationDataError, match="one.png is a file, not a folder"):
        find_images(picture)
    with pytest.raises(CalibrationDataError, match="/dev/zero is a character device, not a folder"):
        find_images("/dev/zero")
