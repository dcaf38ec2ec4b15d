"""Token budgets of one- and two-stage ApET builds.

The paper quotes one budget for a two-stage model, the average over the LLM's layers, split 3:1 between
the stages with the cut in the middle of the decoder: "64 tokens" = 96 image tokens after stage 1
(vision), 32 after stage 2 (LLM layer K); 192 = 288/96. split_budget keeps that convention:

    stage 1 = budget + budget // 2,  stage 2 = budget - budget // 2        (their mean is the budget)

and where 1.5x the budget exceeds the image's N tokens, stage 1 keeps all N and stage 2 takes
2 x budget - N, so the mean is still the budget (budget N = no compression in either stage).
"""

from __future__ import annotations

from apet_export.compression.apet import validate_budget
from apet_export.errors import BudgetError, InvalidInputError


def split_budget(budget: int, num_tokens: int) -> tuple[int, int]:
    """The paper's 3:1 split of an average budget: (stage-1 budget, stage-2 budget)."""
    first = min(budget + budget // 2, num_tokens)
    return first, 2 * budget - first


def average_budget_floor(num_basis: int) -> int:
    """Averages must exceed this: the stage-2 share (budget - budget // 2) must exceed M."""
    return 2 * num_basis


def check_stage_budgets(first: int, second: int, num_basis: int, num_tokens: int) -> tuple[int, int]:
    validate_budget(first, num_basis, num_tokens)
    if isinstance(second, bool) or not isinstance(second, int):
        raise InvalidInputError(f"the stage-2 budget must be an int, got {second!r}")
    if second > first:
        raise InvalidInputError(
            f"the stage-2 budget {second} is above the stage-1 budget {first}: stage 2 can only drop tokens, "
            f"choose --budget2 <= {first} (equal to it turns stage 2 off)"
        )
    if second <= num_basis:
        raise BudgetError(second, num_basis, first)
    return first, second


def resolve_budgets(manifest, budget: int | None = None, budget1: int | None = None, budget2: int | None = None):
    """(stage-1 budget, stage-2 budget or None) for one request on this build.

    One-stage build: `budget` (or `budget1`), default the build's. Two-stage build: `budget` is the
    paper's average (split_budget), or explicit `budget1` (+ `budget2`; without it stage 2 keeps every
    token). Stage 2 is None on one-stage builds.
    """
    if budget is not None and (budget1 is not None or budget2 is not None):
        raise InvalidInputError("pass either --budget (the average) or --budget1/--budget2, not both")
    if budget2 is not None and budget1 is None:
        raise InvalidInputError(f"--budget2 {budget2} needs --budget1 too (the stage-1 budget it is cut from)")
    num_basis, num_tokens = manifest.compression.num_basis, manifest.budget["max"]
    if not manifest.stage2:
        if budget2 is not None:
            raise InvalidInputError(
                "this build has no ApET stage 2 in the LLM: drop --budget2, or rebuild with --stage2-layer K"
            )
        if manifest.method == "none":  # the graph keeps every token whatever the budget
            return num_tokens, None
        requested = next((b for b in (budget1, budget, manifest.budget["default"]) if b is not None), None)
        if requested is None:  # the family's share of each image's tokens (dynamic resolution)
            return None, None
        from apet_export.models.registry import get_family

        # the family's range: LLaVA-NeXT's budget is for the whole image, split across its crops
        return get_family(manifest.family).check_budget(manifest, requested), None
    from apet_export.models.registry import get_family

    family = get_family(manifest.family)
    # an image's largest budget: N, or N x the most crops where a budget is split across crops (LLaVA-NeXT)
    num_tokens = family.budget_ceiling(manifest)
    if budget1 is not None:
        return check_stage_budgets(budget1, budget1 if budget2 is None else budget2, num_basis, num_tokens)
    average = family.check_budget(manifest, budget if budget is not None else manifest.budget["default"])
    return check_stage_budgets(*split_budget(average, num_tokens), num_basis, num_tokens)
