"""Vision parity: eager PyTorch vs onnxruntime (and TensorRT engines, where a GPU runs them) on vision.onnx
and vision.plugin.onnx, via Polygraphy.

For every (graph, budget, batch) the Comparator runs both runners on the same feed and checks each
output against its tolerance; keep_index must be identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.comparator import Comparator, SimpleCompareFunc

from apet_export.compat import quiet_polygraphy
from apet_export.manifest import Manifest
from apet_export.parity.report import ParityRow
from apet_export.runtime.backends.torch import TorchVisionRunner
from apet_export.runtime.sessions import onnxruntime_session

# fp32 tolerances: |diff| <= atol or |diff| / |expected| <= rtol, per element.
TOLERANCES = {
    "image_embeds": (1e-4, 1e-3),
    "keep_index": (0.0, 0.0),  # must be identical
    "scores": (1e-4, 1e-4),
}
# fp16 builds (tower + projector in fp16, ApET in fp32) against the fp32 eager reference: the features
# carry fp16 rounding (~1e-3 relative) into the scores and embeddings; the kept tokens must still match.
TOLERANCES_FP16 = {
    "image_embeds": (1e-2, 1e-2),
    "keep_index": (0.0, 0.0),
    "scores": (1e-2, 1e-2),
}


def tolerances(precision: str) -> dict[str, tuple[float, float]]:
    return TOLERANCES_FP16 if precision == "fp16" else TOLERANCES


def vision_parity(
    build_dir: Path, manifest: Manifest, feeds: list[dict], tensorrt: dict[str, str] | None = None,
) -> list[ParityRow]:
    """Vision-graph feeds (see parity.run.vision_feeds) -> one row per graph (and runtime), feed and output.
    tensorrt: {artifact: engine path} of the engines to check too (this GPU's), or None."""
    from apet_export.models.registry import get_family

    quiet_polygraphy()
    family = get_family(manifest.family)
    limits = tolerances(manifest.precision)
    compare = SimpleCompareFunc(
        atol={name: tol[0] for name, tol in limits.items()},
        rtol={name: tol[1] for name, tol in limits.items()},
        check_shapes=True,
    )
    rows: list[ParityRow] = []
    graphs = [name for name in ("vision", "vision_plugin") if name in manifest.files]
    reference = TorchVisionRunner(build_dir, manifest)
    for graph in graphs:
        path = manifest.file(build_dir, graph)
        runner = OnnxrtRunner(
            lambda path=path, plugin=graph == "vision_plugin": onnxruntime_session(path, apet_score=plugin),
            name=f"onnxruntime:{path.name}",
        )
        rows += _compare(reference, runner, path.name, feeds, compare, limits, family)
        if tensorrt and graph in tensorrt:
            from apet_export.runtime.backends.trt import vision_runner

            runner = vision_runner(build_dir, manifest, graph)
            rows += _compare(reference, runner, f"tensorrt:{tensorrt[graph]}", feeds, compare, limits, family)
    return rows


def _compare(reference, runner, label: str, feeds, compare, limits, family) -> list[ParityRow]:
    """Run both runners on every feed; one row per feed and output."""
    results = Comparator.run([reference, runner], data_loader=feeds)
    with np.errstate(divide="ignore", invalid="ignore"):  # relative diffs of exact zeros
        accuracy = Comparator.compare_accuracy(results, compare_func=compare)
    (iterations,) = accuracy[0].values()  # one compare func, one runner pair
    rows = []
    for feed, outputs in zip(feeds, iterations, strict=True):
        for name, result in outputs.items():
            atol, rtol = limits[name]
            rows.append(ParityRow(
                check=f"{label} k={int(feed['keep'])} {family.feed_label(feed)}",
                output=name, max_abs=float(result.max_absdiff), max_rel=float(result.max_reldiff),
                atol=atol, rtol=rtol, passed=bool(result),
            ))
    return rows
