"""The ApetScore TensorRT plugin, checked with TensorRT-RTX's real ONNX parser and ahead-of-time builder (no GPU).

The build's vision.plugin.onnx goes through the product's parse and engine build (export/trt_network.py) with
the manifest's profile; so do the hand-made one-node graphs.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from apet_export.compat import import_tensorrt
from apet_export.errors import EngineBuildError, MissingDependencyError
from apet_export.manifest import load_manifest
from apet_export.plugins import trt_plugin
from apet_export.plugins.identity import OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION
from tests.tensorrt_parse import tensorrt_network


@pytest.fixture(scope="module")
def trt():
    return import_tensorrt()


def plugin_layers(trt, network):
    return [network.get_layer(i) for i in range(network.num_layers)
            if network.get_layer(i).type == trt.LayerType.PLUGIN_V3]


def test_parse_without_registration_fails_with_a_typed_error(trt, any_build):
    trt_plugin.unregister_apet_score_plugin(trt)
    assert not trt_plugin.is_apet_score_registered(trt)
    with pytest.raises(MissingDependencyError, match="register_apet_score_plugin"):  # the product's parse
        tensorrt_network(any_build / "vision.plugin.onnx")
    with pytest.raises(MissingDependencyError, match="apet::ApetScore"):
        trt_plugin.ensure_plugin_registered(trt, register=False)


def test_registration_is_idempotent(trt):
    trt_plugin.register_apet_score_plugin(trt)
    trt_plugin.register_apet_score_plugin(trt)
    creator = trt.get_plugin_registry().get_creator(OP_TYPE, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    assert creator is not None and creator.name == OP_TYPE
    trt_plugin.ensure_plugin_registered(trt)


def test_plugin_graph_parses_and_builds_for_sm89_and_sm80(trt, any_build):
    from apet_export.export.trt_network import build_engine, make_logger
    from apet_export.export.trt_profiles import profiles_for

    manifest = load_manifest(any_build)
    trt_plugin.ensure_plugin_registered(trt)
    network, _parser = tensorrt_network(any_build / "vision.plugin.onnx")  # the product's parse

    (layer,) = plugin_layers(trt, network)
    num_tokens, num_basis = manifest.dims["num_image_tokens"], manifest.compression.num_basis
    scores, basis_index = layer.get_output(0), layer.get_output(1)
    assert tuple(scores.shape) == (-1, num_tokens) and scores.dtype == trt.DataType.FLOAT
    assert tuple(basis_index.shape) == (-1, num_basis) and basis_index.dtype == trt.DataType.INT64

    profiles = profiles_for(manifest, "vision_plugin")  # the manifest's ranges: batch, budget keep in [M+1, N]
    logger = make_logger(trt)
    for capability in ("SM89", "SM80"):
        start = time.perf_counter()
        plan, _, _ = build_engine(trt, trt.Builder(logger), logger, any_build / "vision.plugin.onnx", profiles,
                                  getattr(trt.ComputeCapability, capability), None, 0)
        seconds = time.perf_counter() - start
        assert plan is not None and len(plan) > 0, capability
        print(f"\n{manifest.source['model']}: vision.plugin.onnx -> {capability} engine "
              f"{len(plan) / 1e6:.2f} MB in {seconds:.2f} s")


def test_creator_rejects_more_basis_tokens_than_the_kernel_holds(trt):
    _, creator_class = trt_plugin._plugin_classes(trt)
    fields, _arrays = trt_plugin.attribute_fields(
        trt, {"num_basis": trt_plugin.MAX_NUM_BASIS + 1, "ridge": 1e-5, "fps_start": -1}
    )
    with pytest.raises(ValueError, match="num_basis=33"):
        creator_class().create_plugin("score", fields, trt.TensorRTPhase.BUILD)


def test_attributes_round_trip_through_serialised_fields(trt):
    plugin_class, _ = trt_plugin._plugin_classes(trt)
    plugin = plugin_class({"num_basis": 7, "ridge": 1e-3, "fps_start": 4}, trt.TensorRTPhase.BUILD)
    fields = plugin.get_fields_to_serialize()
    attributes = trt_plugin.plugin_attributes(fields)
    assert attributes["num_basis"] == 7 and attributes["fps_start"] == 4
    assert np.isclose(attributes["ridge"], 1e-3)
    assert plugin.clone().attributes == plugin.attributes


@pytest.mark.parametrize("elem_type", ["FLOAT", "FLOAT16"])
def test_single_node_graph_builds_with_fp32_and_fp16_input_and_dynamic_shapes(trt, tmp_path, elem_type):
    """x [B, N, 48] (B and N dynamic) -> ApetScore: shapes inferred from expressions, fp16 input accepted."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node(
        OP_TYPE, ["x"], ["scores", "basis_index"], name="/apet/score", domain="ai.onnx.contrib",
        num_basis=6, ridge=1e-5, fps_start=-1, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
    )
    graph = helper.make_graph(
        [node], "apet_score",
        [helper.make_tensor_value_info("x", getattr(TensorProto, elem_type), ["batch", "tokens", 48])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "tokens"]),
         helper.make_tensor_value_info("basis_index", TensorProto.INT64, ["batch", 6])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("ai.onnx.contrib", 1)])
    model.ir_version = 10
    path = tmp_path / "apet_score.onnx"
    onnx.save(model, path)

    from apet_export.export.trt_network import build_engine, make_logger
    from apet_export.export.trt_profiles import Profile

    trt_plugin.ensure_plugin_registered(trt)
    network, _parser = tensorrt_network(path)  # the product's parse
    (layer,) = plugin_layers(trt, network)
    assert tuple(layer.get_output(0).shape) == (-1, -1) and tuple(layer.get_output(1).shape) == (-1, 6)

    profile = Profile("default", {"x": ((1, 7, 48), (1, 576, 48), (4, 2880, 48))}, {})
    logger = make_logger(trt)
    plan, _, _ = build_engine(trt, trt.Builder(logger), logger, path, [profile], trt.ComputeCapability.SM89, None, 0)
    assert plan is not None and len(plan) > 0


