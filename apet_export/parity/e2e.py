"""End-to-end parity: greedy generation through the torch and the onnxruntime backends.

Same image, prompt and budget; the generated token ids must be identical and the first-step logits
within the tolerance of the build's precision (LOGITS_ATOL).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from apet_export.manifest import Manifest
from apet_export.parity.report import ParityRow
from apet_export.runtime.pipeline import Pipeline

PROMPT = "Describe the image in detail."
LOGITS_ATOL = {"fp32": 1e-3, "fp16": 1e-2}  # fp16 graphs against the fp32 eager reference (measured 2.4e-3)


def first_difference(a: list[int], b: list[int]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first difference at token {i}: {x} vs {y}"
    if len(a) != len(b):
        return f"lengths differ: {len(a)} vs {len(b)} tokens"
    return f"identical ({len(a)} tokens)"


def e2e_parity(
    build_dir: Path, manifest: Manifest, image, budgets: list[int] | None = None, max_new_tokens: int = 32,
    backend: str = "onnxruntime",
) -> list[ParityRow]:
    """Greedy generation on `backend` (onnxruntime or tensorrt) against the torch backend."""
    rows = []
    atol = LOGITS_ATOL[manifest.precision]
    with Pipeline.from_dir(build_dir, backend="torch") as reference, Pipeline.from_dir(build_dir, backend=backend) as candidate:
        for budget in budgets or manifest.budgets_within((64, manifest.budget["max"])):
            expected = reference.generate([image], PROMPT, budget=budget, max_new_tokens=max_new_tokens, stream=False)
            actual = candidate.generate([image], PROMPT, budget=budget, max_new_tokens=max_new_tokens, stream=False)
            check = f"greedy {max_new_tokens} tokens k={budget}" + ("" if backend == "onnxruntime" else f" {backend}")
            mismatches = sum(x != y for x, y in zip(expected.token_ids, actual.token_ids, strict=False))
            mismatches += abs(len(expected.token_ids) - len(actual.token_ids))
            rows.append(ParityRow(
                check=check, output="token_ids", max_abs=float(mismatches), max_rel=float("nan"), atol=0.0, rtol=0.0,
                passed=expected.token_ids == actual.token_ids,
                detail=first_difference(expected.token_ids, actual.token_ids),
            ))
            diff = np.abs(expected.first_logits - actual.first_logits)
            scale = np.maximum(np.abs(expected.first_logits), 1e-12)
            rows.append(ParityRow(
                check=check, output="first-step logits", max_abs=float(diff.max()), max_rel=float((diff / scale).max()),
                atol=atol, rtol=0.0, passed=bool(diff.max() <= atol),
            ))
    return rows
