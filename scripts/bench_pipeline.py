"""Prefill / decode speed-up of ApET at realistic sizes: CLIP-L/336 + Qwen2-0.5B-shaped text model.

    python scripts/bench_pipeline.py [--build build/bench-llava-clip-l-qwen2-0.5b] [--runs 3]

Builds the `bench-llava-clip-l-qwen2-0.5b` preset (random weights, ~1.4 GB of fp32 graphs) if --build has
none, then runs `apet-export bench` on onnxruntime CPU for budgets 576, 192, 128, 64. Tiny models
understate the gains (fixed overheads dominate); this is the figure to quote.
Target: prefill speed-up at budget 64 >= 0.9 x the ideal ratio implied by the token counts.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

PRESET = "bench-llava-clip-l-qwen2-0.5b"


@click.command()
@click.option("--build", "build_dir", type=click.Path(path_type=Path), default=Path(f"build/{PRESET}"))
@click.option("--runs", default=3, show_default=True)
@click.option("--backend", default="onnxruntime", show_default=True)
def main(build_dir: Path, runs: int, backend: str):
    from apet_export.bench import run_bench
    from apet_export.export.build import BuildOptions, build

    console = Console(width=160)
    if not (build_dir / "manifest.json").exists():
        build(BuildOptions(model=PRESET, out=build_dir))
    rows = run_bench(build_dir, backend, [576, 192, 128, 64], runs=runs, max_new_tokens=8, console=console)
    at_64 = next(r for r in rows if r.budget == 64)
    verdict = "PASS" if at_64.efficiency >= 0.9 else "FAIL"
    console.print(
        f"budget 64: prefill speed-up {at_64.prefill_speedup:.2f}x vs ideal {at_64.ideal_speedup:.2f}x "
        f"= {at_64.efficiency:.2f} of ideal (target >= 0.9): {verdict}"
    )


if __name__ == "__main__":
    main()
