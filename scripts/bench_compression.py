"""Cost of apet_compress on CPU next to one forward pass of a CLIP-L/336-sized vision tower.

    python scripts/bench_compression.py [--runs 5] [--threads 2]

Both are timed in the same run (median of --runs after one warm-up); the ApET stage must stay under 2%
of the tower at N=576, D=1024 (LLaVA-1.5's setting).
"""

from __future__ import annotations

import statistics
import time

import click
import torch
from rich.console import Console
from rich.table import Table

from apet_export.compression import ApetConfig, apet_compress

SIZES_N = (576, 2880, 8192)
SIZES_D = (1024, 3584, 4096)


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def clip_l_336_forward_ms(runs: int) -> float:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )
    torch.manual_seed(0)
    tower = CLIPVisionModel(config).eval()
    pixels = torch.randn(1, 3, 336, 336)
    with torch.inference_mode():
        return median_ms(lambda: tower(pixel_values=pixels, output_hidden_states=True), runs)


@click.command()
@click.option("--runs", default=5, show_default=True)
@click.option("--threads", default=2, show_default=True, help="torch intra-op threads")
@click.option("--budget", default=64, show_default=True, help="tokens kept")
def main(runs: int, threads: int, budget: int):
    torch.set_num_threads(threads)
    console = Console()
    config = ApetConfig()
    table = Table(title=f"apet_compress on CPU ({threads} threads, keep={budget}, M={config.num_basis}, fps)")
    for column in ("N", "D", "ms (median)"):
        table.add_column(column, justify="right")
    results = {}
    with torch.inference_mode():
        for n in SIZES_N:
            for d in SIZES_D:
                x = torch.randn(1, n, d)
                results[n, d] = median_ms(lambda x=x: apet_compress(x, budget, config), runs)
                table.add_row(str(n), str(d), f"{results[n, d]:.2f}")
    tower_ms = clip_l_336_forward_ms(runs)
    console.print(table)
    share = results[576, 1024] / tower_ms
    console.print(f"CLIP-L/336 vision tower forward (batch 1, random weights): {tower_ms:.1f} ms")
    console.print(
        f"ApET at N=576, D=1024: {results[576, 1024]:.2f} ms = {100 * share:.2f}% of the tower "
        f"(target < 2%): {'PASS' if share < 0.02 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
