"""`apet-export bench DIR`: vision, prefill and decode cost per budget, and the speed-up against no
compression (budget = N) measured in the same run, next to the ideal speed-up the token counts imply.

On a two-stage build every budget b < N is measured twice, one-stage (b/b: stage 2 off) and two-stage
(the paper's split, 96/32 for 64). Its prefill tokens are the average over the decoder's layers,
(K x L1 + (L - K) x L2) / L, which is what the prefill cost is proportional to."""

from __future__ import annotations

import multiprocessing
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from apet_export.errors import InvalidInputError
from apet_export.manifest import load_manifest
from apet_export.models.registry import budget_policy
from apet_export.runtime.images import synthetic_image
from apet_export.runtime.pipeline import Pipeline

PROMPT = "Describe the image in detail."


@dataclass
class BenchRow:
    budget: int  # stage 1 (vision)
    prefill_tokens: float  # per-layer average on two-stage builds
    vision_ms: float
    prefill_ms: float
    decode_tokens_per_s: float
    peak_rss_mib: float | None  # of a fresh process that loaded the build and generated at this budget only
    prefill_speedup: float = 1.0  # measured: prefill_ms(N) / prefill_ms(budget)
    ideal_speedup: float = 1.0  # prefill_tokens(N) / prefill_tokens(budget)
    total_speedup: float = 1.0  # (vision + prefill)(N) / (vision + prefill)(budget)
    budget2: int | None = None  # stage 2 (LLM layer K); None on one-stage builds
    backend: str = ""

    @property
    def label(self) -> str:
        return str(self.budget) if self.budget2 is None else f"{self.budget}/{self.budget2}"

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


def case_peak_rss(build_dir: Path, backend: str, first: int, second: int | None, max_new_tokens: int) -> float | None:
    """Run in a fresh process: load the build, generate once at this case; the process's peak RSS."""
    budgets = {"budget": first} if second is None else {"budget1": first, "budget2": second}
    with Pipeline.from_dir(build_dir, backend=backend) as pipeline:
        pipeline.answer([synthetic_image(0)], PROMPT, max_new_tokens=max_new_tokens, stream=False, **budgets)
    return peak_rss_mib()


def bench_cases(manifest, budgets: list[int], pairs: list[tuple[int, int]]) -> list[tuple[int, int | None]]:
    """(stage-1, stage-2 or None) budget pairs to measure, the uncompressed reference first."""
    from apet_export.compression.budget import split_budget

    policy = budget_policy(manifest)
    full = manifest.budget["max"]
    if not manifest.stage2:
        return [(b, None) for b in dict.fromkeys([full, *budgets])]
    cases = [(full, full)]
    for budget in budgets:
        cases += [(budget, budget), split_budget(budget, full)]  # one-stage b, then the paper's two-stage b
    for first, second in pairs:
        cases.append(policy.check_stages(first, second))
    return list(dict.fromkeys(cases))


