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


def greedy(build, cpu_form: bool, ids: np.ndarray, new_tokens: int, prefill_chunk: int | None = None):
    """Greedy tokens, first logits [V], the cache's capacity after each step (PreallocatedKVCache; None for
    llm.onnx's) and the final cache, through the runtime's runner (prefill_chunk: the in-place runner's
    prompt chunk, when given)."""
    manifest = load_manifest(build)
    table = load_file(str(build / "embeddings.safetensors"))["embed_tokens"]
    runner = llm_runner(build, manifest, cpu_form=cpu_form)
    if prefill_chunk is not None:
        runner.PREFILL_CHUNK = prefill_chunk
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
    # every layer's attention one GroupQueryAttention on the cache buffer, but the last one's (its attention runs
    # for the last query only): that one writes its cache with TensorScatter
    assert ops["GroupQueryAttention"] == manifest.dims["num_layers"] - 1
    assert ops["TensorScatter"] == 2 and ops["Attention"] == 1
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


@pytest.mark.parametrize("chunk", [7, 30])
def test_long_prompts_prefill_in_chunks_with_the_same_result(siglip_qwen2_build, chunk):
    # 30 prompt tokens in chunks of 7 (5 runs, the last one 2 tokens) or in one run: the tokens and logits of
    # llm.onnx, and the cache holds every prompt entry
    ids = np.random.default_rng(2).integers(3, 500, 30)
    _, expected, expected_logits, _, expected_cache = greedy(siglip_qwen2_build, False, ids, 6)
    _, tokens, logits, capacities, cache = greedy(siglip_qwen2_build, True, ids, 6, prefill_chunk=chunk)
    assert tokens == expected
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5, rtol=0)
    assert capacities[0] == 32 and cache.length == 30 + 5
    for written, concatenated in zip(cache.buffers, expected_cache.tensors, strict=True):
        np.testing.assert_allclose(written[:, :, : cache.length], concatenated, atol=1e-5, rtol=0)


