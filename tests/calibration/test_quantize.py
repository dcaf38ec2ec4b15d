"""Quantised builds: manifest, which nodes are quantised, weight-only LLM, FP8 structure, cache reuse,
atomic output, and the TensorRT-RTX parser / SM89 builder on the QDQ graphs."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from apet_export.calibration import build as calibration_build
from apet_export.calibration import cache, quantize
from apet_export.calibration.build import CalibrationOptions, calibrate
from apet_export.calibration.quantize import quantized_nodes
from apet_export.errors import ArtifactError, InvalidInputError
from apet_export.export.trt_network import mark_attention_decomposable, set_target
from apet_export.manifest import load_manifest
from apet_export.runtime.images import synthetic_image
from apet_export.runtime.pipeline import Pipeline

APET = "/vision/apet/"


def weighted_compute_nodes(model) -> set[str]:
    """MatMul / Conv / Gemm nodes of the fp32 graph whose weight is a constant, outside the ApET subgraph."""
    constants = {i.name for i in model.graph.initializer}
    return {n.name for n in model.graph.node
            if n.op_type in quantize.QUANTIZED_OP_TYPES and n.input[1] in constants and not n.name.startswith(APET)}


def test_manifest_of_a_quantised_build(int8_build, llava_build):
    manifest = load_manifest(int8_build)
    q = manifest.quantization
    assert manifest.precision == "int8" and q["precision"] == "int8" and q["method"] == "minmax"
    assert q["samples"] == 6 and q["skipped_images"] == 0 and q["prompts"] == 8
    assert len(q["cache"]["vision"]) == 64 and q["cache"]["llm"] is None  # weight-only LLM needs no data
    assert q["source_build"] == str(llava_build.resolve())
    assert set(manifest.files) == set(load_manifest(llava_build).files)
    for name in manifest.files:
        assert manifest.file(int8_build, name).is_file()
    # unchanged files are hard links of the source's, not copies
    for relative in ("embeddings.safetensors", "model/model.safetensors"):
        assert os.stat(int8_build / relative).st_ino == os.stat(llava_build / relative).st_ino
    assert not load_manifest(llava_build).quantization  # the source build is untouched
    # the CPU form of the LLM is made from the quantised llm.onnx, not linked from the fp32 build
    cpu_form = onnx.load(str(manifest.file(int8_build, "llm_cpu")), load_external_data=False)
    assert any(n.op_type == "MatMulNBits" for n in cpu_form.graph.node)
    assert any(n.op_type == "TensorScatter" for n in cpu_form.graph.node)


@pytest.mark.parametrize("graph", ["vision.onnx", "vision.plugin.onnx"])
def test_int8_quantises_tower_and_projector_but_not_apet(int8_build, llava_build, graph):
    source = onnx.load(str(llava_build / graph))
    quantised = onnx.load(str(int8_build / graph))
    done = set(quantized_nodes(quantised))
    expected = weighted_compute_nodes(source)
    print(f"{graph}: {len(done)} quantised nodes, e.g. {sorted(done)[:2]}")
    assert done == expected and len(expected) >= 15  # 12 tower MatMuls + patch Conv + 2 projector
    assert not [name for name in done if name.startswith(APET)]
    apet = lambda m: sorted((n.name, n.op_type) for n in m.graph.node if n.name.startswith(APET))  # noqa: E731
    assert apet(quantised) == apet(source) and len(apet(source)) > 10  # every scoring node kept, in float
    qdq = [n for n in quantised.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(n.name.startswith("/vision/") and not n.name.startswith(APET) for n in qdq)
    apet_inputs = {i for n in quantised.graph.node if n.name.startswith(APET) for i in n.input}
    assert not apet_inputs & {o for n in qdq for o in n.output}  # ApET reads no dequantised tensor
    zero_points = [numpy_helper.to_array(i) for i in quantised.graph.initializer if i.name.endswith("zero_point")]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # symmetric int8


def test_int8_llm_is_weight_only(int8_build, llava_build):
    source = onnx.load(str(llava_build / "llm.onnx"))
    quantised = onnx.load(str(int8_build / "llm.onnx"))
    matmuls = [n for n in source.graph.node if n.op_type == "MatMul"]
    nbits = [n for n in quantised.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(matmuls) > 0 and not [n for n in quantised.graph.node if n.op_type == "MatMul"]
    bits = {a.i for n in nbits for a in n.attribute if a.name == "bits"}
    assert bits == {8}
    assert [i.name for i in quantised.graph.input] == [i.name for i in source.graph.input]  # float I/O kept
    assert (int8_build / "llm.onnx").stat().st_size < 0.5 * (llava_build / "llm.onnx").stat().st_size


def test_quantised_builds_generate_on_onnxruntime(int8_build, fp8_build):
    for build in (int8_build, fp8_build):
        with Pipeline.from_dir(build) as pipeline:
            result = pipeline.generate([synthetic_image(0)], "Describe.", max_new_tokens=4, stream=False)
        assert len(result.token_ids) == 4 and np.isfinite(result.first_logits).all()


def test_fp8_graph_structure(fp8_build, llava_build, cache_dir):
    manifest = load_manifest(fp8_build)
    assert manifest.precision == "fp8" and len(manifest.quantization["cache"]["llm"]) == 64
    vision = onnx.load(str(fp8_build / "vision.onnx"))
    assert set(quantized_nodes(vision)) == weighted_compute_nodes(onnx.load(str(llava_build / "vision.onnx")))
    inits = {i.name: i for i in vision.graph.initializer}
    qdq = [n for n in vision.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert all(inits[n.input[2]].data_type == TensorProto.FLOAT8E4M3FN for n in qdq)  # e4m3 zero points
    assert all(not n.name.startswith(APET) for n in qdq)
    # an activation scale is amax / 448 of the calibrated range
    ranges = cache.load_ranges(cache.cache_path(cache_dir, "vision", manifest.quantization["cache"]["vision"]))
    node = next(n for n in vision.graph.node if n.name.endswith("/input_QuantizeLinear"))
    scale = float(numpy_helper.to_array(inits[node.input[1]]))
    assert scale == pytest.approx(quantize.amax(ranges, node.input[0]) / 448, rel=1e-6)
    # weights are stored in float8 with one scale per output channel
    weight_dq = [n for n in qdq if n.name.endswith("/weight_DequantizeLinear")]
    assert weight_dq and all(inits[n.input[0]].data_type == TensorProto.FLOAT8E4M3FN for n in weight_dq)
    assert all(numpy_helper.to_array(inits[n.input[1]]).ndim == 1 for n in weight_dq)
    llm = onnx.load(str(fp8_build / "llm.onnx"))
    done = quantized_nodes(llm)
    assert done and not [n for n in done if "lm_head" in n]  # the output projection stays float
    lm_head = next(n for n in llm.graph.node if "lm_head" in n.name and n.op_type in ("Gemm", "MatMul"))
    assert lm_head.name not in done


def test_fp8_weight_quantisation_round_trip():
    weight = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32) * np.arange(1, 9)  # [K, N]
    values, scale = quantize.fp8_weight(weight, axis=1)
    assert scale.shape == (8,) and np.allclose(scale, np.abs(weight).max(0) / 448)
    restored = values.astype(np.float32) * scale
    relative = np.abs(restored - weight).max() / np.abs(weight).max()
    print(f"fp8 e4m3 weight round trip: max error {relative:.3g} of max|w|")
    assert relative < 2**-4  # e4m3: 3 mantissa bits


def test_cache_is_reused_for_the_same_data_and_graph(int8_build, llava_build, sample_images, cache_dir, tmp_path, monkeypatch):
    key = load_manifest(int8_build).quantization["cache"]["vision"]
    assert cache.cache_path(cache_dir, "vision", key).is_file()

    def no_calibration(*args, **kwargs):
        raise AssertionError("ranges were recomputed although the cache holds them")

    monkeypatch.setattr(quantize, "collect_ranges", no_calibration)
    again = calibrate(CalibrationOptions(build_dir=llava_build, images=sample_images, precision="int8", samples=6,
                                         out=tmp_path / "again", cache_dir=cache_dir))
    assert again.quantization["cache"]["vision"] == key
    assert (tmp_path / "again" / "vision.onnx").read_bytes() == (int8_build / "vision.onnx").read_bytes()
    calls = []
    monkeypatch.setattr(quantize, "collect_ranges", lambda *a, **k: calls.append(a) or no_calibration())
    with pytest.raises(AssertionError):  # other data (5 samples): another key, so the ranges are computed
        calibrate(CalibrationOptions(build_dir=llava_build, images=sample_images, precision="int8", samples=5,
                                     out=tmp_path / "other", cache_dir=cache_dir))
    assert len(calls) == 1 and not (tmp_path / "other").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".other")]  # staging removed


def test_options_are_checked_before_work(int8_build, llava_build, sample_images, tmp_path):
    options = dict(build_dir=llava_build, images=sample_images, samples=2, cache_dir=tmp_path)
    with pytest.raises(ArtifactError, match="already exists: pass --force"):
        calibrate(CalibrationOptions(**options, precision="int8", out=int8_build))
    with pytest.raises(InvalidInputError, match="cannot be calibrated"):
        calibrate(CalibrationOptions(**options, precision="int4", out=tmp_path / "x"))
    with pytest.raises(InvalidInputError, match="calibration method 'mse' is unknown"):
        calibrate(CalibrationOptions(**options, precision="int8", method="mse", out=tmp_path / "x"))
    with pytest.raises(InvalidInputError, match="already quantised"):
        calibrate(CalibrationOptions(**{**options, "build_dir": int8_build}, precision="int8", out=tmp_path / "x"))
    assert calibration_build.CalibrationOptions(build_dir=tmp_path / "b", images=tmp_path, precision="fp8").output.name == "b-fp8"


def tensorrt_engine(path, trt):
    """Parse with TensorRT(-RTX) and build ahead of time for SM89 (Ada: int8 and fp8 tensor cores)."""
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path)), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    mark_attention_decomposable(trt, network)  # fp32 attention shapes without a fused kernel
    config = builder.create_builder_config()
    set_target(trt, config, trt.ComputeCapability.SM89)
    profile = builder.create_optimization_profile()
    profile.set_shape("pixel_values", (1, 3, 336, 336), (1, 3, 336, 336), (2, 3, 336, 336))
    profile.set_shape_input("keep", [11], [64], [576])  # the budget is a shape input (TopK's k)
    config.add_optimization_profile(profile)
    return network, builder.build_serialized_network(network, config)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_tensorrt_rtx_parses_and_builds_the_qdq_vision_graph(precision, int8_build, fp8_build):
    from apet_export.compat import import_tensorrt

    trt = import_tensorrt()
    build = {"int8": int8_build, "fp8": fp8_build}[precision]
    network, engine = tensorrt_engine(build / "vision.onnx", trt)
    kinds = {network.get_layer(i).type for i in range(network.num_layers)}
    assert trt.LayerType.QUANTIZE in kinds and trt.LayerType.DEQUANTIZE in kinds
    dtypes = {network.get_layer(i).get_output(0).dtype for i in range(network.num_layers)
              if network.get_layer(i).type == trt.LayerType.QUANTIZE}
    assert dtypes == {trt.DataType.INT8 if precision == "int8" else trt.DataType.FP8}
    assert engine is not None and engine.nbytes > 0
    print(f"{precision} vision.onnx: SM89 engine {engine.nbytes / 1e6:.1f} MB")


def test_tensorrt_rtx_parses_the_fp8_llm(fp8_build):
    from apet_export.compat import import_tensorrt

    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(fp8_build / "llm.onnx")), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    quantize_layers = [network.get_layer(i) for i in range(network.num_layers)
                       if network.get_layer(i).type == trt.LayerType.QUANTIZE]
    assert quantize_layers and {layer.get_output(0).dtype for layer in quantize_layers} == {trt.DataType.FP8}


def test_int4_weight_only_llm_runs_on_onnxruntime(llava_build, tmp_path):
    from apet_export.runtime.sessions import onnxruntime_session

    target = tmp_path / "llm.onnx"
    quantize.quantize_weights(llava_build / "llm.onnx", target, bits=4)
    nbits = [n for n in onnx.load(str(target)).graph.node if n.op_type == "MatMulNBits"]
    assert nbits and {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {4}
    manifest = load_manifest(llava_build)
    dims, hidden = manifest.dims, manifest.files["llm"].inputs[0].shape[2]
    feed = {"inputs_embeds": np.random.default_rng(0).normal(size=(1, 7, hidden)).astype(np.float32),
            "attention_mask": np.ones((1, 7), np.int64), "position_ids": np.arange(7, dtype=np.int64)[None]}
    for i in range(dims["num_layers"]):
        for kind in ("key", "value"):
            feed[f"past_{kind}_{i}"] = np.zeros((1, dims["num_kv_heads"], 0, dims["head_dim"]), np.float32)
    expected = onnxruntime_session(llava_build / "llm.onnx").run(["logits"], feed)[0]
    actual = onnxruntime_session(target).run(["logits"], feed)[0]
    cosine = float((expected * actual).sum() / np.linalg.norm(expected) / np.linalg.norm(actual))
    print(f"int4 weight-only logits: cosine {cosine:.4f} to fp32, max abs diff {np.abs(expected - actual).max():.3g}")
    assert 0.9 < cosine < 1.0
    with pytest.raises(InvalidInputError, match="4 or 8 bits"):
        quantize.quantize_weights(llava_build / "llm.onnx", target, bits=3)
