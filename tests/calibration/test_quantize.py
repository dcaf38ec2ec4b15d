"""Quantised builds: manifest, which nodes are quantised, weight-only LLM, FP8 structure, cache reuse,
atomic output, and the TensorRT-RTX parser / SM89 builder on the QDQ and weight-only graphs."""

import os
import stat

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
from tests.tensorrt_parse import tensorrt_network

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
    assert any(n.op_type == "DequantizeLinear" for n in cpu_form.graph.node)  # the weight-only int8 weights
    assert any(n.op_type == "TensorScatter" for n in cpu_form.graph.node)


@pytest.mark.parametrize("graph", ["vision.onnx", "vision.plugin.onnx"])
def test_int8_quantises_tower_and_projector_but_not_apet(int8_build, llava_build, graph):
    source = onnx.load(str(llava_build / graph))
    quantised = onnx.load(str(int8_build / graph))
    done = set(quantized_nodes(quantised))
    patch_embedding = quantize.pixel_layers(source)
    expected = weighted_compute_nodes(source) - set(patch_embedding)
    print(f"{graph}: {len(done)} quantised nodes, e.g. {sorted(done)[:2]}; in float: {patch_embedding}")
    assert done == expected and len(expected) >= 14  # 12 tower MatMuls + 2 projector
    # the layer reading the pixels stays float (the one whose error moved ApET's basis choice most)
    assert len(patch_embedding) == 1 and patch_embedding[0].endswith("patch_embedding/conv2d")
    assert not [name for name in done if name.startswith(APET)]
    apet = lambda m: sorted((n.name, n.op_type) for n in m.graph.node if n.name.startswith(APET))  # noqa: E731
    assert apet(quantised) == apet(source) and len(apet(source)) > 10  # every scoring node kept, in float
    qdq = [n for n in quantised.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(n.name.startswith("/vision/") and not n.name.startswith(APET) for n in qdq)
    apet_inputs = {i for n in quantised.graph.node if n.name.startswith(APET) for i in n.input}
    assert not apet_inputs & {o for n in qdq for o in n.output}  # ApET reads no dequantised tensor
    zero_points = [numpy_helper.to_array(i) for i in quantised.graph.initializer if i.name.endswith("zero_point")]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # symmetric int8


def weight_dequantizers(model) -> dict[str, onnx.NodeProto]:
    """MatMul name -> the DequantizeLinear that feeds its weight."""
    producers = {out: n for n in model.graph.node for out in n.output}
    return {n.name: producers[n.input[1]] for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in producers and producers[n.input[1]].op_type == "DequantizeLinear"}


def test_int8_llm_is_weight_only(int8_build, llava_build):
    """Every constant MatMul weight, the LM head's Gemm included, is int8, per output channel, read through a
    DequantizeLinear: the form onnxruntime and TensorRT both consume (no com.microsoft MatMulNBits, which
    TensorRT rejects)."""
    source = onnx.load(str(llava_build / "llm.onnx"))
    quantised = onnx.load(str(int8_build / "llm.onnx"))
    constants = {i.name for i in source.graph.initializer}
    weighted = {n.name for n in source.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in constants}
    assert "Gemm" in {n.op_type for n in source.graph.node if n.name in weighted}  # the exporter's LM head
    assert not [n for n in quantised.graph.node if n.op_type == "Gemm"]
    dequantizers = weight_dequantizers(quantised)
    assert set(dequantizers) == weighted and len(weighted) > 0
    assert not [n for n in quantised.graph.node if n.domain not in ("", "ai.onnx")]  # standard ops only
    inits = {i.name: i for i in quantised.graph.initializer}
    for dq in dequantizers.values():
        assert inits[dq.input[0]].data_type == TensorProto.INT8 and len(dq.input) == 2  # symmetric: no zero point
        weight, scale = inits[dq.input[0]], numpy_helper.to_array(inits[dq.input[1]])
        assert {a.name: a.i for a in dq.attribute} == {"axis": 1} and scale.shape == (weight.dims[1],)
    assert not [n for n in quantised.graph.node if n.op_type == "QuantizeLinear"]  # activations stay float
    assert [i.name for i in quantised.graph.input] == [i.name for i in source.graph.input]  # float I/O kept
    # the weights take a quarter of their fp32 bytes (the tiny graph's node protos and other constants do not shrink)
    source_inits = {i.name: i for i in source.graph.initializer}
    fp32_bytes = sum(len(source_inits[w].raw_data) for w in {n.input[1] for n in source.graph.node if n.name in weighted})
    int8_bytes = sum(len(inits[dq.input[0]].raw_data) for dq in {d.name: d for d in dequantizers.values()}.values())
    assert int8_bytes * 4 == fp32_bytes
    assert (int8_build / "llm.onnx").stat().st_size < 0.6 * (llava_build / "llm.onnx").stat().st_size
    assert "weight-only int8 DequantizeLinear" in load_manifest(int8_build).quantization["graphs"]["llm"]


def test_quantised_builds_generate_on_onnxruntime(int8_build, fp8_build):
    for build in (int8_build, fp8_build):
        with Pipeline.from_dir(build) as pipeline:
            result = pipeline.generate([synthetic_image(0)], "Describe.", max_new_tokens=4, stream=False)
        assert len(result.token_ids) == 4 and np.isfinite(result.first_logits).all()


def test_fp8_graph_structure(fp8_build, llava_build, cache_dir):
    manifest = load_manifest(fp8_build)
    assert manifest.precision == "fp8" and len(manifest.quantization["cache"]["llm"]) == 64
    vision = onnx.load(str(fp8_build / "vision.onnx"))
    source = onnx.load(str(llava_build / "vision.onnx"))
    assert set(quantized_nodes(vision)) == weighted_compute_nodes(source) - set(quantize.pixel_layers(source))
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
    umask = os.umask(0)
    os.umask(umask)
    for entry in cache_dir.iterdir():  # the permissions the umask gives, not the temporary file's private 0600
        assert stat.S_IMODE(entry.stat().st_mode) == 0o666 & ~umask, entry

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


def tensorrt_engine(build_dir, trt):
    """vision.onnx parsed with TensorRT(-RTX) and built ahead of time for SM89 (Ada: int8 and fp8 tensor cores),
    through the product's own parser, profiles (from the manifest) and target settings."""
    from apet_export.export.trt_network import add_profiles, parse_onnx
    from apet_export.export.trt_profiles import profiles_for

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network, _parser = parse_onnx(trt, builder, logger, build_dir / "vision.onnx")  # the parser owns the weights
    mark_attention_decomposable(trt, network)  # fp32 attention shapes without a fused kernel
    config = builder.create_builder_config()
    set_target(trt, config, trt.ComputeCapability.SM89)
    add_profiles(trt, builder, config, network, profiles_for(load_manifest(build_dir), "vision"))
    return network, builder.build_serialized_network(network, config)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_tensorrt_rtx_parses_and_builds_the_qdq_vision_graph(precision, int8_build, fp8_build):
    from apet_export.compat import import_tensorrt

    trt = import_tensorrt()
    build = {"int8": int8_build, "fp8": fp8_build}[precision]
    network, engine = tensorrt_engine(build, trt)
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
    network, _parser = tensorrt_network(fp8_build / "llm.onnx")  # the product's parse (strongly typed)
    quantize_layers = [network.get_layer(i) for i in range(network.num_layers)
                       if network.get_layer(i).type == trt.LayerType.QUANTIZE]
    assert quantize_layers and {layer.get_output(0).dtype for layer in quantize_layers} == {trt.DataType.FP8}


def _llm_feed(manifest, dtype=np.float32):
    dims, hidden = manifest.dims, manifest.files["llm"].inputs[0].shape[2]
    feed = {"inputs_embeds": np.random.default_rng(0).normal(size=(1, 7, hidden)).astype(dtype),
            "attention_mask": np.ones((1, 7), np.int64), "position_ids": np.arange(7, dtype=np.int64)[None]}
    for i in range(dims["num_layers"]):
        for kind in ("key", "value"):
            feed[f"past_{kind}_{i}"] = np.zeros((1, dims["num_kv_heads"], 0, dims["head_dim"]), dtype)
    return feed


def test_int4_weight_only_llm_runs_on_onnxruntime(llava_build, tmp_path):
    from apet_export.runtime.sessions import onnxruntime_session

    target = tmp_path / "llm.onnx"
    done = quantize.quantize_weights(llava_build / "llm.onnx", target, bits=4)
    model = onnx.load(str(target))
    dequantizers = weight_dequantizers(model)
    assert len(dequantizers) == done["quantized"] > 0 and done["float"] == []
    inits = {i.name: i for i in model.graph.initializer}
    float_weights = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    assert float_weights == []  # the LM head too (a Gemm in llm.onnx): at a real vocabulary its largest weight
    for dq in dequantizers.values():  # int4 in blocks of 32 rows of K, one scale per block and column
        weight, scale = inits[dq.input[0]], numpy_helper.to_array(inits[dq.input[1]])
        assert weight.data_type == TensorProto.INT4 and {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 32}
        assert scale.shape == (weight.dims[0] // 32, weight.dims[1])
    feed = _llm_feed(load_manifest(llava_build))
    expected = onnxruntime_session(llava_build / "llm.onnx").run(["logits"], feed)[0]
    actual = onnxruntime_session(target).run(["logits"], feed)[0]
    cosine = float((expected * actual).sum() / np.linalg.norm(expected) / np.linalg.norm(actual))
    diff = np.abs(expected - actual).max() / np.abs(expected).max()
    print(f"int4 weight-only logits: cosine {cosine:.6f} to fp32, max abs diff {diff:.3g} of max|logit|")
    assert 0.9 < cosine and 0 < diff < 0.2  # quantised (not identical), and close
    with pytest.raises(InvalidInputError, match="4 or 8 bits"):
        quantize.quantize_weights(llava_build / "llm.onnx", target, bits=3)


def test_weight_only_round_trip():
    """int8 per channel and int4 per block of 32: W ≈ values * scale within half a step."""
    weight = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32) * np.arange(1, 9)  # [K, N]
    values, scale = quantize.weight_only_weight(weight, 8, 32)
    assert values.dtype == np.int8 and scale.shape == (8,)
    assert np.abs(values.astype(np.float32) * scale - weight).max() <= scale.max() / 2 + 1e-6
    values, scale = quantize.weight_only_weight(weight, 4, 32)
    assert scale.shape == (2, 8) and int(np.abs(values.astype(np.int8)).max()) == 7
    restored = values.astype(np.float32) * np.repeat(scale, 32, axis=0)
    assert np.abs(restored - weight).max() <= scale.max() / 2 + 1e-6


# The fp16 cases need the fp16 build (~30 s, otherwise used by slow tests only): `slow` (.ci/run runs them).
@pytest.mark.parametrize(("source", "bits"), [("llava_build", 4),
                                              pytest.param("llava_fp16_build", 8, marks=pytest.mark.slow),
                                              pytest.param("llava_fp16_build", 4, marks=pytest.mark.slow)])
def test_tensorrt_rtx_builds_the_weight_only_llm_for_sm89(request, tmp_path, source, bits):
    """The weight-only LLM through `apet-export engine`, with fp32 and with fp16 activations (the scales take
    the graph's type): onnxruntime runs it, TensorRT-RTX parses it with zero errors into a network whose
    DequantizeLinear layers read int weights, and builds it for SM89."""
    import shutil

    from apet_export.export.tensorrt import EngineOptions, build_engines
    from apet_export.runtime.sessions import onnxruntime_session

    trt = pytest.importorskip("tensorrt_rtx_bindings")
    source = request.getfixturevalue(source)
    build = tmp_path / "build"
    shutil.copytree(source, build, ignore=shutil.ignore_patterns("engines", "*.onnx", "*.onnx.data"))
    quantize.quantize_weights(source / "llm.onnx", build / "llm.onnx", bits=bits)
    manifest = load_manifest(build)
    feed = _llm_feed(manifest, np.float16 if manifest.precision == "fp16" else np.float32)
    expected = onnxruntime_session(source / "llm.onnx").run(["logits"], feed)[0].astype(np.float32)
    actual = onnxruntime_session(build / "llm.onnx").run(["logits"], feed)[0].astype(np.float32)
    cosine = float((expected * actual).sum() / np.linalg.norm(expected) / np.linalg.norm(actual))
    print(f"{manifest.precision} activations, int{bits} weights: logits cosine {cosine:.6f} on onnxruntime")
    assert cosine > 0.99
    network, _parser = tensorrt_network(build / "llm.onnx")  # the product's parse: zero errors or it raises
    dequantize = [network.get_layer(i) for i in range(network.num_layers)
                  if network.get_layer(i).type == trt.LayerType.DEQUANTIZE]
    int_type = trt.DataType.INT8 if bits == 8 else trt.DataType.INT4
    assert dequantize and {layer.get_input(0).dtype for layer in dequantize} == {int_type}
    record = build_engines(build, EngineOptions(targets=("sm89",), artifacts=("llm",), optimization_level=0))
    (entry,) = record["files"]
    assert entry["target"] == "sm89" and (build / entry["path"]).stat().st_size == entry["bytes"] > 1_000_000


@pytest.mark.slow
def test_default_engine_run_on_a_calibrated_build_builds_every_graph(int8_build, tmp_path):
    """`apet-export engine DIR --target sm89` on a calibrated int8 build: the QDQ vision graphs, the plugin
    graph and the weight-only LLM all become SM89 engines with TensorRT-RTX; nothing failed or was skipped."""
    import shutil

    from apet_export.export.tensorrt import EngineOptions, build_engines

    pytest.importorskip("tensorrt_rtx_bindings")
    build = tmp_path / "int8"
    shutil.copytree(int8_build, build)
    record = build_engines(build, EngineOptions(targets=("sm89",), optimization_level=0))
    assert {e["artifact"] for e in record["files"]} == {"vision", "vision_plugin", "llm"}
    assert not record["failed"] and not record["skipped"]
    assert all(e["precision"] == "int8" and (build / e["path"]).stat().st_size == e["bytes"] for e in record["files"])
