"""ApET's share of vision.onnx run time on onnxruntime CPU, for a CLIP-L/336 tower (random weights).

    python scripts/bench_vision_share.py [--build build/bench-llava-clip-l-qwen2-0.5b] [--budget 64] [--runs 5]

Builds the vision graph of the `bench-llava-clip-l-qwen2-0.5b` preset if --build has none, runs it with
onnxruntime's profiler on, and sums the time of every node by its path (/vision/tower, /vision/apet,
/vision/multi_modal_projector): node names are paths precisely so that this is possible.
Target: ApET <= 5% of the graph at budget 64.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

PRESET = "bench-llava-clip-l-qwen2-0.5b"


def ensure_vision_build(build: Path) -> None:
    if (build / "manifest.json").exists():
        return
    from apet_export.export.build import BuildOptions
    from apet_export.export.build import build as run_build

    run_build(BuildOptions(model=PRESET, out=build, llm=False))


def stage_of(node_name: str) -> str:
    parts = node_name.strip("/").split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "vision" else "(graph glue)"


@click.command()
@click.option("--build", "build_dir", type=click.Path(path_type=Path), default=Path(f"build/{PRESET}-vision"))
@click.option("--budget", default=64, show_default=True)
@click.option("--runs", default=5, show_default=True)
@click.option("--threads", default=2, show_default=True)
def main(build_dir: Path, budget: int, runs: int, threads: int):
    console = Console(width=120)
    ensure_vision_build(build_dir)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path("/tmp") / "apet_vision_profile")
    session = ort.InferenceSession(str(build_dir / "vision.onnx"), options, providers=["CPUExecutionProvider"])
    side = session.get_inputs()[0].shape[2]
    feed = {"pixel_values": np.random.default_rng(0).standard_normal((1, 3, side, side), dtype=np.float32),
            "keep": np.array(budget, dtype=np.int64)}
    session.run(None, feed)  # warm-up (profiled too; dropped below by run index)
    wall = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        wall.append((time.perf_counter() - start) * 1e3)
    events = json.loads(Path(session.end_profiling()).read_text())

    # Node events carry args.op_name and the node name; group the kernel time of the measured runs.
    per_run = defaultdict(lambda: defaultdict(float))
    run_index = -1
    for event in events:
        if event.get("name") == "model_run":
            run_index += 1
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and run_index >= 1:
            per_run[run_index][stage_of(event["name"][: -len("_kernel_time")])] += event["dur"] / 1e3
    stages = sorted({s for r in per_run.values() for s in r})
    median = {s: statistics.median(r.get(s, 0.0) for r in per_run.values()) for s in stages}
    total = sum(median.values())

    table = Table(title=f"vision.onnx at keep={budget}: kernel time by stage (median of {runs} runs, {threads} threads)")
    for column in ("stage", "ms", "share"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for stage in sorted(stages, key=lambda s: -median[s]):
        table.add_row(stage, f"{median[stage]:.1f}", f"{100 * median[stage] / total:.2f}%")
    console.print(table)
    share = median.get("apet", 0.0) / total
    console.print(f"wall time per run (median): {statistics.median(wall):.1f} ms")
    console.print(f"ApET share at keep={budget}: {100 * share:.2f}% (target <= 5%): {'PASS' if share <= 0.05 else 'FAIL'}")


if __name__ == "__main__":
    main()
