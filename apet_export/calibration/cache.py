"""The calibration cache: tensor ranges of one graph, keyed by what they depend on.

    key = sha256(graph bytes (+ external data), data fingerprint (images + prompts), method, budget, batch)
    DIR/calibration-cache/<graph>-<key[:16]>.json      (onnxruntime's TensorsData JSON, written atomically)

Same data and same graph give the same key, so a second `calibrate` (e.g. int8 after fp8, or another
--out) reads the ranges instead of running the graph over every sample again. The cache lives in the
source build, beside the graph it describes; deleting the build deletes its cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from apet_export.outputs import current_umask

CACHE_DIR_NAME = "calibration-cache"


def file_sha256(path: Path) -> str:
    """sha256 of an ONNX file and its external-data file (graph.onnx.data) when there is one."""
    digest = hashlib.sha256()
    for part in (Path(path), Path(f"{path}.data")):
        if part.is_file():
            with part.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def cache_key(graph_sha256: str, data_fingerprint: str, settings: dict) -> str:
    """The key of one graph's ranges: graph hash + data hash + every setting that changes the ranges."""
    payload = json.dumps({"graph": graph_sha256, "data": data_fingerprint, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_path(cache_dir: Path, graph: str, key: str) -> Path:
    return Path(cache_dir) / f"{graph}-{key[:16]}.json"


def load_ranges(path: Path):
    """The cached TensorsData, or None when there is no cache entry."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    return load_tensors_data(path) if Path(path).is_file() else None


def save_ranges(ranges, path: Path) -> None:
    """Write atomically (onnxruntime writes a temporary file and renames it), with the permissions the umask
    gives new files: the temporary file is private (0600), and the cache lives in the build, an ordinary folder."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    save_tensors_data(ranges, path)
    os.chmod(path, 0o666 & ~current_umask())
