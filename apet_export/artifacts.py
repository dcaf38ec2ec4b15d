"""Cheap integrity checks of a build's files, run before anything is loaded or printed.

A build can be damaged after it was written: a truncated copy, one graph copied over another, a deleted
model/ folder. onnxruntime and transformers report such files with long tracebacks (or, for a missing
model/, by trying the network), so every artifact is checked here first and reported as one ArtifactError
that names the file and the fix. The checks read headers only (ONNX graphs without their external
weights, the safetensors JSON header), and each file is checked once per process and version of it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from apet_export.config import ArtifactSpec
from apet_export.errors import ArtifactError


def rebuild(directory: Path) -> str:
    return f"rebuild with `apet-export build --out {directory} --force`"


def _names(values) -> str:
    names = list(values)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
_checked: set[tuple] = set()  # (path, size, mtime_ns) of files that passed


def _once(path: Path, check) -> None:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _checked:
        check()
        _checked.add(key)


def check_onnx(path: Path, spec: ArtifactSpec, fix: str) -> None:
    """The graph parses and its input/output names are the manifest's (catches truncation and swaps)."""
    import onnx
    from google.protobuf.message import DecodeError

    def check():
        try:
            model = onnx.load(str(path), load_external_data=False)
        except (DecodeError, ValueError, OSError) as error:
            raise ArtifactError(f"{path} is not a readable ONNX model (truncated or corrupt: {error}): {fix}") from error
        found = [v.name for v in model.graph.input], [v.name for v in model.graph.output]
        expected = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
        if found != expected:
            raise ArtifactError(
                f"{path} is not the graph the manifest describes: its inputs are {_names(found[0])} where the "
                f"manifest lists {_names(expected[0])} (outputs {_names(found[1])} vs {_names(expected[1])}); "
                f"it is truncated or another graph: {fix}"
            )
        _check_external_data(path, model, fix)

    _once(path, check)


def _check_external_data(path: Path, model, fix: str) -> None:
    """Weights stored beside the graph (graphs over 2 GB) exist and are long enough."""
    needed: dict[str, int] = {}
    for tensor in model.graph.initializer:
        info = {entry.key: entry.value for entry in tensor.external_data}
        if "location" in info:
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
            needed[info["location"]] = max(needed.get(info["location"], 0), end)
    for location, end in needed.items():
        data = path.parent / location
        if not data.is_file() or data.stat().st_size < end:
            raise ArtifactError(f"{data}, the weights of {path.name}, is missing or truncated: {fix}")


def check_safetensors(path: Path, fix: str, spec: ArtifactSpec | None = None) -> None:
    """The JSON header parses, the file is as long as the header says, and it holds the manifest's tensors."""

    def check():
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            header = f.read(length) if 0 < length <= size - 8 else b""
        try:
            tensors = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
            end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as error:
            raise ArtifactError(f"{path} is not a readable safetensors file (corrupt header): {fix}") from error
        if size != 8 + length + end:
            raise ArtifactError(
                f"{path} is truncated or corrupt ({size} bytes, its header describes {8 + length + end}): {fix}"
            )
        for tensor in spec.outputs if spec else ():
            found = tensors.get(tensor.name, {}).get("shape")
            if found != list(tensor.shape):
                raise ArtifactError(
                    f"{path} does not hold {tensor.name} of shape {list(tensor.shape)} (found {found}): "
                    f"it is another file; {fix}"
                )

    _once(path, check)


def check_artifact(directory: Path, path: Path, spec: ArtifactSpec) -> None:
    """path: an artifact of the build in `directory`, described by `spec` in its manifest."""
    if path.suffix == ".onnx":
        check_onnx(path, spec, rebuild(directory))
    elif path.suffix == ".safetensors":
        check_safetensors(path, rebuild(directory), spec)


def check_model_dir(directory: Path) -> Path:
    """DIR/model: the checkpoint (config + safetensors weights) and the processor the runtime loads."""
    model, fix = Path(directory) / "model", rebuild(directory)
    if not model.is_dir():
        raise ArtifactError(
            f"{model} is missing (the build's checkpoint and processor, needed to preprocess images and "
            f"tokenise prompts): {fix}"
        )
    for required in ("config.json", "tokenizer_config.json"):
        if not (model / required).is_file():
            raise ArtifactError(f"{model / required} is missing: {fix}")
    weights = sorted(model.glob("*.safetensors"))
    if not weights:
        raise ArtifactError(f"{model} has no *.safetensors weights: {fix}")
    for path in weights:
        check_safetensors(path, fix)
    return model
