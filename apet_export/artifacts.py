"""Cheap integrity checks of a build's files, run before anything is loaded or printed.

A build can be damaged after it was written: a truncated copy, one graph copied over another, a deleted
model/ folder. onnxruntime and transformers report such files with long tracebacks (or, for a missing
model/, by trying the network), so every artifact is checked here first and reported as one ArtifactError
that names the file and the fix. The checks read headers only (the protobuf framing of ONNX graphs, with
the weights skipped; the safetensors JSON header), and each file is checked once per process and version.
"""

from __future__ import annotations

import json
import mmap
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
    """The file is a complete ONNX model whose graph I/O names are the manifest's (catches truncation and
    one graph copied over another). Reads the protobuf framing only: weights are skipped, not parsed, so
    a multi-GB graph costs milliseconds and no memory (onnx.load would take seconds and the file's size)."""

    def check():
        try:
            inputs, outputs, external = read_graph_io(path)
        except ValueError as error:
            raise ArtifactError(f"{path} is not a readable ONNX model ({error}): {fix}") from error
        expected = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
        if (inputs, outputs) != expected:
            raise ArtifactError(
                f"{path} is not the graph the manifest describes: its inputs are {_names(inputs)} where the "
                f"manifest lists {_names(expected[0])} (outputs {_names(outputs)} vs {_names(expected[1])}); "
                f"it is another graph: {fix}"
            )
        for location, end in external.items():  # weights stored beside the graph (graphs over 2 GB)
            data = path.parent / location
            if not data.is_file() or data.stat().st_size < end:
                raise ArtifactError(f"{data}, the weights of {path.name}, is missing or truncated: {fix}")

    _once(path, check)


# Field numbers of onnx.proto: ModelProto.graph, GraphProto.initializer / input / output.
MODEL_GRAPH, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT = 7, 5, 11, 12


def read_graph_io(path: Path) -> tuple[list[str], list[str], dict[str, int]]:
    """(input names, output names, {external data file: bytes needed}) from the protobuf wire format.
    ValueError if the file is empty, truncated or not a protobuf with a graph."""
    from onnx import TensorProto, ValueInfoProto

    if path.stat().st_size == 0:
        raise ValueError("the file is empty")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        graphs = [(start, end) for number, start, end in _fields(buffer, 0, len(buffer)) if number == MODEL_GRAPH]
        if not graphs:
            raise ValueError("no graph in it")
        inputs, outputs, external = [], [], {}
        for number, start, end in _fields(buffer, *graphs[-1]):
            try:
                if number in (GRAPH_INPUT, GRAPH_OUTPUT):
                    name = ValueInfoProto.FromString(buffer[start:end]).name
                    (inputs if number == GRAPH_INPUT else outputs).append(name)
                elif number == GRAPH_INITIALIZER and end - start < 1 << 16:  # a large one holds its data inline
                    info = {e.key: e.value for e in TensorProto.FromString(buffer[start:end]).external_data}
                    if "location" in info:
                        needed = int(info.get("offset", 0)) + int(info.get("length", 0))
                        external[info["location"]] = max(external.get(info["location"], 0), needed)
            except Exception as error:  # protobuf's DecodeError (its module differs between backends)
                raise ValueError(f"a corrupt graph entry: {error}") from error
    return inputs, outputs, external


def _fields(buffer, start: int, end: int):
    """(field number, value start, value end) of every field of the message in buffer[start:end]."""
    position = start
    while position < end:
        tag, position = _varint(buffer, position, end)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:  # varint
            value_start = position
            _, position = _varint(buffer, position, end)
        elif wire_type == 2:  # length-delimited: sub-messages, strings, bytes
            length, value_start = _varint(buffer, position, end)
            position = value_start + length
        elif wire_type in (1, 5):  # fixed 64 / 32 bit
            value_start, position = position, position + (8 if wire_type == 1 else 4)
        else:
            raise ValueError(f"not protobuf (wire type {wire_type} at byte {position})")
        if position > end:
            raise ValueError(f"truncated: a field needs {position - end} bytes more than there are")
        yield number, value_start, position


def _varint(buffer, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= end or shift > 63:
            raise ValueError("truncated, or not protobuf (a number runs past its end)")
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(where the data starts, {name: {dtype, shape, data_offsets}}) of a safetensors file: 8 bytes (little-endian
    u64) header length, the JSON header, then the data, its offsets counted from the header's end. ValueError
    when the header cannot be read."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        header = f.read(length) if 0 < length <= size - 8 else b""
    try:
        tensors = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
        for entry in tensors.values():
            entry["data_offsets"][1]
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as error:
        raise ValueError(f"corrupt header: {error}") from error
    return 8 + length, tensors


def check_safetensors(path: Path, fix: str, spec: ArtifactSpec | None = None) -> None:
    """The JSON header parses, the file is as long as the header says, and it holds the manifest's tensors."""

    def check():
        size = path.stat().st_size
        try:
            data_start, tensors = read_safetensors_header(path)
        except ValueError as error:
            raise ArtifactError(f"{path} is not a readable safetensors file (corrupt header): {fix}") from error
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        if size != data_start + end:
            raise ArtifactError(
                f"{path} is truncated or corrupt ({size} bytes, its header describes {data_start + end}): {fix}"
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
    from apet_export.checkpoint import read_config

    read_config(model)  # JSON object, or one line naming the file
    weights = sorted(model.glob("*.safetensors"))
    if not weights:
        raise ArtifactError(f"{model} has no *.safetensors weights: {fix}")
    for path in weights:
        check_safetensors(path, fix)
    return model


def load_onnx(path: Path, load_external_data: bool = True):
    """onnx.load, with onnx's refusal of external weights that have more than one hard link (its guard
    against a model reading other files through links) reported as an ArtifactError naming the fix: a build
    copied with `cp -al` or `rsync --link-dest` shares its weight files with the original."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except onnx.checker.ValidationError as error:
        if "hard link" not in str(error):
            raise
        raise ArtifactError(
            f"{path}: its external weights are a hard link to another file, and onnx refuses to read weights "
            f"through hard links: copy the build with `cp -r` (not `cp -al` or `rsync --link-dest`), or rebuild it"
        ) from error
