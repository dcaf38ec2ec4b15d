"""The Triton ApetScore kernel against eager torch `apet_scores` on a CUDA GPU, in the same run.

    python scripts/bench_triton_apet.py [--runs 20] [--batch 1,8] [--dtype fp16]

Per shape: median ms of each (CUDA events, after a warm-up that also JIT-compiles the kernel), the
speed-up, whether basis_index is identical and the largest score difference. Needs a CUDA GPU; on a
CPU-only machine it exits with a message (the kernel's correctness is tested on CPU in the interpreter:
tests/plugins/test_triton_apet.py).
"""

from __future__ import annotations

import statistics
import sys

import click
import torch
from rich.console import Console
from rich.table import Table

from apet_export.plugins.apet_score import reference_apet_score

SHAPES = ((576, 1024), (2880, 1024), (576, 4096), (8192, 3584))  # (N, D): CLIP-L/336, AnyRes, 7B hidden, video


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up (and Triton's JIT compile)
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@click.command()
@click.option("--runs", default=20, show_default=True)
@click.option("--batch", "batches", default="1,8", show_default=True, help="comma-separated batch sizes")
@click.option("--dtype", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True)
@click.option("--num-basis", default=10, show_default=True)
def main(runs: int, batches: str, dtype: str, num_basis: int):
    if not torch.cuda.is_available():
        print(
            "bench_triton_apet: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine "
            "with `pip install -e '.[triton]'`. The kernel's CPU check is tests/plugins/test_triton_apet.py.",
            file=sys.stderr,
        )
        sys.exit(2)
    from apet_export.plugins.triton_apet import apet_score_triton

    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    console = Console()
    table = Table(title=f"ApetScore on {torch.cuda.get_device_name()} ({dtype}, M={num_basis}, ridge 1e-5)")
    for column in ("B", "N", "D", "eager ms", "triton ms", "speed-up", "basis equal", "max |score diff|"):
        table.add_column(column, justify="right")
    for batch in (int(b) for b in batches.split(",")):
        for num_tokens, dim in SHAPES:
            torch.manual_seed(0)
            x = torch.randn(batch, num_tokens, dim, device="cuda").to(torch_dtype)
            eager = median_ms(lambda x=x: reference_apet_score(x, num_basis, 1e-5, -1), runs)
            triton_ms = median_ms(lambda x=x: apet_score_triton(x, num_basis, 1e-5, -1), runs)
            scores, basis = apet_score_triton(x, num_basis, 1e-5, -1)
            ref_scores, ref_basis = reference_apet_score(x, num_basis, 1e-5, -1)
            table.add_row(
                str(batch), str(num_tokens), str(dim), f"{eager:.3f}", f"{triton_ms:.3f}", f"{eager / triton_ms:.2f}x",
                str(torch.equal(basis, ref_basis)), f"{(scores - ref_scores).abs().max().item():.2e}",
            )
    console.print(table)


if __name__ == "__main__":
    main()
