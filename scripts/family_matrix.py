"""The support matrix as a new user meets it: every tiny preset through every command, one row per preset.

    python scripts/family_matrix.py --out /tmp/matrix [--presets tiny-llava,tiny-qwen2.5-vl] [--cells build-fp32,run-ort]

Each cell runs the `apet-export` command line in a fresh process and is reported as `ok`, `refused: <the
error line>` (a one-line `error:` answer before any work) or `FAIL: <the last line of the traceback>`. Cells
whose input failed are `-`. The table is printed as Markdown (the README's support matrix uses the same cells).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

TINY_PRESETS = ("tiny-llava", "tiny-llava-siglip-qwen2", "tiny-llava-next", "tiny-qwen2.5-vl", "tiny-video-llava")
PROMPT = ["--prompt", "Describe it.", "--max-new-tokens", "4"]

# (cell, the cell it needs, the command's arguments); {d} is the preset's folder, {images}/{video} the inputs.
CELLS = (
    ("build-fp32", None, ["build", "--model", "{preset}", "--out", "{d}/fp32"]),
    ("engine-fp32", "build-fp32", ["engine", "{d}/fp32", "--target", "sm89"]),
    ("build-fp16", None, ["build", "--model", "{preset}", "--precision", "fp16", "--out", "{d}/fp16"]),
    ("engine-fp16", "build-fp16", ["engine", "{d}/fp16", "--target", "sm89"]),
    ("calibrate-int8", "build-fp32", ["calibrate", "{d}/fp32", "--images", "{images}", "--precision", "int8",
                                      "--samples", "4", "--out", "{d}/int8"]),
    ("engine-int8", "calibrate-int8", ["engine", "{d}/int8", "--target", "sm89"]),
    ("calibrate-fp8", "build-fp32", ["calibrate", "{d}/fp32", "--images", "{images}", "--precision", "fp8",
                                     "--samples", "4", "--out", "{d}/fp8"]),
    ("engine-fp8", "calibrate-fp8", ["engine", "{d}/fp8", "--target", "sm89"]),
    ("run-ort", "build-fp32", ["run", "{d}/fp32", *PROMPT, "{media}"]),
    ("run-ort-plugin", "build-fp32", ["run", "{d}/fp32", "--vision-graph", "plugin", *PROMPT, "{media}"]),
    ("run-torch", "build-fp32", ["run", "{d}/fp32", "--backend", "torch", *PROMPT, "{media}"]),
    ("run-torch-plugin", "build-fp32", ["run", "{d}/fp32", "--backend", "torch", "--vision-graph", "plugin", *PROMPT,
                                        "{media}"]),
    ("parity", "build-fp32", ["parity", "{d}/fp32"]),
    ("parity-int8", "calibrate-int8", ["parity", "{d}/int8"]),
    ("bench", "build-fp32", ["bench", "{d}/fp32", "--runs", "1", "--max-new-tokens", "2"]),
    ("visualize", "build-fp32", ["visualize", "{d}/fp32", "-o", "{d}/visualize.png"]),
    ("build-stage2", None, ["build", "--model", "{preset}", "--stage2-layer", "2", "--out", "{d}/stage2"]),
    ("run-stage2", "build-stage2", ["run", "{d}/stage2", *PROMPT, "{media}"]),
)


def run_cell(arguments: list[str], log: Path) -> tuple[str, float]:
    start = time.perf_counter()
    command = [sys.executable, "-c", "from apet_export.cli import main; main()", *arguments]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ, check=False)
    seconds = time.perf_counter() - start
    log.write_text(f"$ apet-export {' '.join(arguments)}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    if done.returncode == 0:
        return "ok", seconds
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors and "Traceback" not in done.stderr:
        return f"refused: {errors[-1][len('error:'):].strip()}", seconds
    return f"FAIL: {lines[-1].strip() if lines else f'exit {done.returncode}'}", seconds


def inputs(out: Path) -> tuple[Path, Path]:
    from apet_export.runtime.images import synthetic_image
    from apet_export.runtime.video import synthetic_frames, write_video

    images = out / "calibration-images"
    images.mkdir(parents=True, exist_ok=True)
    for seed in range(4):
        synthetic_image(seed, (400, 300) if seed % 2 else (300, 400)).save(images / f"{seed}.png")
    video = out / "clip.mp4"
    if not video.exists():
        write_video(video, synthetic_frames(8))
    return images, video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--presets", default=",".join(TINY_PRESETS))
    parser.add_argument("--cells", default=",".join(c[0] for c in CELLS))
    parser.add_argument("--reuse", action="store_true", help="builds already in --out count as done")
    args = parser.parse_args()
    wanted = args.cells.split(",")
    images, video = inputs(args.out)
    results: dict[str, dict[str, str]] = {}
    for preset in args.presets.split(","):
        folder = args.out / preset
        folder.mkdir(parents=True, exist_ok=True)
        row = results.setdefault(preset, {})
        media = ["--video", str(video)] if "video" in preset else ["--image", str(images / "1.png")]
        for cell, needs, template in CELLS:
            if cell not in wanted:
                continue
            if needs is not None and not row.get(needs, "").startswith("ok"):
                row[cell] = "-"
                continue
            arguments = []
            for part in template:
                if part == "{media}":
                    arguments += media
                else:
                    arguments.append(part.format(preset=preset, d=folder, images=images))
            made = next((Path(a) for a in arguments[arguments.index("--out") + 1:][:1]), None) if "--out" in arguments else None
            if made is not None and (made / "manifest.json").is_file() and args.reuse:
                row[cell] = "ok"  # made by an earlier run of this script
                continue
            outcome, seconds = run_cell(arguments, folder / f"{cell}.log")
            row[cell] = outcome
            print(f"{preset:26s} {cell:16s} {seconds:6.1f}s  {outcome[:200]}", flush=True)
    cells = [c[0] for c in CELLS if c[0] in wanted]
    print("\n| cell | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for cell in cells:
        print(f"| {cell} | " + " | ".join(results[p].get(cell, "-").replace("|", "/")[:120] for p in results) + " |")


if __name__ == "__main__":
    main()
