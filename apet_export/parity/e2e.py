"""End-to-end parity: greedy generation through the torch and the onnxruntime backends.

Same image, prompt and budget; the generated token ids must be identical and the first-step logits
within the tolerance of the build's precision (LOGITS_ATOL). Two-stage builds are checked at the paper's
budgets 64 (96/32) and 192 (288/96, or N/(384-N) where 288 > N), or at an explicit (stage-1, stage-2) pair.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from apet_export.manifest import Manifest
from apet_export.models.registry import budget_policy, get_family
from apet_export.parity.report import ParityRow
from apet_export.runtime.pipeline import Pipeline

PROMPT = "Describe the image in detail."
LOGITS_ATOL = {"fp32": 1e-3, "fp16": 1e-2}  # fp16 graphs against the fp32 eager reference (measured 2.4e-3)
VIDEO_FRAMES = 8


def generate(pipeline: Pipeline, image, max_new_tokens: int, **case):
    """Greedy generation about `image` (case: generate()'s budget arguments); a video build gets 8 synthetic
    frames instead, case["budget"] per frame (video builds are one-stage)."""
    if pipeline.manifest.dims.get("media", "image") == "video":
        from apet_export.runtime.video import synthetic_frames

        frames = synthetic_frames(VIDEO_FRAMES)
        return pipeline.generate_video(
            frames, PROMPT, budget=case["budget"] * len(frames), max_new_tokens=max_new_tokens, stream=False
        )
    return pipeline.generate([image], PROMPT, max_new_tokens=max_new_tokens, stream=False, **case)


def first_difference(a: list[int], b: list[int]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first difference at token {i}: {x} vs {y}"
    if len(a) != len(b):
        return f"lengths differ: {len(a)} vs {len(b)} tokens"
    return f"identical ({len(a)} tokens)"


def e2e_cases(manifest: Manifest, budgets: list[int] | None, pair: tuple[int, int] | None) -> list[dict]:
    """generate() budget arguments of every case."""
    if pair is not None:
        return [{"budget1": pair[0], "budget2": pair[1]}]
    if budgets:
        return [{"budget": b} for b in budgets]
    if manifest.stage2:  # the paper's averages 64 and 192, per crop where an image's budget is split (LLaVA-NeXT)
        policy = budget_policy(manifest)
        return [{"budget": b} for b in policy.within(policy.scaled((64, 192)))]
    return [{"budget": b} for b in get_family(manifest.family).e2e_budgets(manifest)]


def e2e_parity(
    build_dir: Path, manifest: Manifest, image, budgets: list[int] | None = None, max_new_tokens: int = 32,
    pair: tuple[int, int] | None = None, backend: str = "onnxruntime",
) -> list[ParityRow]:
    """Greedy generation on `backend` (onnxruntime or tensorrt) against the torch backend."""
    rows = []
    atol = LOGITS_ATOL[manifest.precision]
    with Pipeline.from_dir(build_dir, backend="torch") as reference, Pipeline.from_dir(build_dir, backend=backend) as candidate:
        for case in e2e_cases(manifest, budgets, pair):
            expected = generate(reference, image, max_new_tokens, **case)
            actual = generate(candidate, image, max_new_tokens, **case)
            first, second = candidate.budgets.resolve(**case)
            check = f"greedy {max_new_tokens} tokens k={first}" + ("" if second is None else f"/{second}")
            check += "" if backend == "onnxruntime" else f" {backend}"
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