def test_prefill_grows_the_cache_chunk_by_chunk(siglip_qwen2_build):
    # onnxruntime's Attention scores every key of the buffer: each chunk of a long prompt runs on a buffer sized
    # for the entries up to its end (rounded up to CHUNK), not for the whole prompt
    manifest = load_manifest(siglip_qwen2_build)
    runner = llm_runner(siglip_qwen2_build, manifest)
    runner.PREFILL_CHUNK = 16
    runner.activate()
    try:
        cache, seen = runner.new_cache(manifest, 1), []
        run = runner.session.run_with_iobinding
        runner.session.run_with_iobinding = lambda binding: (seen.append((cache.length, cache.capacity)), run(binding))
        table = load_file(str(siglip_qwen2_build / "embeddings.safetensors"))["embed_tokens"]
        ids = np.random.default_rng(3).integers(3, 500, 70)
        runner.infer({"inputs_embeds": table[ids][None], "attention_mask": np.ones((1, 70), np.int64),
                      "position_ids": np.arange(70, dtype=np.int64)[None]}, check_inputs=False, cache=cache)
    finally:
        runner.deactivate()
    chunk = PreallocatedKVCache.CHUNK
    assert seen == [(length, -(-min(length + 16, 70) // chunk) * chunk) for length in range(0, 70, 16)]
    assert seen[0][1] == 32 and cache.length == 70


def test_cpu_form_uses_onnxruntime_fused_ops(siglip_qwen2_build):
    # residual Add + RMSNorm fused (all but the first layer's input norm and the final norm), q/k/v and
    # gate/up each one MatMul over packed weights, no all-zero bias adds left (the greedy tokens and logits
    # of this graph are checked against llm.onnx above)
    manifest = load_manifest(siglip_qwen2_build)
    layers = manifest.dims["num_layers"]
    ops = Counter(n.op_type for n in onnx.load(str(siglip_qwen2_build / "llm.cpu.onnx"), load_external_data=False).graph.node)
    source = Counter(n.op_type for n in onnx.load(str(siglip_qwen2_build / "llm.onnx"), load_external_data=False).graph.node)
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers - 1
    assert ops["RMSNormalization"] == 2  # the first input norm and the final norm
    assert ops["Split"] == 2 * layers
    # GroupQueryAttention reads and writes [B, S, H·Dh]: no Transpose or Reshape to heads and back left but the
    # last layer's, whose packed q|k|v goes to [B, H, S, Dh] once (Reshape, Transpose, Split on heads)
    assert ops["GroupQueryAttention"] == layers - 1
    assert ops["Transpose"] == source["Transpose"] - 4 * layers + 2
    assert ops["Reshape"] == source["Reshape"] - 4 * layers + 2
    assert ops["MatMul"] == source["MatMul"] - 3 * layers
    # gone: the residual adds fused into a norm, and the q/k/v biases (all zero in a freshly initialised Qwen2)
    assert ops["Add"] == source["Add"] - (2 * layers - 1) - 3 * layers


def int4_build(build, out):
    """The build's LLM through the weight-only INT4 quantiser, with its CPU form, as calibrate --llm-bits 4
    writes it."""
    from apet_export.calibration.quantize import quantize_weights
    from apet_export.export.cpu_graph import add_cpu_graph

    manifest = load_manifest(build)
    out.mkdir()
    quantize_weights(build / "llm.onnx", out / "llm.onnx", bits=4)
    (out / "embeddings.safetensors").write_bytes((build / "embeddings.safetensors").read_bytes())
    manifest.files = {name: manifest.files[name] for name in ("llm", "embeddings")}
    add_cpu_graph(out, manifest)
    manifest.write(out)
    return out


def test_int4_cpu_form_is_matmulnbits_with_the_same_logits(siglip_qwen2_build, tmp_path):
    # DequantizeLinear(int4) -> MatMul written as the MatMulNBits onnxruntime fuses the pair into at load (the
    # same weight products: only the attention kernel differs from llm.onnx's), and no int4 initializer left for
    # the session to hold twice
    build = int4_build(siglip_qwen2_build, tmp_path / "int4")
    layers = load_manifest(build).dims["num_layers"]
    model = onnx.load(str(build / "llm.cpu.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["DequantizeLinear"] == 0 and ops["MatMulNBits"] == 4 * layers + 1  # qkv, o, gate|up, down; LM head
    assert not any(t.data_type == onnx.TensorProto.INT4 for t in model.graph.initializer)
    assert ops["SkipSimplifiedLayerNormalization"] == 0  # quantised activations: the norms stay as they are
    ids = np.random.default_rng(1).integers(3, 500, 20)
    _, expected, expected_logits, _, _ = greedy(build, False, ids, 12)
    runner, tokens, logits, _, _ = greedy(build, True, ids, 12)
    assert runner is OnnxrtInPlaceLlmRunner
    assert tokens == expected
    print(f"max |logits - llm.onnx's| = {np.abs(logits - expected_logits).max():.2e}")
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5, rtol=0)


def test_a_large_lm_head_is_split_into_vocabulary_slices_with_the_same_logits(siglip_qwen2_build, tmp_path):
    # Builds split an LM head over 64 MiB (Qwen2's vocabulary: 519 MiB fp32, onnxruntime's peak at load is the
    # steady size plus the largest weight); the tiny head (512 x 64) is split here at a third of its bytes
    from apet_export.export.cpu_fusions import split_lm_head

    source = siglip_qwen2_build / "llm.cpu.onnx"
    model = onnx.load(str(source))
    assert split_lm_head(model) == 0  # under 64 MiB: left as it is
    head = next(n for n in model.graph.node if "logits" in n.output)
    weight = next(t for t in model.graph.initializer if t.name == head.input[1])
    assert split_lm_head(model, part_bytes=len(weight.raw_data) // 3 + 1) == 3
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops[head.op_type] == Counter(n.op_type for n in onnx.load(str(source)).graph.node)[head.op_type] + 2
    assert not any(t.name == weight.name for t in model.graph.initializer)
    split = tmp_path / "llm.cpu.onnx"
    onnx.save_model(model, str(split))
    manifest = load_manifest(siglip_qwen2_build)
    table = load_file(str(siglip_qwen2_build / "embeddings.safetensors"))["embed_tokens"]
    ids = np.random.default_rng(4).integers(3, 500, 9)
    logits = []
    for path in (source, split):
        runner = OnnxrtInPlaceLlmRunner(path)
        runner.activate()
        try:
            output, _ = runner.infer({"inputs_embeds": table[ids][None], "attention_mask": np.ones((1, 9), np.int64),
                                      "position_ids": np.arange(9, dtype=np.int64)[None]}, check_inputs=False,
                                     cache=runner.new_cache(manifest, 1))
            logits.append(output)
        finally:
            runner.deactivate()
    np.testing.assert_array_equal(logits[0], logits[1])


def left_padded_batch(build, cpu_form: bool, steps: int = 4):
    """A batch of two prompts, row 0 left-padded by 3 (13 and 16 tokens), then `steps` greedy steps per row,
    through the runtime's runner: logits [steps + 1, B, V]. Positions count each row's real tokens from 0 (the
    padding sits at 0 too); M-RoPE families get the same position on their three rows."""
    manifest = load_manifest(build)
    table = load_file(str(build / "embeddings.safetensors"))["embed_tokens"]
    ids = np.random.default_rng(4).integers(3, 500, (2, 16))
    mask = np.ones((2, 16), np.int64)
    mask[0, :3] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # [B, S]
    three_rows = len(manifest.files["llm"].inputs[2].shape) == 3  # position_ids [3, B, S]
    runner = llm_runner(build, manifest, cpu_form=cpu_form)
    runner.activate()
    try:
        feed_positions = np.stack([positions] * 3) if three_rows else positions
        logits, cache = runner.infer({"inputs_embeds": table[ids], "attention_mask": mask,
                                      "position_ids": feed_positions}, check_inputs=False,
                                     cache=runner.new_cache(manifest, 2))
        every = [logits.copy()]
        for _ in range(steps):
            tokens = logits.argmax(axis=1)  # [B]
            positions = positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
            feed_positions = np.stack([positions] * 3) if three_rows else positions
            logits, cache = runner.infer({"inputs_embeds": table[tokens][:, None], "attention_mask": mask,
                                          "position_ids": feed_positions}, check_inputs=False, cache=cache)
            every.append(logits.copy())
        return np.stack(every)
    finally:
        runner.deactivate()


@pytest.mark.parametrize("build_name", ["siglip_qwen2_build", "qwen_build"])
def test_a_left_padded_batch_gives_llm_onnx_logits(build_name, request):
    # GroupQueryAttention masks the padding through the attention mask (attention_bias) and takes the rotation
    # from position_ids (the RotaryEmbedding nodes before it; Qwen2.5-VL: M-RoPE's three rows): every row,
    # prompt and steps, as llm.onnx
    build = request.getfixturevalue(build_name)
    model = onnx.load(str(build / "llm.cpu.onnx"), load_external_data=False)
    layers = load_manifest(build).dims["num_layers"]
    assert sum(n.op_type == "GroupQueryAttention" for n in model.graph.node) == layers - 1
    expected = left_padded_batch(build, cpu_form=False)
    logits = left_padded_batch(build, cpu_form=True)
    print(f"max |logits - llm.onnx's| = {np.abs(logits - expected).max():.2e}")
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    assert (logits.argmax(-1) == expected.argmax(-1)).all()


def test_a_batch_continues_its_cache_one_token_at_a_time(siglip_qwen2_build):
    # onnxruntime's GroupQueryAttention takes S > 1 after cached entries at batch 1 only: refused up front, with
    # the way out, instead of the kernel's error
    from apet_export.errors import InvalidInputError

    manifest = load_manifest(siglip_qwen2_build)
    table = load_file(str(siglip_qwen2_build / "embeddings.safetensors"))["embed_tokens"]
    runner = llm_runner(siglip_qwen2_build, manifest)
    runner.activate()
    try:
        ids = np.random.default_rng(5).integers(3, 500, (2, 6))
        _, cache = runner.infer({"inputs_embeds": table[ids], "attention_mask": np.ones((2, 6), np.int64),
                                 "position_ids": np.tile(np.arange(6), (2, 1))}, check_inputs=False,
                                cache=runner.new_cache(manifest, 2))
        with pytest.raises(InvalidInputError, match="one token per step"):
            runner.infer({"inputs_embeds": table[ids[:, :2]], "attention_mask": np.ones((2, 8), np.int64),
                          "position_ids": np.tile(np.arange(6, 8), (2, 1))}, check_inputs=False, cache=cache)
        assert cache.length == 6  # nothing was written
    finally:
        runner.deactivate()


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
