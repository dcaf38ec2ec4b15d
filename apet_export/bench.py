"""`apet-export bench DIR`: vision, prefill and decode cost per budget, and the speed-up against no
compression (budget = N) measured in the same run, next to the ideal speed-up the token counts imply."""

from __future__ import annotations

import multiprocessing
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from apet_export.errors import InvalidInputError
from apet_export.manifest import load_manifest
from apet_export.runtime.images import synthetic_image
from apet_export.runtime.pipeline import Pipeline

PROMPT = "Describe the image in detail."


@dataclass
class BenchRow:
    budget: int
    prefill_tokens: int
    vision_ms: float
    prefill_ms: float
    decode_tokens_per_s: float
    peak_rss_mib: float | None  # of a fresh process that loaded the build and ran this budget only
    prefill_speedup: float = 1.0  # measured: prefill_ms(N) / prefill_ms(budget)
    ideal_speedup: float = 1.0  # prefill_tokens(N) / prefill_tokens(budget)
    total_speedup: float = 1.0  # (vision + prefill)(N) / (vision + prefill)(budget)

    @property
    def efficiency(self) -> float:
        return self.prefill_speedup / self.ideal_speedup


def peak_rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def measure_budget(build_dir: Path, backend: str, budget: int, runs: int, max_new_tokens: int) -> BenchRow:
    """One budget in the calling process: load the build, warm up, time `runs` generations (medians).
    peak_rss_mib is the process's peak: loading plus generating at this budget."""
    image = synthetic_image(0)
    with Pipeline.from_dir(build_dir, backend=backend) as pipeline:
        def generate():
            return pipeline.generate([image], PROMPT, budget=budget, max_new_tokens=max_new_tokens, stream=False)

        generate()  # warm-up
        results = [generate() for _ in range(runs)]
    return BenchRow(
        budget=budget,
        prefill_tokens=results[0].prompt_tokens + results[0].image_tokens,
        vision_ms=statistics.median(r.vision_ms for r in results),
        prefill_ms=statistics.median(r.prefill_ms for r in results),
        decode_tokens_per_s=statistics.median(r.decode_tokens_per_s for r in results),
        peak_rss_mib=peak_rss_mib(),
    )


def run_bench(
    build_dir: Path, backend: str = "onnxruntime", budgets: list[int] | None = None, runs: int = 5,
    max_new_tokens: int = 16, console: Console | None = None,
) -> list[BenchRow]:
    console = console or Console()
    if runs < 1:
        raise InvalidInputError(f"runs must be >= 1 (the median of the runs is reported), got {runs}")
    if max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    manifest = load_manifest(build_dir)
    manifest.check_files(build_dir)  # a damaged build fails before anything is measured
    full = manifest.budget["max"]
    budgets = list(dict.fromkeys(budgets or manifest.budgets_within((full, 192, 128, 64))))
    for budget in budgets:
        manifest.check_budget(budget)
    if full not in budgets:  # the uncompressed reference is always measured in the same run
        budgets.insert(0, full)
    # Each budget runs in a fresh process: a process's peak RSS never goes down, and onnxruntime keeps the
    # arena memory of a larger budget, so budgets measured one after another in one process would all
    # report the largest budget's peak. "spawn" starts clean (no memory inherited from this process).
    context = multiprocessing.get_context("spawn")
    rows: dict[int, BenchRow] = {}
    for budget in budgets:
        with context.Pool(1) as pool:
            rows[budget] = pool.apply(measure_budget, (build_dir, backend, budget, runs, max_new_tokens))
    reference = rows[full]
    for row in rows.values():
        row.prefill_speedup = reference.prefill_ms / row.prefill_ms
        row.ideal_speedup = reference.prefill_tokens / row.prefill_tokens
        row.total_speedup = (reference.vision_ms + reference.prefill_ms) / (row.vision_ms + row.prefill_ms)
    ordered = [rows[b] for b in budgets]
    print_bench(ordered, console, f"{build_dir} on {backend} ({runs} runs, median)")
    return ordered


def print_bench(rows: list[BenchRow], console: Console, title: str) -> None:
    table = Table(title=title, caption="peak RSS: a fresh process per budget (loading the build + that budget's runs)")
    for column in ("budget", "prefill tokens", "vision ms", "prefill ms", "decode tok/s", "peak RSS MiB",
                   "prefill speed-up", "ideal", "speed-up / ideal", "vision+prefill speed-up"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row.budget), str(row.prefill_tokens), f"{row.vision_ms:.1f}", f"{row.prefill_ms:.1f}",
            f"{row.decode_tokens_per_s:.1f}", f"{row.peak_rss_mib:.0f}" if row.peak_rss_mib else "-",
            f"{row.prefill_speedup:.2f}x", f"{row.ideal_speedup:.2f}x", f"{row.efficiency:.2f}",
            f"{row.total_speedup:.2f}x",
        )
    console.print(table)


def rows_as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [{**asdict(row), "efficiency": row.efficiency} for row in rows]
