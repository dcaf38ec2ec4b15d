"""End-to-end parity: greedy generation through the torch and the onnxruntime backends.

Same image, prompt and budget; the generated token ids must be identical and the first-step logits
within an fp32 tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from apet_export.manifest import Manifest
from apet_export.parity.report import ParityRow
from apet_export.runtime.pipeline import Pipeline

PROMPT = "Describe the image in detail."
LOGITS_ATOL = 1e-3
VIDEO_FRAMES = 8


def generate(pipeline: Pipeline, image, budget: int, max_new_tokens: int):
    """Greedy generation about `image`; a video build gets 8 synthetic frames instead, `budget` per frame."""
    if pipeline.manifest.dims.get("media", "image") == "video":
        from apet_export.runtime.video import synthetic_frames

        frames = synthetic_frames(VIDEO_FRAMES)
        return pipeline.generate_video(frames, PROMPT, budget=budget * len(frames), max_new_tokens=max_new_tokens, stream=False)
    return pipeline.generate([image], PROMPT, budget=budget, max_new_tokens=max_new_tokens, stream=False)


def first_difference(a: list[int], b: list[int]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first difference at token {i}: {x} vs {y}"
    if len(a) != len(b):
        return f"lengths differ: {len(a)} vs {len(b)} tokens"
    return f"identical ({len(a)} tokens)"


def e2e_parity(
    build_dir: Path, manifest: Manifest, image, budgets: list[int] | None = None, max_new_tokens: int = 32
) -> list[ParityRow]:
    rows = []
    with Pipeline.from_dir(build_dir, backend="torch") as reference, Pipeline.from_dir(build_dir, backend="onnxruntime") as candidate:
        for budget in budgets or manifest.budgets_within((64, manifest.budget["max"])):
            expected = generate(reference, image, budget, max_new_tokens)
            actual = generate(candidate, image, budget, max_new_tokens)
            check = f"greedy {max_new_tokens} tokens k={budget}"
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
                atol=LOGITS_ATOL, rtol=0.0, passed=bool(diff.max() <= LOGITS_ATOL),
            ))
    return rows
