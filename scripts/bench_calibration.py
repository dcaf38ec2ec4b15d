"""Accuracy cost and speed of a calibrated build at realistic sizes, on onnxruntime CPU, in one run.

    python scripts/bench_calibration.py [--build build/bench-llava-clip-l-qwen2-0.5b] [--precision int8]
                                        [--images FOLDER] [--samples 16] [--runs 3]

Builds the `bench-llava-clip-l-qwen2-0.5b` preset if --build has none, calibrates it (default images:
the pictures bundled with scikit-image, a dev extra), runs `parity` on the quantised build (accuracy
cost against fp32 and eager PyTorch) and `bench` on both builds, then prints the speed ratios
quantised / fp32 per budget. The preset has random weights: "accuracy" here is fidelity to the fp32
build, not task accuracy.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

PRESET = "bench-llava-clip-l-qwen2-0.5b"


def default_images() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


@click.command()
@click.option("--build", "build_dir", type=click.Path(path_type=Path), default=Path(f"build/{PRESET}"))
@click.option("--precision", type=click.Choice(["int8", "fp8"]), default="int8", show_default=True)
@click.option("--method", default="minmax", show_default=True)
@click.option("--images", type=click.Path(path_type=Path), default=None, help="default: scikit-image's samples")
@click.option("--samples", default=16, show_default=True)
@click.option("--runs", default=3, show_default=True)
@click.option("--rounds", default=2, show_default=True, help="fp32 / quantised benches alternate this many times")
@click.option("--reuse", is_flag=True, help="keep an existing quantised build (skip calibrate and parity)")
def main(build_dir: Path, precision: str, method: str, images: Path | None, samples: int, runs: int, rounds: int, reuse: bool):
    from apet_export.bench import run_bench
    from apet_export.calibration.build import CalibrationOptions, calibrate
    from apet_export.errors import ParityError
    from apet_export.export.build import BuildOptions, build
    from apet_export.parity.quantized import run_quantized_parity

    console = Console(width=160)
    if not (build_dir / "manifest.json").exists():
        build(BuildOptions(model=PRESET, out=build_dir))
    quantised = build_dir.with_name(f"{build_dir.name}-{precision}")
    if not (reuse and (quantised / "manifest.json").exists()):
        start = time.perf_counter()
        calibrate(CalibrationOptions(build_dir=build_dir, images=images or default_images(), precision=precision,
                                     method=method, samples=samples, out=quantised, force=True), console=console)
        console.print(f"calibrate: {time.perf_counter() - start:.0f} s")
        try:
            run_quantized_parity(quantised, console=console)
        except ParityError as error:  # still report the speed
            console.print(f"[red]{error}[/red]")
    budgets = [576, 64]
    # Alternate the two builds so a change in machine load hits both; each round gives its own ratios.
    pairs = []
    for _ in range(rounds):
        fp32 = run_bench(build_dir, "onnxruntime", budgets, runs=runs, max_new_tokens=8, console=console)
        quant = run_bench(quantised, "onnxruntime", budgets, runs=runs, max_new_tokens=8, console=console)
        pairs += list(zip(fp32, quant, strict=True))
    table = Table(title=f"{precision} / fp32 on onnxruntime CPU ({runs} runs, median; > 1 = quantised is faster)")
    for column in ("budget", "vision ms fp32", f"vision ms {precision}", "vision speed-up", "prefill ms fp32",
                   f"prefill ms {precision}", "prefill speed-up", "decode tok/s fp32", f"decode tok/s {precision}",
                   "decode speed-up"):
        table.add_column(column, justify="right")
    for a, b in pairs:
        table.add_row(
            str(a.budget), f"{a.vision_ms:.0f}", f"{b.vision_ms:.0f}", f"{a.vision_ms / b.vision_ms:.2f}x",
            f"{a.prefill_ms:.0f}", f"{b.prefill_ms:.0f}", f"{a.prefill_ms / b.prefill_ms:.2f}x",
            f"{a.decode_tokens_per_s:.1f}", f"{b.decode_tokens_per_s:.1f}",
            f"{b.decode_tokens_per_s / a.decode_tokens_per_s:.2f}x",
        )
    console.print(table)
    sizes = {name: sum(p.stat().st_size for p in d.glob("*.onnx*")) / 2**20 for name, d in (("fp32", build_dir), (precision, quantised))}
    console.print("graph sizes: " + ", ".join(f"{name} {mib:.0f} MiB" for name, mib in sizes.items()))


if __name__ == "__main__":
    main()
