"""Token budgets: one object holds every rule of a build's budget (range, default, share, splits, checks).

A request's budget is read in the unit its family gives it (BudgetPolicy.unit):

    unit "image"   the budget is per image: T in (M, N]                          LLaVA, Qwen2.5-VL
    unit "crops"   the budget is for the whole image, split evenly over its        LLaVA-NeXT
                   P crops (the paper's 640/320/160 for 5 crops = 128/64/32 each)
    unit "frames"  the budget is for the whole video, split evenly over its F      Video-LLaVA
                   frames (the first budget % F frames keep one more)

    default        the build's budget; None = `ratio` of each image's own N tokens (Qwen2.5-VL: 30%),
                   floored at M + 1 (dynamic resolution: N varies per image)

Two-stage builds (ApET stage 2 in the LLM) quote one budget, the average over the decoder's layers,
split 3:1 between the stages with the cut in the middle of the decoder: "64 tokens" = 96 image tokens
after stage 1 (vision), 32 after stage 2 (LLM layer K); 192 = 288/96:

    stage 1 = budget + budget // 2,  stage 2 = budget - budget // 2        (their mean is the budget)

and where 1.5x the budget exceeds the image's N tokens, stage 1 keeps all N and stage 2 takes
2 x budget - N, so the mean is still the budget (budget N = no compression in either stage).

This module is the bottom layer's: it knows numbers, not model families (a family builds its policy from
a manifest with ModelFamily.budget_policy).
"""

from __future__ import annotations

from dataclasses import dataclass

from apet_export.errors import BudgetError, InvalidInputError

UNITS = ("image", "crops", "frames")


def split_budget(budget: int, num_tokens: int) -> tuple[int, int]:
    """The paper's 3:1 split of an average budget: (stage-1 budget, stage-2 budget)."""
    first = min(budget + budget // 2, num_tokens)
    return first, 2 * budget - first


def average_budget_floor(num_basis: int) -> int:
    """Two-stage averages must exceed this: the stage-2 share (budget - budget // 2) must exceed M."""
    return 2 * num_basis


def _check_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"the {what} must be an int, got {value!r}")
    return value


