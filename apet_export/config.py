"""Configuration dataclasses and their JSON form."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from apet_export.errors import InvalidInputError

Selection = Literal["fps", "dpc", "random"]
SELECTIONS: tuple[str, ...] = ("fps", "dpc", "random")
# ApET variants: where the basis features go and in which order the kept rows come (compression/apet.py,
# VARIANT_RULES). "uniform" is one rule for every family; the others are what the authors' released code
# runs for that family, and each family module names its own as the default.
VARIANTS: tuple[str, ...] = ("uniform", "llava", "qwen2_5_vl", "video_llava")

# Additive attention-mask value: exp() of it is 0 in any precision, and it stays finite, so a row whose keys are
# all masked (the padding of a left-padded batch) softmaxes to finite numbers instead of NaN, which would reach
# the other rows through the cached keys and values. fp16 ends at 65504: -1e9 rounds to -inf there, so fp16
# graphs take -3e4, which leaves room for the scores added to it.
MASKED_FP32, MASKED_FP16 = -1e9, -3.0e4


def masked_value(fp16: bool) -> float:
    return MASKED_FP16 if fp16 else MASKED_FP32


@dataclass(frozen=True)
class ApetConfig:
    """ApET hyper-parameters (arXiv 2602.19870, as the released code runs them).

    num_basis: M, basis tokens used to approximate every token.
    selection: how the basis is picked: farthest point sampling, density-peak clustering or random.
    ridge: lambda of the ridge least squares (keeps the M x M system invertible for duplicate tokens).
    fps_start: first FPS token: "norm" = the token of largest L2 norm (deterministic), or an index.
    seed: seed of the `random` selection.
    variant: the slot and row rules of the released code to follow (VARIANTS; compression/apet.py).
        Manifests written before variants existed load as "uniform", the rule they were built with.
    """

    num_basis: int = 10
    selection: Selection = "fps"
    ridge: float = 1e-5
    fps_start: str | int = "norm"
    seed: int = 0
    variant: str = "uniform"

    def __post_init__(self):
        if not isinstance(self.num_basis, int) or self.num_basis < 1:
            raise InvalidInputError(f"num_basis must be an integer >= 1, got {self.num_basis!r}")
        if self.selection not in SELECTIONS:
            raise InvalidInputError(
                f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}"
            )
        if not self.ridge > 0:
            raise InvalidInputError(f"ridge must be > 0 (it keeps the basis system solvable), got {self.ridge!r}")
        if self.variant not in VARIANTS:
            raise InvalidInputError(f"ApET variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        start_ok = self.fps_start == "norm" or (
            isinstance(self.fps_start, int) and not isinstance(self.fps_start, bool) and self.fps_start >= 0
        )
        if not start_ok:
            raise InvalidInputError(
                f"fps_start must be 'norm' or a token index >= 0, got {self.fps_start!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ApetConfig:
        return cls(**data)


@dataclass(frozen=True)
class AxisRange:
    """The (min, opt, max) size of one named dynamic axis: what a TensorRT optimisation profile needs."""

    min: int
    opt: int
    max: int

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.min, self.opt, self.max)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input/output: name, dtype and shape with named dynamic axes (str) or static sizes (int)."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> TensorSpec:
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


@dataclass(frozen=True)
class ArtifactSpec:
    """One file of a build and its I/O contract."""

    path: str  # relative to the build directory
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: dict) -> ArtifactSpec:
        return cls(
            data["path"],
            tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
        )
