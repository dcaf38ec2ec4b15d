"""Vision parity: eager PyTorch vs onnxruntime on vision.onnx and vision.plugin.onnx, via Polygraphy.

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


def vision_parity(build_dir: Path, manifest: Manifest, feeds: list[dict]) -> list[ParityRow]:
    """Vision-graph feeds (see parity.run.vision_feeds) -> one row per graph, feed and output."""
    from apet_export.models.registry import get_family

    quiet_polygraphy()
    family = get_family(manifest.family)
    compare = SimpleCompareFunc(
        atol={name: tol[0] for name, tol in TOLERANCES.items()},
        rtol={name: tol[1] for name, tol in TOLERANCES.items()},
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
        results = Comparator.run([reference, runner], data_loader=feeds)
        with np.errstate(divide="ignore", invalid="ignore"):  # relative diffs of exact zeros
            accuracy = Comparator.compare_accuracy(results, compare_func=compare)
        (iterations,) = accuracy[0].values()  # one compare func, one runner pair
        for feed, outputs in zip(feeds, iterations, strict=True):
            for name, result in outputs.items():
                atol, rtol = TOLERANCES[name]
                rows.append(ParityRow(
                    check=f"{path.name} k={int(feed['keep'])} {family.feed_label(feed)}",
                    output=name, max_abs=float(result.max_absdiff), max_rel=float(result.max_reldiff),
                    atol=atol, rtol=rtol, passed=bool(result),
                ))
    return rows
