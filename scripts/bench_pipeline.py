"""Prefill / decode speed-up of ApET at realistic sizes: CLIP-L/336 + Qwen2-0.5B-shaped text model.

    python scripts/bench_pipeline.py [--build build/bench-llava-clip-l-qwen2-0.5b] [--runs 3]

Builds the `bench-llava-clip-l-qwen2-0.5b` preset (random weights, ~1.4 GB of fp32 graphs) if --build has
none, then runs `apet-export bench` on onnxruntime CPU for budgets 576, 192, 128, 64. Tiny models
understate the gains (fixed overheads dominate); this is the figure to quote.
Target: prefill speed-up at budget 64 >= 0.9 x the ideal ratio implied by the token counts.

    python scripts/bench_pipeline.py --stage2-layer 12 [--build DIR]

builds the preset split at layer 12 of 24 (ApET stage 2 in the LLM) and measures, in one run, no
compression (576/576), one-stage 64 (64/64) and two-stage 64 (96/32), with the ideal ratio from the
per-layer token counts; the verdict is on the two-stage row.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

PRESET = "bench-llava-clip-l-qwen2-0.5b"


@click.command()
@click.option("--build", "build_dir", type=click.Path(path_type=Path), default=None,
              help=f"build directory [default: build/{PRESET}, or build/{PRESET}-k<K> with --stage2-layer]")
@click.option("--runs", default=3, show_default=True)
@click.option("--backend", default="onnxruntime", show_default=True)
@click.option("--stage2-layer", type=int, default=None, help="build two-stage (ApET stage 2 after this decoder layer)")
def main(build_dir: Path | None, runs: int, backend: str, stage2_layer: int | None):
    from apet_export.bench import run_bench
    from apet_export.export.build import BuildOptions, build

    console = Console(width=160)
    build_dir = build_dir or Path(f"build/{PRESET}" + (f"-k{stage2_layer}" if stage2_layer is not None else ""))
    if not (build_dir / "manifest.json").exists():
        build(BuildOptions(model=PRESET, out=build_dir, stage2_layer=stage2_layer))
    budgets = [576, 64] if stage2_layer is not None else [576, 192, 128, 64]
    rows = run_bench(build_dir, backend, budgets, runs=runs, max_new_tokens=8, console=console)
    at_64 = next(r for r in rows if r.label in ("64", "96/32"))
    verdict = "PASS" if at_64.efficiency >= 0.9 else "FAIL"
    console.print(
        f"budget 64 ({at_64.label}): prefill speed-up {at_64.prefill_speedup:.2f}x vs ideal {at_64.ideal_speedup:.2f}x "
        f"= {at_64.efficiency:.2f} of ideal (target >= 0.9): {verdict}"
    )


if __name__ == "__main__":
    main()
