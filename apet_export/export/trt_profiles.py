"""TensorRT optimisation profiles derived from the manifest: one (min, opt, max) range per dynamic axis name.

The manifest names every dynamic axis of every graph (TensorSpec shapes): the profiles below know axis
names, not graphs, so any ONNX artifact that uses them (vision.onnx, llm.onnx, llm_a.onnx, llm_b.onnx ...)
gets its profiles without code of its own:

    axis            min            opt                      max                from
    batch           1              1                        max_batch          engine settings
    keep            M + 1          default budget per call  N                  the family's budget policy (a shape-tensor input)
    patches, crops, frames ...                                                 the family (ModelFamily.axis_ranges)
    sequence        1 | 1 | 1      prompt | 1 | chunk       C | 1 | C - 1      prefill | decode | extend
    past_sequence   0 | 0 | 1      0 | prompt | prompt      0 | C - 1 | C - 1  (C = dims.max_context, or the cap)
    total_sequence  1 | 1 | 2      prompt | +1 | +chunk     C | C | C

A graph with a `past_sequence` axis is a decoder part and gets three profiles, in this order: "prefill"
(no cache, S up to C), "decode" (S = 1, cache up to C - 1) and "extend" (several tokens onto a non-empty
cache: chunked prefill, video frames arriving into the cache); any other graph gets one profile, "default".
The lowest `keep` is M + 1 on every build, two-stage ones included (stage 2, and stage 1 with an explicit
--budget1, go down to it; the floor of a two-stage build's *average* budget, 2M + 1, is higher).
A 0-d integer input named like an axis (`keep`) is a shape tensor: TensorRT needs its value range
(IOptimizationProfile.set_shape_input), which comes from the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

from apet_export.config import ArtifactSpec, AxisRange, TensorSpec
from apet_export.errors import ArtifactError
from apet_export.manifest import Manifest

PROMPT_TEXT_TOKENS = 32  # text tokens of a typical prompt, for the "opt" point of the sequence axes
DECODER_AXIS = "past_sequence"  # a graph with this axis is a decoder part: prefill, decode, extend profiles


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: input shapes and shape-tensor values, each as (min, opt, max)."""

    name: str  # "default" | "prefill" | "decode" | "extend"
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    values: dict[str, tuple[int, int, int]]  # shape-tensor inputs (0-d): their value range

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shapes": {name: [list(s) for s in shapes] for name, shapes in self.shapes.items()},
            "values": {name: list(v) for name, v in self.values.items()},
        }

    def accepts(self, shapes: dict[str, tuple[int, ...]], values: dict[str, int] | None = None) -> bool:
        """Whether concrete input shapes (and shape-tensor values) lie inside this profile."""
        for name, (low, _, high) in self.shapes.items():
            shape = shapes.get(name)
            if shape is None or len(shape) != len(low):
                return False
            if any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)):
                return False
        for name, (low, _, high) in (self.values.items() if values is not None else ()):
            if name in values and not low <= values[name] <= high:
                return False
        return True


def axis_ranges(manifest: Manifest, phase: str, max_batch: int, max_context: int | None) -> dict[str, AxisRange]:
    """The range of every axis name in one phase ("default", "prefill", "decode" or "extend"): the generic axes,
    and the family's own (patches, crops, frames ...) from its contract (ModelFamily.axis_ranges)."""
    from apet_export.models.registry import get_family

    family = get_family(manifest.family)
    policy = family.budget_policy(manifest)
    typical = policy.calls_budget(None)  # one vision call at the build's default budget (or share)
    ranges = {
        "batch": AxisRange(1, 1, max_batch),
        "keep": AxisRange(policy.min, typical, policy.max),
        **family.axis_ranges(manifest, max_batch),
    }
    if max_context is None:  # a vision-only build: no decoder axes
        return ranges
    prompt = min(max_context - 1, typical + PROMPT_TEXT_TOKENS)
    if phase == "decode":
        ranges.update(
            sequence=AxisRange(1, 1, 1),
            past_sequence=AxisRange(0, prompt, max_context - 1),
            total_sequence=AxisRange(1, prompt + 1, max_context),
        )
    elif phase == "extend":  # S >= 1 new tokens onto P >= 1 cached ones, P + S <= C
        chunk = max(1, min(typical, max_context // 2))  # a frame's kept tokens, or a prefill chunk
        past = max(1, min(prompt, max_context - chunk))
        ranges.update(
            sequence=AxisRange(1, chunk, max_context - 1),
            past_sequence=AxisRange(1, past, max_context - 1),
            total_sequence=AxisRange(2, past + chunk, max_context),
        )
    else:
        ranges.update(
            sequence=AxisRange(1, prompt, max_context),
            past_sequence=AxisRange(0, 0, 0),
            total_sequence=AxisRange(1, prompt, max_context),
            # stage2.onnx (two-stage builds): where the image rows are in the prefill's hidden states
            image_start=AxisRange(0, 1, max_context - 1),
            image_length=AxisRange(policy.min, typical, policy.max),
        )
    return ranges


def is_shape_value_input(spec: TensorSpec, ranges: dict[str, AxisRange]) -> bool:
    """A 0-d integer input named like an axis (keep): its value is used as a shape."""
    return spec.shape == () and spec.dtype.startswith("int") and spec.name in ranges


def _shape(spec: TensorSpec, ranges: dict[str, AxisRange], artifact: str, which: str) -> tuple[int, ...]:
    dims = []
    for axis in spec.shape:
        if isinstance(axis, int):
            dims.append(axis)
        elif axis in ranges:
            dims.append(getattr(ranges[axis], which))
        else:
            raise ArtifactError(
                f"{artifact} input {spec.name} has the dynamic axis {axis!r}, for which no TensorRT profile "
                f"range is known (known: {', '.join(sorted(ranges))}): give it a range in its family's "
                f"axis_ranges() (apet_export/models/)"
            )
    return tuple(dims)


def profiles_for(
    manifest: Manifest, artifact: str, max_batch: int = 4, max_context: int | None = None
) -> list[Profile]:
    """The optimisation profiles of one ONNX artifact of the manifest, in engine order."""
    spec: ArtifactSpec = manifest.files[artifact]
    axes = {axis for t in spec.inputs for axis in t.shape if isinstance(axis, str)}
    if DECODER_AXIS in axes:
        context = max_context or manifest.dims.get("max_context")
        if not context:
            raise ArtifactError(
                f"{artifact} is a decoder graph but the manifest has no dims.max_context: rebuild with "
                f"`apet-export build`"
            )
        phases = ("prefill", "decode", "extend")  # engine profile order: new phases go last
    elif "sequence" in axes:  # stage2.onnx: runs once per image span, on the prefill's hidden states
        context = max_context or manifest.dims["max_context"]
        phases = ("prefill",)
    else:
        context, phases = None, ("default",)
    profiles = []
    for phase in phases:
        ranges = axis_ranges(manifest, phase, max_batch, context)
        shapes, values = {}, {}
        for tensor in spec.inputs:
            if is_shape_value_input(tensor, ranges):
                values[tensor.name] = ranges[tensor.name].as_tuple()
            elif tensor.shape and any(isinstance(a, str) for a in tensor.shape):
                shapes[tensor.name] = tuple(_shape(tensor, ranges, spec.path, w) for w in ("min", "opt", "max"))
        profiles.append(Profile(phase, shapes, values))
    return profiles
