"""Typed errors. Each message says what failed and how to fix it; the CLI prints it as one line."""

from __future__ import annotations


class ApetExportError(Exception):
    """Base class of every error apet-export raises on purpose."""


class InvalidInputError(ApetExportError, ValueError):
    """An argument or tensor the caller passed is unusable."""


class BudgetError(InvalidInputError):
    """A token budget outside (num_basis, num_tokens]."""

    def __init__(self, keep: int, num_basis: int, num_tokens: int):
        self.keep, self.num_basis, self.num_tokens = keep, num_basis, num_tokens
        if num_basis >= num_tokens:  # no budget can work: the basis itself is the problem
            super().__init__(
                f"num_basis={num_basis} leaves no valid budget for {num_tokens} input tokens (a budget must "
                f"exceed num_basis and cannot exceed the tokens): choose num_basis below {num_tokens}, e.g. 10"
            )
            return
        super().__init__(
            f"budget keep={keep} is outside ({num_basis}, {num_tokens}]: choose a budget between "
            f"{num_basis + 1} and {num_tokens} (the budget must exceed num_basis={num_basis} and "
            f"cannot exceed the {num_tokens} input tokens)"
        )


class UnknownNameError(InvalidInputError, KeyError):
    """A name looked up in a registry (method, model family, preset, backend) does not exist."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        super().__init__(f"unknown {kind} {name!r}: choose one of {', '.join(sorted(known))}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class ImageError(InvalidInputError):
    """An image file that cannot be read."""


class VideoError(InvalidInputError):
    """A video file that cannot be read or sampled."""


class PipelineClosedError(ApetExportError, RuntimeError):
    """A Pipeline used after close()."""


class PromptTooLongError(InvalidInputError):
    """A prompt (with its image tokens and new tokens) that does not fit the model's context."""


class CalibrationDataError(InvalidInputError):
    """Calibration images or prompts that are missing, unreadable or too few."""


class ArtifactError(ApetExportError):
    """A build directory or artifact that is missing, incomplete or inconsistent."""


class CheckpointError(ArtifactError, ValueError):
    """A checkpoint whose config.json or weights are unusable (not JSON, not an object, shapes that differ)."""


class ManifestVersionError(ArtifactError):
    """A manifest written by another schema version."""


class MissingDependencyError(ApetExportError, ImportError):
    """An optional dependency (TensorRT, a plugin library, flash-attn ...) is not installed."""


class ExportError(ApetExportError):
    """Tracing or converting a model failed."""


class ParityError(ApetExportError):
    """An artifact disagrees with eager PyTorch beyond its tolerance."""


class EngineTargetError(InvalidInputError):
    """A GPU target (compute capability) the installed TensorRT cannot build engines for."""


class EngineBuildError(ExportError):
    """TensorRT could not parse a graph or build its engine."""


class EngineCompatibilityError(ArtifactError):
    """An engine built by another TensorRT version, or for another GPU, than the one loading it."""


class EngineInputError(InvalidInputError):
    """A tensor shape (or shape-tensor value) outside the engine's optimisation profile, or an input the
    TensorRT execution context rejected."""


class EngineRunError(ApetExportError):
    """TensorRT failed to run an engine (its errors are printed as they happen)."""


class DeviceError(ApetExportError):
    """The operation needs a CUDA GPU and none is usable."""
