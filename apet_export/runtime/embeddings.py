"""The build's token embedding table (embeddings.safetensors: embed_tokens [V, H]) mapped from the file.

A step embeds a handful of rows, so the table is memory-mapped read-only rather than read: only the pages of
the rows looked up become resident. Reading it whole (safetensors' readers copy every tensor they return)
held V x H floats for the life of a runtime: Qwen2's 151936 x 896 fp32 is 519 MiB."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from apet_export.artifacts import read_safetensors_header
from apet_export.errors import ArtifactError

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16}  # what builds write (export/llm.py)
FIX = "rebuild it with `apet-export build`"


def map_safetensor(path: str | Path, name: str) -> np.ndarray:
    """The tensor `name` of the safetensors file `path`: a read-only array of its shape over the file's pages
    (a plain ndarray view of an np.memmap, which keeps the map open; indexing it gives plain arrays)."""
    path = Path(path)
    try:
        data_start, tensors = read_safetensors_header(path)
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{path} is not a readable safetensors file ({error}): {FIX}") from error
    entry = tensors.get(name)
    if not isinstance(entry, dict):
        raise ArtifactError(f"{path} has no tensor {name!r}: {FIX}")
    dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise ArtifactError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, not F32 or F16: {FIX}")
    shape = tuple(int(d) for d in entry["shape"])
    begin, end = (int(o) for o in entry["data_offsets"])
    size = path.stat().st_size
    if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize or data_start + end > size:
        raise ArtifactError(
            f"{path}: tensor {name!r} {list(shape)} does not fit its bytes [{begin}, {end}) of a {size}-byte file: "
            f"the file is truncated or damaged; {FIX}"
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape).view(np.ndarray)


def embedding_table(path: str | Path) -> np.ndarray:
    """embed_tokens [V, H] of a build's embeddings.safetensors, memory-mapped: `table[ids]` copies the rows."""
    return map_safetensor(path, "embed_tokens")