def test_format_support(trt):
    plugin_class, _ = trt_plugin._plugin_classes(trt)
    plugin = plugin_class({"num_basis": 4, "ridge": 1e-5, "fps_start": -1})

    def descs(*types, layout=None):
        out = []
        for dtype in types:
            desc = trt.DynamicPluginTensorDesc()
            desc.desc.type = dtype
            desc.desc.format = layout or trt.TensorFormat.LINEAR
            out.append(desc)
        return out

    float_, half, int64 = trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.INT64
    assert all(plugin.supports_format_combination(i, descs(float_, float_, int64), 1) for i in range(3))
    assert plugin.supports_format_combination(0, descs(half, float_, int64), 1)
    assert not plugin.supports_format_combination(0, descs(trt.DataType.BF16, float_, int64), 1)
    assert not plugin.supports_format_combination(2, descs(float_, float_, trt.DataType.INT32), 1)
    assert not plugin.supports_format_combination(0, descs(float_, float_, int64, layout=trt.TensorFormat.HWC), 1)


def test_a_node_beyond_the_kernel_limit_fails_the_parse_with_the_reason(trt, tmp_path, capfd):
    """A Python exception in create_plugin must not abort the process: the parse fails, the reason is logged."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node(
        OP_TYPE, ["x"], ["scores", "basis_index"], domain="ai.onnx.contrib",
        num_basis=33, ridge=1e-5, fps_start=-1, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
    )
    graph = helper.make_graph(
        [node], "apet_score", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("basis_index", TensorProto.INT64, [1, 33])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("ai.onnx.contrib", 1)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "bad.onnx")
    trt_plugin.ensure_plugin_registered(trt)
    with pytest.raises(EngineBuildError, match="Could not create the plugin"):
        tensorrt_network(tmp_path / "bad.onnx")
    assert "num_basis=33 is outside [1, 32]" in capfd.readouterr().err
