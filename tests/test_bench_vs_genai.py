"""The pure pieces of scripts/bench_vs_genai.py: prompt ids, the checkpoint extraction's naming, the table's
ratios and agreement. (The benchmark itself builds two 0.5B models: run it by hand, see its docstring.)"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_vs_genai.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_genai", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_prompt_ids_are_reproducible_and_avoid_special_tokens(bench):
    ids = bench.prompt_ids(596, 300, seed=596, exclude={0, 1, 2, 299})
    assert ids.shape == (596,) and ids.dtype == np.int64
    assert ids.min() >= 3 and ids.max() <= 298
    assert np.array_equal(ids, bench.prompt_ids(596, 300, seed=596, exclude={0, 1, 2, 299}))
    assert not np.array_equal(ids[:84], bench.prompt_ids(84, 300, seed=84, exclude={0, 1, 2, 299}))
    with pytest.raises(ValueError, match="no token id"):
        bench.prompt_ids(4, 2, seed=0, exclude={0, 1})


def test_language_model_tensor_names(bench):
    assert bench.causal_lm_tensor_name("model.language_model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert bench.causal_lm_tensor_name("language_model.model.norm.weight") == "model.norm.weight"
    assert bench.causal_lm_tensor_name("model.language_model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert bench.causal_lm_tensor_name("lm_head.weight") == "lm_head.weight"
    assert bench.causal_lm_tensor_name("model.vision_tower.vision_model.embeddings.patch_embedding.weight") is None
    assert bench.causal_lm_tensor_name("model.multi_modal_projector.linear_1.weight") is None


def test_causal_lm_config(bench):
    config = bench.causal_lm_config({"model_type": "llava", "text_config": {"model_type": "qwen2", "hidden_size": 896}})
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["hidden_size"] == 896


def test_token_agreement(bench):
    assert bench.token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert bench.token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert bench.token_agreement([1, 2], [1, 2, 3, 4]) == 0.5


def test_summary_ratios_against_genai(bench):
    logits = np.zeros(4, np.float32)

    def request(engine, length, prefill, decode, tokens, shift=0.0):
        return bench.Request(engine, length, prefill, decode, tokens, logits + shift)

    requests = [
        request(bench.GENAI, 84, 100.0, 20.0, [1, 2]), request(bench.OURS_CPU, 84, 90.0, 24.0, [1, 2], 1e-5),
        request(bench.GENAI, 84, 120.0, 20.0, [1, 2]), request(bench.OURS_CPU, 84, 80.0, 22.0, [1, 3], 2e-5),
        request(bench.GENAI, 84, 110.0, 20.0, [1, 2]), request(bench.OURS_CPU, 84, 100.0, 20.0, [1, 2]),
    ]
    rows = {r.engine: r for r in bench.summarise("fp32", requests, {bench.GENAI: 1000.0, bench.OURS_CPU: 900.0})}
    ours = rows[bench.OURS_CPU]
    assert ours.prefill_ms == 90.0 and ours.decode_tokens_per_s == 22.0  # medians
    assert ours.prefill_ratio == pytest.approx(90.0 / 110.0)
    assert ours.decode_ratio == pytest.approx(22.0 / 20.0)
    assert ours.rss_ratio == pytest.approx(0.9)
    assert ours.tokens_agree == 0.5  # the worst request
    assert ours.logits_max_diff == pytest.approx(2e-5)
    assert rows[bench.GENAI].decode_ratio == 1.0


def test_summary_of_a_floor_engine_has_its_speed_ratios_only(bench):
    logits = np.zeros(4, np.float32)
    floor = bench.GENAI + bench.FLOOR
    requests = [bench.Request(bench.GENAI, 84, 100.0, 20.0, [1, 2], logits),
                bench.Request(floor, 84, 80.0, 25.0, [-1, -1], np.full(1, np.nan, np.float32))]
    rows = {r.engine: r for r in bench.summarise("fp32", requests, {bench.GENAI: 1000.0, floor: 900.0})}
    assert rows[floor].decode_ratio == pytest.approx(1.25) and rows[floor].prefill_ratio == pytest.approx(0.8)
    assert np.isnan(rows[floor].tokens_agree) and np.isnan(rows[floor].logits_max_diff)


def test_weight_matmuls_graph_keeps_only_the_weight_products(bench, tmp_path):
    """The floor graph: every MatMul/Gemm with a constant weight, fed an input of its width, same weights
    (external data referenced where it lies); products of two activations and all other nodes are dropped."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    up, down, head = (rng.standard_normal(s).astype(np.float32) for s in ((8, 16), (16, 8), (5, 8)))
    nodes = [helper.make_node("MatMul", ["x", "up"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "down"], ["d"]), helper.make_node("MatMul", ["d", "dT"], ["self"]),
             helper.make_node("Transpose", ["d"], ["dT"]),
             helper.make_node("Gemm", ["d", "head"], ["logits"], transB=1)]
    graph = helper.make_graph(
        [nodes[i] for i in (0, 1, 2, 4, 3, 5)], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("self", "logits")],
        [numpy_helper.from_array(w, n) for w, n in ((up, "up"), (down, "down"), (head, "head"))])
    model = tmp_path / "llm.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(model),
                    save_as_external_data=True, location="llm.onnx.data", size_threshold=0)

    floor = bench.weight_matmuls_graph(model)

    assert floor == tmp_path / "llm.matmuls.onnx"
    loaded = onnx.load(str(floor), load_external_data=False)
    assert [n.op_type for n in loaded.graph.node] == ["MatMul", "MatMul", "Gemm"]
    assert all(t.data_location == TensorProto.EXTERNAL for t in loaded.graph.initializer)  # not copied
    session = ort.InferenceSession(str(floor), providers=["CPUExecutionProvider"])
    assert {i.name: i.shape[1] for i in session.get_inputs()} == {"rows_8": 8, "rows_16": 16}
    rows = {"rows_8": rng.standard_normal((1, 8)).astype(np.float32),
            "rows_16": rng.standard_normal((1, 16)).astype(np.float32)}
    products = session.run(None, rows)
    expected = [rows["rows_8"] @ up, rows["rows_16"] @ down, rows["rows_8"] @ head.T]
    for got, want in zip(products, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