def run_bench(
    build_dir: Path, backend: str = "onnxruntime", budgets: list[int] | None = None, runs: int = 5,
    max_new_tokens: int = 16, console: Console | None = None, pairs: list[tuple[int, int]] | None = None,
) -> list[BenchRow]:
    """pairs: explicit (stage-1, stage-2) budgets to measure too, on two-stage builds."""
    console = console or Console()
    if runs < 1:
        raise InvalidInputError(f"runs must be >= 1 (the median of the runs is reported), got {runs}")
    if max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    manifest = load_manifest(build_dir)
    manifest.check_files(build_dir)  # a damaged build fails before anything is measured
    policy = budget_policy(manifest)
    full = policy.request_range()[1]  # no compression: every token (of every crop)
    budgets = list(dict.fromkeys(budgets or policy.within((full, 192, 128, 64))))
    for budget in budgets:
        policy.check(budget)
    if pairs and not manifest.stage2:
        raise InvalidInputError("--budget1/--budget2 need a two-stage build (apet-export build --stage2-layer K)")
    cases = bench_cases(manifest, budgets, pairs or [])
    # Peak memory of each case in a fresh process: one process's peak never goes down, and onnxruntime
    # keeps the arena memory of a larger budget, so cases measured one after another in one process would
    # all report the largest one's peak. "spawn" starts clean; the timings stay round-robin in this process.
    context = multiprocessing.get_context("spawn")
    peaks = {}
    for case in cases:
        with context.Pool(1) as pool:
            peaks[case] = pool.apply(case_peak_rss, (build_dir, backend, *case, max_new_tokens))
    image = synthetic_image(0)
    rows: dict[tuple, BenchRow] = {}
    with Pipeline.from_dir(build_dir, backend=backend) as pipeline:
        def generate(first, second):
            budgets = {"budget": first} if second is None else {"budget1": first, "budget2": second}
            return pipeline.answer([image], PROMPT, max_new_tokens=max_new_tokens, stream=False, **budgets)

        results: dict[tuple, list] = {case: [] for case in cases}
        for case in cases:  # warm-up, then a first timed run
            generate(*case)
            results[case].append(generate(*case))
        for _ in range(runs - 1):  # the other runs round-robin: load drifts on a shared machine hit all cases alike
            for case in cases:
                results[case].append(generate(*case))
    for (first, second), runs_of_case in results.items():
        rows[first, second] = BenchRow(
            budget=first, budget2=second,
            prefill_tokens=prefill_tokens(manifest, runs_of_case[0]),
            vision_ms=statistics.median(r.vision_ms for r in runs_of_case),
            prefill_ms=statistics.median(r.prefill_ms for r in runs_of_case),
            decode_tokens_per_s=statistics.median(r.decode_tokens_per_s for r in runs_of_case),
            peak_rss_mib=peaks[first, second], backend=backend,
        )
    reference = rows[cases[0]]
    for row in rows.values():
        row.prefill_speedup = reference.prefill_ms / row.prefill_ms
        row.ideal_speedup = reference.prefill_tokens / row.prefill_tokens
        row.total_speedup = (reference.vision_ms + reference.prefill_ms) / (row.vision_ms + row.prefill_ms)
    ordered = list(rows.values())
    print_bench(ordered, console, f"{build_dir} on {backend} ({runs} runs, median)")
    if manifest.quantization:  # speed and accuracy cost side by side
        from apet_export.parity.quantized import print_accuracy_summary

        print_accuracy_summary(build_dir, manifest, console)
    return ordered


def prefill_tokens(manifest, result) -> float:
    """Tokens each decoder layer sees in prefill, averaged over the layers."""
    first = result.prompt_tokens + result.image_tokens
    if result.image_tokens_stage2 is None:
        return float(first)
    layer, num_layers = manifest.stage2["layer"], manifest.dims["num_layers"]
    second = result.prompt_tokens + result.image_tokens_stage2
    return (layer * first + (num_layers - layer) * second) / num_layers
def run_bench_with_tensorrt(
    build_dir: Path, backend: str = "onnxruntime", budgets: list[int] | None = None, runs: int = 5,
    max_new_tokens: int = 16, console: Console | None = None, tensorrt: bool = True,
    pairs: list[tuple[int, int]] | None = None, require_tensorrt: bool = False,
) -> list[BenchRow]:
    """run_bench on `backend`, then on the TensorRT engines too where this machine runs them; otherwise
    one line says why TensorRT was skipped (an error instead with require_tensorrt; engines for this GPU
    that cannot be used are always an error)."""
    from apet_export.runtime.backends.trt import tensorrt_skip_reason

    console = console or Console()
    if tensorrt and backend != "tensorrt":  # before the first run: a broken TensorRT setup fails fast
        skipped = tensorrt_skip_reason(build_dir, load_manifest(build_dir), require=require_tensorrt)
    rows = run_bench(build_dir, backend, budgets, runs, max_new_tokens, console, pairs)
    if tensorrt and backend != "tensorrt":
        if skipped:
            console.print(f"tensorrt: skipped ({skipped})")
        else:
            rows += run_bench(build_dir, "tensorrt", budgets, runs, max_new_tokens, console, pairs)
    return rows


def print_bench(rows: list[BenchRow], console: Console, title: str) -> None:
    table = Table(title=title, caption="peak RSS: a fresh process per budget (loading the build + one generation at that budget)")
    for column in ("budget", "prefill tokens", "vision ms", "prefill ms", "decode tok/s", "peak RSS MiB",
                   "prefill speed-up", "ideal", "speed-up / ideal", "vision+prefill speed-up"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row.label, f"{row.prefill_tokens:g}", f"{row.vision_ms:.1f}", f"{row.prefill_ms:.1f}",
            f"{row.decode_tokens_per_s:.1f}", f"{row.peak_rss_mib:.0f}" if row.peak_rss_mib else "-",
            f"{row.prefill_speedup:.2f}x", f"{row.ideal_speedup:.2f}x", f"{row.efficiency:.2f}",
            f"{row.total_speedup:.2f}x",
        )
    console.print(table)


def rows_as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [{**asdict(row), "efficiency": row.efficiency} for row in rows]
