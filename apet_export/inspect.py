"""`apet-export inspect DIR`: what a build contains."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from apet_export.manifest import load_manifest


def _shape(value) -> str:
    dims = value.type.tensor_type.shape.dim
    return escape("[" + ", ".join(d.dim_param or str(d.dim_value) for d in dims) + "]")  # not rich markup


def op_histogram(model) -> Counter:
    """op counts, custom-domain ops as domain::op_type."""
    return Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


def engines_summary(engines: dict) -> str:
    """One line per TensorRT module / version / precision that built engines, with their targets."""
    from apet_export.export.tensorrt import earlier_engines

    files = earlier_engines(engines)
    groups: dict[tuple, list[dict]] = {}
    for entry in files:
        groups.setdefault((entry["tensorrt"]["module"], entry["tensorrt"]["version"], entry["precision"]), []).append(entry)
    parts = []
    for (module, version, precision), entries in groups.items():
        size = sum(e["bytes"] for e in entries) / 2**20
        targets = ", ".join(sorted({e["target"] for e in entries}))
        parts.append(f"{len(entries)} TensorRT engines ({size:.1f} MiB) by {module} {version}, {precision}, targets {targets}")
    skipped = "".join(f"; {name} skipped: {why}" for name, why in engines.get("skipped", {}).items())
    failed = "".join(f"; {name} failed: {why}" for name, why in engines.get("failed", {}).items())
    return "; ".join(parts) + skipped + failed


def inspect_build(build_dir: Path, console: Console) -> None:
    import onnx
    from onnx import helper

    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    manifest.check_files(build_dir)  # a damaged build fails before any table is printed
    summary = Table(title=f"build {build_dir}", show_header=False)
    summary.add_column("key", style="bold")
    summary.add_column("value")
    config = manifest.compression
    for key, value in (
        ("source", f"{manifest.source['model']} (sha256 {manifest.source['sha256'][:12]}…)"),
        ("family", manifest.family),
        ("method", manifest.method),
        ("compression", f"M={config.num_basis} selection={config.selection} ridge={config.ridge:g} fps_start={config.fps_start} variant={config.variant}"),
        ("budget", f"default {manifest.budget['default'] or format(manifest.budget.get('ratio', 0), '.0%') + ' of each image'}, "
                   f"range [{manifest.budget['min']}, {manifest.budget['max']}]"),
        ("dims", ", ".join(f"{k}={v}" for k, v in manifest.dims.items())),
        ("precision / opset", f"{manifest.precision} / {manifest.opset}"),
        *((("quantization", ", ".join(f"{k}={v}" for k, v in manifest.quantization.items() if k != "graphs")),)
          if manifest.quantization else ()),
        ("schema / written by", f"{manifest.schema_version} / apet-export {manifest.apet_export_version}"),
        *((f"note {i + 1}", note) for i, note in enumerate(manifest.notes)),
        *((("ApET stage 2", f"after decoder layer {manifest.stage2['layer']} (llm_a | stage2 | llm_b); budget = "
                                f"average of the stages, 64 = 96/32"),) if manifest.stage2 else ()),
        *((("engines", engines_summary(manifest.engines)),) if manifest.engines else ()),
    ):
        summary.add_row(key, str(value))
    console.print(summary)

    for name in manifest.files:
        path = manifest.file(build_dir, name)
        if path.suffix != ".onnx":
            continue
        model = onnx.load(str(path), load_external_data=False)
        io = Table(title=f"{path.name}: inputs and outputs")
        for column in ("kind", "name", "dtype", "shape"):
            io.add_column(column)
        for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
            for value in values:
                dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
                io.add_row(kind, value.name, dtype, _shape(value))
        console.print(io)
        ops = Table(title=f"{path.name}: {len(model.graph.node)} nodes")
        ops.add_column("op")
        ops.add_column("count", justify="right")
        for op, count in op_histogram(model).most_common():
            ops.add_row(op, str(count))
        console.print(ops)
