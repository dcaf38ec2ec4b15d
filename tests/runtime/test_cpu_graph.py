"""llm.cpu.onnx (export/cpu_graph.py) and its IO-binding runner: the KV cache written in place gives the same
greedy tokens and logits as llm.onnx with the cache fed back through Concat."""

from collections import Counter

import numpy as np
import onnx
import pytest
from safetensors.numpy import load_file

from apet_export.errors import ExportError
from apet_export.export.cpu_graph import rewrite_cache_in_place
from apet_export.export.tensorrt import onnx_artifacts
from apet_export.manifest import load_manifest
from apet_export.runtime.backends.onnxrt import OnnxrtInPlaceLlmRunner, OnnxrtLlmRunner, llm_runner
from apet_export.runtime.cache import PreallocatedKVCache


def greedy(build, cpu_form: bool, ids: np.ndarray, new_tokens: int):
    """Greedy tokens, first logits [V], the cache's capacity after each step (PreallocatedKVCache; None for
    llm.onnx's) and the final cache, through the runtime's runner."""
    manifest = load_manifest(build)
    table = load_file(str(build / "embeddings.safetensors"))["embed_tokens"]
    runner = llm_runner(build, manifest, cpu_form=cpu_form)
    runner.activate()
    try:
        length = len(ids)
        logits, cache = runner.infer(
            {"inputs_embeds": table[ids][None], "attention_mask": np.ones((1, length), np.int64),
             "position_ids": np.arange(length, dtype=np.int64)[None]}, check_inputs=False,
            cache=runner.new_cache(manifest, 1))
        first, tokens, capacities = logits[0].copy(), [int(np.argmax(logits[0]))], [getattr(cache, "capacity", None)]
        while len(tokens) < new_tokens:
            position = length + len(tokens) - 1
            logits, cache = runner.infer(
                {"inputs_embeds": table[[tokens[-1]]][None], "attention_mask": np.ones((1, position + 1), np.int64),
                 "position_ids": np.array([[position]], np.int64)}, check_inputs=False, cache=cache)
            tokens.append(int(np.argmax(logits[0])))
            capacities.append(getattr(cache, "capacity", None))
        return type(runner), tokens, first, capacities, cache
    finally:
        runner.deactivate()


def test_cpu_form_is_built_and_run_by_default(any_build):
    manifest = load_manifest(any_build)
    assert manifest.files["llm_cpu"].path == "llm.cpu.onnx"
    model = onnx.load(str(manifest.file(any_build, "llm_cpu")), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["TensorScatter"] == 2 * manifest.dims["num_layers"]
    consumers = {name for node in model.graph.node if node.op_type == "Concat" for name in node.input}
    assert not any(name.startswith("past_") for name in consumers)
    assert type(llm_runner(any_build, manifest)) is OnnxrtInPlaceLlmRunner
    assert type(llm_runner(any_build, manifest, cpu_form=False)) is OnnxrtLlmRunner
    assert "llm_cpu" not in onnx_artifacts(any_build, manifest, None)  # TensorRT builds llm.onnx only


def test_cache_in_place_gives_the_same_greedy_tokens(siglip_qwen2_build):
    # 30 prompt tokens + 40 steps: the buffer grows at 32 and 64 (CHUNK), so growth copies are covered too
    ids = np.random.default_rng(0).integers(3, 500, 30)
    _, expected, expected_logits, _, expected_cache = greedy(siglip_qwen2_build, False, ids, 40)
    runner, tokens, logits, capacities, cache = greedy(siglip_qwen2_build, True, ids, 40)
    assert runner is OnnxrtInPlaceLlmRunner
    assert tokens == expected
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5, rtol=0)
    assert capacities[0] == 32 and capacities[-1] == 96 and all(c % PreallocatedKVCache.CHUNK == 0 for c in capacities)
    assert cache.length == 30 + 39
    # the graph wrote into the runtime's own buffers: the entries so far are llm.onnx's present_* values
    for written, concatenated in zip(cache.buffers, expected_cache.tensors, strict=True):
        np.testing.assert_allclose(written[:, :, : cache.length], concatenated, atol=1e-5, rtol=0)
        assert not written[:, :, cache.length :].any()


def test_preallocated_cache_feeds_llm_onnx_inputs(siglip_qwen2_build):
    manifest = load_manifest(siglip_qwen2_build)
    cache = PreallocatedKVCache.empty(manifest, 1)
    feed = cache.feed()
    assert len(feed) == 2 * manifest.dims["num_layers"]
    assert feed["past_key_0"].shape == (1, manifest.dims["num_kv_heads"], 0, manifest.dims["head_dim"])


def test_rewrite_refuses_a_graph_without_the_cache_concat(siglip_qwen2_build):
    model = onnx.load(str(siglip_qwen2_build / "llm.onnx"), load_external_data=False)
    rewrite_cache_in_place(model)  # once: fine
    with pytest.raises(ExportError, match="not one Concat on the sequence axis"):
        rewrite_cache_in_place(model)  # twice: the cache already feeds TensorScatter


TORCH_BLOCKED = """
import sys

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, BlockTorch())
import numpy as np
from safetensors.numpy import load_file
from apet_export.manifest import load_manifest
from apet_export.runtime.backends.onnxrt import llm_runner

build = sys.argv[1]
manifest = load_manifest(build)
table = load_file(build + "/embeddings.safetensors")["embed_tokens"]
runner = llm_runner(build, manifest)
runner.activate()
logits, cache = runner.infer({"inputs_embeds": table[[[5, 6, 7]]], "attention_mask": np.ones((1, 3), np.int64),
                              "position_ids": np.arange(3)[None]}, check_inputs=False, cache=runner.new_cache(manifest, 1))
print(type(runner).__name__, logits.shape, cache.length)
"""


def test_the_llm_runs_with_torch_blocked(siglip_qwen2_build):
    # the onnxruntime LLM path (session, IO binding, cache) imports neither torch nor transformers
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", TORCH_BLOCKED, str(siglip_qwen2_build)], capture_output=True,
                            text=True, env=dict(os.environ), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    vocab = load_manifest(siglip_qwen2_build).dims["vocab_size"]
    assert result.stdout.split("\n")[-2] == f"OnnxrtInPlaceLlmRunner (1, {vocab}) 3"
