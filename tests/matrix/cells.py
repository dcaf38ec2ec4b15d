"""The support matrix: every registered family through every path, as cells a test walks.

A row per family of the registry (apet_export.models.registry.FAMILIES), a column per path. A cell runs the
`apet-export` command a user would type, in this process, and either works (exit 0) or is refused before
any work with one `error:` line whose reason is what `refusal()` says (the README's support matrix lists
the same reasons). A family added to the registry gets its row without any change here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from apet_export.cli import main
from apet_export.models.registry import FAMILIES, PRESETS, get_family

PROMPT = ("--prompt", "Describe it.", "--max-new-tokens", "4")
TARGET = "sm89"  # an ahead-of-time TensorRT-RTX target: engines build on a CPU machine
CALIBRATION_SAMPLES = 6  # as the README's INT8 flow: the first six of tests/calibration's sample photos


@dataclass(frozen=True)
class Cell:
    name: str
    slow: bool  # minutes of export or calibration: `-m slow` and .ci/run
    run: Callable  # (Workspace) -> (exit code, stdout, stderr)
    what: str  # the command, for the README


def tiny_preset(family: str) -> str:
    """The first tiny preset of the family: what its row is built from."""
    return next(p.name for p in PRESETS.values() if p.family == family and p.tiny)


def families() -> list[str]:
    """Every registered family with a tiny preset (the matrix's rows)."""
    return [name for name in FAMILIES if any(p.family == name and p.tiny for p in PRESETS.values())]


class Workspace:
    """One family's builds and inputs, made once per session and shared by its cells."""

    def __init__(self, family: str, root: Path, fp32_build: Path | None = None):
        self.family, self.root = family, root
        self.capsys = None  # the running test's (set by each test: capsys is per test)
        self.builds: dict[str, Path] = {} if fp32_build is None else {"fp32": fp32_build}
        root.mkdir(parents=True, exist_ok=True)

    def cli(self, *args) -> tuple[int, str, str]:
        self.capsys.readouterr()  # drop what earlier steps printed
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        out, err = self.capsys.readouterr()
        return code, out, err

    def media(self) -> list[str]:
        """--image of a generated picture, or --video of two generated frames for a video family."""
        from apet_export.runtime.images import synthetic_image
        from apet_export.runtime.video import synthetic_frames, write_video

        if get_family(self.family).media == "video":
            video = self.root / "clip.mp4"
            if not video.exists():
                write_video(video, synthetic_frames(2))
            return ["--video", str(video), "--frames", "2"]
        image = self.root / "picture.png"
        if not image.exists():
            synthetic_image(1, (300, 500)).save(image)
        return ["--image", str(image)]

    def pictures(self) -> Path:
        """Real photos to calibrate on (scikit-image's bundled samples, as tests/calibration uses): generated
        pictures are too unlike each other's statistics for the accuracy thresholds."""
        import shutil

        from tests.calibration.conftest import SAMPLES

        folder = self.root / "calibration-pictures"
        if not folder.exists():
            source = Path(__import__("skimage.data").data.__file__).parent
            folder.mkdir()
            for name in SAMPLES[:CALIBRATION_SAMPLES]:
                shutil.copy(source / name, folder / name)
        return folder

    def build(self, kind: str) -> Path:
        """The family's build of this kind ("fp32", "fp16", "int8", "fp8"), made on first use."""
        if kind not in self.builds:
            out = self.root / kind
            if kind in ("fp32", "fp16"):
                step = self.cli("build", "--model", tiny_preset(self.family), "--precision", kind, "--out", out)
            else:
                step = self.cli("calibrate", self.build("fp32"), "--images", self.pictures(), "--precision", kind,
                                "--samples", CALIBRATION_SAMPLES, "--out", out)
            assert step[0] == 0, f"{self.family}: making its {kind} build failed:\n{step[2][-3000:]}"
            self.builds[kind] = out
        return self.builds[kind]


def _calibrate(precision: str):
    def run(ws: Workspace):
        out = ws.root / precision
        result = ws.cli("calibrate", ws.build("fp32"), "--images", ws.pictures(), "--precision", precision,
                        "--samples", CALIBRATION_SAMPLES, "--out", out, "--force")
        if result[0] == 0:
            ws.builds[precision] = out  # the engine and parity cells use this build
        return result
    return run


def _stage2(ws: Workspace):
    out = ws.root / "stage2"
    code, out_text, err = ws.cli("build", "--model", tiny_preset(ws.family), "--stage2-layer", "2", "--out", out)
    if code != 0:
        return code, out_text, err
    return ws.cli("run", out, *PROMPT, *ws.media())


CELLS = (
    Cell("build fp32", False, lambda ws: (0, "", "") if (ws.build("fp32") / "manifest.json").is_file() else (1, "", ""),
         "build --model PRESET"),
    Cell("run onnxruntime", False, lambda ws: ws.cli("run", ws.build("fp32"), *PROMPT, *ws.media()), "run DIR"),
    Cell("run onnxruntime plugin", False,
         lambda ws: ws.cli("run", ws.build("fp32"), "--vision-graph", "plugin", *PROMPT, *ws.media()),
         "run DIR --vision-graph plugin"),
    Cell("run torch", False, lambda ws: ws.cli("run", ws.build("fp32"), "--backend", "torch", *PROMPT, *ws.media()),
         "run DIR --backend torch"),
    Cell("run torch plugin", False,
         lambda ws: ws.cli("run", ws.build("fp32"), "--backend", "torch", "--vision-graph", "plugin", *PROMPT, *ws.media()),
         "run DIR --backend torch --vision-graph plugin"),
    Cell("visualize", False, lambda ws: ws.cli("visualize", ws.build("fp32"), "-o", ws.root / "visualize.png"),
         "visualize DIR -o PNG"),
    Cell("build fp16", True, lambda ws: (0, "", "") if (ws.build("fp16") / "manifest.json").is_file() else (1, "", ""),
         "build --precision fp16"),
    Cell("engine fp16", True, lambda ws: ws.cli("engine", ws.build("fp16"), "--target", TARGET), f"engine DIR --target {TARGET}"),
    Cell("calibrate int8", True, _calibrate("int8"), "calibrate DIR --precision int8"),
    Cell("engine int8", True, lambda ws: ws.cli("engine", ws.build("int8"), "--target", TARGET),
         f"engine DIR-int8 --target {TARGET}"),
    Cell("calibrate fp8", True, _calibrate("fp8"), "calibrate DIR --precision fp8"),
    Cell("engine fp8", True, lambda ws: ws.cli("engine", ws.build("fp8"), "--target", TARGET),
         f"engine DIR-fp8 --target {TARGET}"),
    Cell("parity", True, lambda ws: ws.cli("parity", ws.build("fp32")), "parity DIR"),
    Cell("parity int8", True, lambda ws: ws.cli("parity", ws.build("int8")), "parity DIR-int8"),  # every metric, default thresholds
    Cell("bench", True, lambda ws: ws.cli("bench", ws.build("fp32"), "--runs", "1", "--max-new-tokens", "2"),
         "bench DIR"),
    Cell("stage 2", True, _stage2, "build --stage2-layer 2, then run"),
)


def refusal(family: str, cell: str) -> str | None:
    """The reason a cell is refused for a family (a part of its one `error:` line), None where it works.
    Each comes from the family's contract or the backend, never from the test."""
    contract = get_family(family)
    if cell == "run torch plugin":
        return "runs on the onnxruntime backend"  # the torch backend is eager PyTorch: no ONNX plugin graph
    if cell == "stage 2":
        return contract.stage2_refusal
    return None
