"""Two-stage builds (--stage2-layer K): the split graphs, their manifest contract, TensorRT parsing, errors."""

import onnx
import pytest

from apet_export.errors import InvalidInputError
from apet_export.export.build import BuildOptions, build
from apet_export.manifest import load_manifest
from tests.export.test_build import graph_io
from tests.tensorrt_parse import network_inputs, network_outputs, tensorrt_network


def test_split_graphs_follow_the_manifest(any_two_stage_build):
    manifest = load_manifest(any_two_stage_build)
    assert set(manifest.files) == {"vision", "vision_plugin", "llm_a", "stage2", "llm_b", "embeddings"}
    assert manifest.stage2["layer"] == 2 and manifest.dims["num_layers"] == 4
    assert manifest.budget == {"default": 64, "min": 21, "max": manifest.dims["num_image_tokens"]}
    for name in ("llm_a", "stage2", "llm_b"):
        spec = manifest.files[name]
        inputs, outputs = graph_io(manifest.file(any_two_stage_build, name))
        assert inputs == [(t.name, t.shape) for t in spec.inputs], name
        assert outputs == [(t.name, t.shape) for t in spec.outputs], name
    a, b = manifest.files["llm_a"], manifest.files["llm_b"]
    # each part owns its layers' KV, named with the global layer index
    assert [t.name for t in a.inputs[3:]] == ["past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    assert [t.name for t in b.outputs[1:]] == ["present_key_2", "present_value_2", "present_key_3", "present_value_3"]
    assert [t.name for t in a.outputs[:1]] == ["hidden_states"] and a.outputs[0].shape[:2] == ("batch", "sequence")
    assert [t.name for t in b.inputs[:3]] == ["hidden_states", "attention_mask", "position_ids"]
    assert b.outputs[0].name == "logits" and b.inputs[3].shape[2] == "past_sequence"
    stage2 = manifest.files["stage2"]
    assert [t.name for t in stage2.inputs] == ["hidden_states", "image_start", "image_length", "keep"]
    assert stage2.outputs[0].shape[:2] == ("batch", "compressed_sequence")


def test_each_part_has_fused_attention_for_its_layers_only(llava_two_stage_build):
    for name, layers in (("llm_a.onnx", 2), ("llm_b.onnx", 2)):
        model = onnx.load(str(llava_two_stage_build / name))
        attention = [n for n in model.graph.node if n.op_type == "Attention"]
        assert len(attention) == layers, name
        assert all(len(n.output) == 1 and len(n.input) <= 4 for n in attention)
        assert all(n.name.startswith(f"/{name[:-5]}/") for n in model.graph.node)
    stage2 = onnx.load(str(llava_two_stage_build / "stage2.onnx"))
    ops = {n.op_type for n in stage2.graph.node}
    assert "TopK" in ops and "Attention" not in ops  # ApET only, no decoder layer
    assert not (llava_two_stage_build / "llm.onnx").exists()


@pytest.mark.parametrize("name", ["llm_a", "llm_b", "stage2"])
def test_parts_parse_with_tensorrt(llava_two_stage_build, name):
    network, _parser = tensorrt_network(llava_two_stage_build / f"{name}.onnx")  # the product's parse
    spec = load_manifest(llava_two_stage_build).files[name]
    assert list(network_inputs(network)) == [t.name for t in spec.inputs]
    assert network_outputs(network) == [t.name for t in spec.outputs]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"stage2_layer": 0}, r"outside \[1, 3\]"),
        ({"stage2_layer": 4}, r"outside \[1, 3\]"),
        ({"stage2_layer": 2, "llm": False}, "needs --method apet and the LLM"),
        ({"stage2_layer": 2, "method": "visionzip"}, "needs --method apet"),
        ({"stage2_layer": 2, "budget": 20}, "budget keep=20"),  # the stage-2 share 10 would not exceed M
    ],
)
def test_bad_stage2_options(tmp_path, options, match):
    with pytest.raises(InvalidInputError, match=match):
        build(BuildOptions(model="tiny-llava", out=tmp_path / "out", **options))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("model", "reason"),
    [("tiny-qwen2.5-vl", "LLM stage commented out"), ("tiny-video-llava", "no LLM stage")],
)
def test_stage2_refused_where_the_released_code_has_one_stage(tmp_path, model, reason):
    """Qwen2.5-VL's released LLM stage is commented out; Video-LLaVA's released code compresses each frame once.
    Refused with that reason before anything is exported."""
    with pytest.raises(InvalidInputError, match=reason):
        build(BuildOptions(model=model, out=tmp_path / "out", stage2_layer=2))
    assert not (tmp_path / "out").exists()


def test_variant_of_another_family_is_refused(tmp_path):
    with pytest.raises(InvalidInputError, match="choose llava .* or uniform"):
        build(BuildOptions(model="tiny-llava", out=tmp_path / "out", apet_variant="qwen2_5_vl"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # two decoder exports of its own (~20 s); the layer-range exporter runs by default in the two-stage build
def test_decoder_ranges_chain_to_the_whole_decoder_with_mrope(qwen_build, tmp_path):
    """One exporter for any layer range: [0, 2) then [2, 4) of the Qwen2.5-VL text model (M-RoPE position_ids
    [3, B, S]) chained on onnxruntime give llm.onnx's logits and KV; the parts' KV keeps global layer names."""
    import numpy as np

    from apet_export.export.llm import export_decoder_range
    from apet_export.models.registry import get_family
    from apet_export.runtime.sessions import onnxruntime_session

    manifest = load_manifest(qwen_build)
    family = get_family(manifest.family)
    model, _ = family.load(manifest.model_dir(qwen_build))
    for name, layers in (("llm_a", range(0, 2)), ("llm_b", range(2, 4))):
        export_decoder_range(model, family, layers, tmp_path, name, manifest, "fp32")
    assert manifest.files["llm_a"].inputs[2].shape == (3, "batch", "sequence")
    assert [t.name for t in manifest.files["llm_b"].outputs] == ["logits", "present_key_2", "present_value_2",
                                                                 "present_key_3", "present_value_3"]
    rng = np.random.default_rng(0)
    length, hidden, kv = 7, manifest.dims["text_hidden"], (1, manifest.dims["num_kv_heads"], 0, manifest.dims["head_dim"])
    embeds = rng.standard_normal((1, length, hidden)).astype(np.float32)
    positions = np.stack([np.arange(length), np.arange(length) // 2, np.arange(length) % 3])[:, None]  # [3, 1, S]
    common = {"attention_mask": np.ones((1, length), np.int64), "position_ids": positions.astype(np.int64)}
    empty = lambda layers: {f"past_{k}_{i}": np.zeros(kv, np.float32) for i in layers for k in ("key", "value")}  # noqa: E731
    whole = onnxruntime_session(manifest.file(qwen_build, "llm")).run(None, {"inputs_embeds": embeds, **common, **empty(range(4))})
    a = onnxruntime_session(tmp_path / "llm_a.onnx").run(None, {"inputs_embeds": embeds, **common, **empty(range(2))})
    b = onnxruntime_session(tmp_path / "llm_b.onnx").run(None, {"hidden_states": a[0], **common, **empty(range(2, 4))})
    diff = float(np.abs(b[0] - whole[0]).max())
    print(f"llm_a + llm_b vs llm.onnx logits: max abs diff {diff:.2e}")
    np.testing.assert_allclose(b[0], whole[0], atol=1e-4)
    for got, want in zip(a[1:] + b[1:], whole[1:], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)
