"""The runtime's embedding table is the build's embeddings.safetensors mapped from the file (runtime/embeddings.py):
the same numbers as safetensors' reader, rows copied on lookup, never the whole table read into memory."""

import mmap

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from apet_export.errors import ArtifactError
from apet_export.runtime.embeddings import embedding_table, map_safetensor


def test_mapped_table_equals_the_saved_one_and_is_not_read(llava_build):
    path = llava_build / "embeddings.safetensors"
    table, saved = embedding_table(path), load_file(str(path))["embed_tokens"]
    assert table.shape == saved.shape and table.dtype == saved.dtype
    assert np.array_equal(table, saved)
    assert isinstance(table.base, mmap.mmap) or isinstance(getattr(table.base, "base", None), mmap.mmap)
    assert not table.flags.writeable  # the build's file is never written through the map
    rows = table[[3, 0, 3]]
    assert type(rows) is np.ndarray and np.array_equal(rows, saved[[3, 0, 3]])


def test_backend_embeds_through_the_map(llava_build):
    from apet_export.manifest import load_manifest
    from apet_export.runtime.backends.onnxrt import OnnxrtBackend

    backend = OnnxrtBackend(llava_build, load_manifest(llava_build)).activate()
    saved = load_file(str(llava_build / "embeddings.safetensors"))["embed_tokens"]
    assert not backend.table.flags.owndata and not backend.table.flags.writeable
    assert np.array_equal(backend.embed(np.array([[1, 2, 5]])), saved[[[1, 2, 5]]])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_every_written_dtype_and_other_tensors_beside_it(tmp_path, dtype):
    path = tmp_path / "t.safetensors"
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "embed_tokens": np.arange(20, dtype=dtype).reshape(4, 5)}
    save_file(tensors, str(path))
    assert np.array_equal(embedding_table(path), tensors["embed_tokens"])
    assert np.array_equal(map_safetensor(path, "a"), tensors["a"])


def test_damaged_files_are_artifact_errors_naming_the_fix(tmp_path):
    path = tmp_path / "e.safetensors"
    save_file({"embed_tokens": np.ones((8, 4), np.float32), "ids": np.ones(3, np.int64)}, str(path))
    with pytest.raises(ArtifactError, match="no tensor 'missing'.*apet-export build"):
        map_safetensor(path, "missing")
    with pytest.raises(ArtifactError, match="dtype 'I64'"):
        map_safetensor(path, "ids")
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    with pytest.raises(ArtifactError, match="truncated or damaged"):
        embedding_table(path)
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        embedding_table(path)