@dataclass(frozen=True)
class BudgetPolicy:
    """The budget rules of one build. Token counts are per vision call (image, crop or frame)."""

    num_basis: int  # M: every kept set holds the M basis tokens, so a budget must exceed it
    max: int  # N: tokens of one image / crop / frame (dynamic resolution: of the largest image)
    default: int | None  # the build's budget per image / image / frame; None: `ratio` of each image's tokens
    method: str = "apet"  # "none": the graph keeps every token whatever the budget
    unit: str = "image"  # what a request's budget is for: "image", "crops" (the whole image) or "frames"
    max_units: int = 1  # crops: the most crops an image can give
    ratio: float | None = None  # share of each image's tokens kept by default (default None)
    two_stage: bool = False  # the build has ApET stage 2 in the LLM
    extra_rows: int = 0  # LLM rows per image besides its kept tokens (LLaVA-NeXT: one newline per grid row)

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"budget unit {self.unit!r} is not one of {UNITS}")  # a family's declaration: a bug

    @property
    def min(self) -> int:
        return self.num_basis + 1

    @property
    def compresses(self) -> bool:
        return self.method != "none"

    # -- one request ---------------------------------------------------------------------------------
    @property
    def ceiling(self) -> int:
        """The largest budget of one request: N, or N x the most crops where it is split across crops."""
        return self.max * (self.max_units if self.unit == "crops" else 1)

    def request_range(self) -> tuple[int, int]:
        """[low, high] of a request's budget in its unit (frames: per frame, see per_frame)."""
        return self.min, self.ceiling

    def check(self, budget: int) -> int:
        """The request's budget, or an InvalidInputError naming the valid range."""
        _check_int(budget, "budget")
        low, high = self.request_range()
        if self.unit == "crops" and not low <= budget <= high:
            raise InvalidInputError(
                f"budget {budget} is outside [{low}, {high}]: this family's budget is for the whole image, split "
                f"evenly across its crops (at most {self.max_units}), each of which must keep more than "
                f"num_basis={self.num_basis} tokens"
            )
        if self.unit == "image" and not low <= budget <= high:
            raise BudgetError(budget, self.num_basis, self.max)
        return budget

    def scaled(self, per_call) -> list[int]:
        """Per-call budgets as request budgets: x the most crops for a whole-image budget, else as they are."""
        return [b * (self.max_units if self.unit == "crops" else 1) for b in per_call]

    def within(self, candidates) -> list[int]:
        """The candidate budgets this build accepts, in order, without repeats."""
        low, high = self.request_range()
        return list(dict.fromkeys(b for b in candidates if low <= b <= high))

    def resolve(self, budget: int | None = None, budget1: int | None = None, budget2: int | None = None):
        """(stage-1 budget or None, stage-2 budget or None) of one request.

        One-stage build: `budget` (or `budget1`), default the build's; None means each image keeps the
        policy's share of its own tokens. Two-stage build: `budget` is the paper's average (split_budget),
        or explicit `budget1` (+ `budget2`; without it stage 2 keeps every token).
        """
        if budget is not None and (budget1 is not None or budget2 is not None):
            raise InvalidInputError("pass either --budget (the average) or --budget1/--budget2, not both")
        if budget2 is not None and budget1 is None:
            raise InvalidInputError(f"--budget2 {budget2} needs --budget1 too (the stage-1 budget it is cut from)")
        if not self.two_stage:
            if budget2 is not None:
                raise InvalidInputError(
                    "this build has no ApET stage 2 in the LLM: drop --budget2, or rebuild with --stage2-layer K"
                )
            if not self.compresses:
                return self.max, None
            requested = next((b for b in (budget1, budget, self.default) if b is not None), None)
            return (None if requested is None else self.check(requested)), None
        if budget1 is not None:
            return self.check_stages(budget1, budget1 if budget2 is None else budget2)
        average = self.check(budget if budget is not None else self.default)
        if average <= average_budget_floor(self.num_basis):  # its stage-2 share would not exceed M
            raise BudgetError(average, average_budget_floor(self.num_basis), self.ceiling)
        return self.check_stages(*split_budget(average, self.ceiling))

    def check_stages(self, first: int, second: int) -> tuple[int, int]:
        """An explicit (stage-1, stage-2) pair of a two-stage build, checked."""
        _check_int(first, "stage-1 budget")
        if not self.min <= first <= self.ceiling:
            raise BudgetError(first, self.num_basis, self.ceiling)
        _check_int(second, "stage-2 budget")
        if second > first:
            raise InvalidInputError(
                f"the stage-2 budget {second} is above the stage-1 budget {first}: stage 2 can only drop tokens, "
                f"choose --budget2 <= {first} (equal to it turns stage 2 off)"
            )
        if second <= self.num_basis:
            raise BudgetError(second, self.num_basis, first)
        return first, second

    # -- splits over the parts of one request ---------------------------------------------------------
    def per_image(self, budget: int | None, num_tokens: int) -> int:
        """Tokens kept of one image of num_tokens: all for method none or budget >= N; budget None: the share."""
        if not self.compresses:
            return num_tokens
        if num_tokens <= self.num_basis:
            raise InvalidInputError(
                f"the image gives {num_tokens} visual tokens, not more than the ApET basis size {self.num_basis}: "
                f"pass a larger image (or raise the processor's min_pixels)"
            )
        if budget is None:
            if self.ratio is None:
                raise InvalidInputError("this build has no default budget: pass --budget")
            budget = max(self.min, int(self.ratio * num_tokens))
        return min(budget, num_tokens)

    def per_crop(self, budget: int | None, crops: int) -> int:
        """The budget of each of an image's crops: the image's budget split evenly, at most N."""
        if not self.compresses:
            return self.max
        budget = self.default if budget is None else budget
        per_crop = min(budget // crops, self.max)
        if per_crop < self.min:
            raise InvalidInputError(
                f"budget {budget} over this image's {crops} crops leaves {per_crop} tokens per crop: pass at least "
                f"{self.min * crops}"
            )
        return per_crop

    def per_frame(self, budget: int | None, num_frames: int) -> list[int]:
        """The video's budget split evenly across its frames (the first budget % F frames keep one more)."""
        if num_frames < 1:
            raise InvalidInputError(f"a video needs at least one frame, got {num_frames}")
        if not self.compresses:
            return [self.max] * num_frames
        budget = self.default * num_frames if budget is None else budget  # 0 is an error, not the default
        share, extra = divmod(budget, num_frames)
        budgets = [share + 1] * extra + [share] * (num_frames - extra)
        if not self.min <= budgets[-1] <= budgets[0] <= self.max:
            raise InvalidInputError(
                f"budget {budget} over {num_frames} frames keeps {budgets[-1]}-{budgets[0]} tokens per frame, outside "
                f"[{self.min}, {self.max}]: choose a video budget between {self.min * num_frames} and "
                f"{self.max * num_frames}"
            )
        return budgets

    def rows_bound(self, budget: int | None) -> int:
        """At most this many LLM rows per image at this request budget (for the context check)."""
        most = self.max * (self.max_units if self.unit == "crops" else 1)  # every token of every crop
        kept = most if budget is None or not self.compresses else min(budget, most)
        return kept + self.extra_rows

    def calls_budget(self, budget: int | None) -> int:
        """The budget of one vision call at this request budget (no image at hand: calibration's typical
        call): the whole budget for images, a crop's share of the most crops, one frame's."""
        if not self.compresses:
            return self.max
        if budget is None:
            budget = self.default
        if budget is None:  # a share of each image's tokens: the share of the largest image
            return max(self.min, int((self.ratio or 1.0) * self.max))
        if self.unit == "crops":
            return self.per_crop(budget, self.max_units)
        return min(budget, self.max)
