"""Stage-2 parity: stage2.onnx on onnxruntime vs eager apet_compress on the same image span.

Hidden states are seeded random rows (the graph's input is any [B, L1, H]); the span sits after a short
text prefix, as in a prompt. keep_index must be identical, states and scores within fp32 tolerances.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from apet_export.compression.budget import split_budget
from apet_export.manifest import Manifest
from apet_export.models.registry import budget_policy
from apet_export.parity.report import ParityRow
from apet_export.runtime.sessions import onnxruntime_session
from apet_export.runtime.two_stage import eager_stage2

# |diff| <= atol + rtol * |expected| per element
TOLERANCES = {"compressed_states": (1e-4, 1e-3), "keep_index": (0.0, 0.0), "scores": (1e-4, 1e-4)}
PREFIX, SUFFIX = 5, 9  # text rows before and after the image span


def stage2_parity(build_dir: Path, manifest: Manifest, budgets=(64, 192), batches=(1, 2)) -> list[ParityRow]:
    session = onnxruntime_session(manifest.file(build_dir, "stage2"))
    hidden = manifest.dims["text_hidden"]
    dtype = np.dtype(manifest.files["stage2"].inputs[0].dtype)
    rng = np.random.default_rng(0)
    rows = []
    for budget in budget_policy(manifest).within(budgets):
        length, keep = split_budget(budget, manifest.budget["max"])
        for batch in batches:
            states = rng.standard_normal((batch, PREFIX + length + SUFFIX, hidden)).astype(dtype)
            expected = eager_stage2(states, PREFIX, length, keep, manifest.compression)
            feed = {"hidden_states": states, "image_start": np.array(PREFIX), "image_length": np.array(length),
                    "keep": np.array(keep)}
            actual = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
            for name, (atol, rtol) in TOLERANCES.items():
                want, got = expected[name], actual[name]
                if want.shape != got.shape:
                    rows.append(ParityRow(f"stage2.onnx k={length}/{keep} b={batch}", name, float("inf"), float("inf"),
                                          atol, rtol, False, f"shape {got.shape} != {want.shape}"))
                    continue
                diff = np.abs(got.astype(np.float64) - want)
                with np.errstate(divide="ignore", invalid="ignore"):
                    relative = np.nan_to_num(diff / np.abs(want), nan=0.0, posinf=np.inf)
                rows.append(ParityRow(
                    check=f"stage2.onnx k={length}/{keep} b={batch}", output=name, max_abs=float(diff.max()),
                    max_rel=float(relative.max()), atol=atol, rtol=rtol,
                    passed=bool((diff <= atol + rtol * np.abs(want)).all()),
                ))
    return rows
