"""Build artifacts: manifest contract, graph structure, variants, atomicity, errors."""

import json
import shutil

import onnx
import pytest
import torch

from apet_export.errors import ArtifactError, BudgetError, InvalidInputError
from apet_export.export.build import BuildOptions, build
from apet_export.manifest import load_manifest
from apet_export.parity.run import run_parity


def graph_io(path):
    model = onnx.load(str(path), load_external_data=False)
    shape = lambda v: tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)  # noqa: E731
    return [(v.name, shape(v)) for v in model.graph.input], [(v.name, shape(v)) for v in model.graph.output]


def test_manifest_is_the_graphs_io_contract(any_build):
    manifest = load_manifest(any_build)
    assert set(manifest.files) == {"vision", "vision_plugin", "llm", "llm_cpu", "embeddings"}
    for name in ("vision", "vision_plugin", "llm", "llm_cpu"):
        spec = manifest.files[name]
        inputs, outputs = graph_io(manifest.file(any_build, name))
        assert inputs == [(t.name, t.shape) for t in spec.inputs], name
        assert outputs == [(t.name, t.shape) for t in spec.outputs], name
    vision = manifest.files["vision"]
    assert [t.name for t in vision.inputs] == ["pixel_values", "keep"]
    assert [t.name for t in vision.outputs] == ["image_embeds", "keep_index", "scores"]
    assert vision.outputs[0].shape[:2] == ("batch", "keep")
    assert manifest.budget == {"default": 64, "min": 11, "max": manifest.dims["num_image_tokens"]}
    assert len(manifest.source["sha256"]) == 64
    assert (any_build / "model" / "model.safetensors").is_file()


def test_plugin_graph_has_one_apet_score_node_and_no_local_function(llava_build):
    model = onnx.load(str(llava_build / "vision.plugin.onnx"))
    nodes = [n for n in model.graph.node if n.op_type == "ApetScore"]
    assert len(nodes) == 1
    node = nodes[0]
    assert node.domain == "ai.onnx.contrib"
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes["plugin_namespace"] == b"apet" and attributes["plugin_version"] == b"1"
    assert attributes["num_basis"] == 10 and attributes["fps_start"] == -1
    assert attributes["ridge"] == pytest.approx(1e-5)
    # TensorRT's parser prefers a local function of the same name over the plugin registry
    assert not [f for f in model.functions if f.name == "ApetScore"]
    assert "ai.onnx.contrib" in {o.domain for o in model.opset_import}
    # the plain graph computes the same thing with standard ops only
    plain = onnx.load(str(llava_build / "vision.onnx"))
    assert {o.domain for o in plain.opset_import} <= {"", "ai.onnx"}


def test_node_names_are_paths(llava_build):
    names = [n.name for n in onnx.load(str(llava_build / "vision.onnx")).graph.node]
    assert all(name.startswith("/vision/") for name in names)
    assert any(name.startswith("/vision/apet/") for name in names)
    assert any(name.startswith("/vision/tower/") for name in names)
    assert len(set(names)) == len(names)


def test_llm_has_one_fused_attention_per_layer_and_no_softmax(any_build):
    manifest = load_manifest(any_build)
    model = onnx.load(str(any_build / "llm.onnx"))
    ops = [n.op_type for n in model.graph.node]
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert len(attention) == manifest.dims["num_layers"]
    assert "Softmax" not in ops and "GroupQueryAttention" not in ops
    # the form TensorRT >= 10.14 parses: KV concat outside, one output, no past inputs on the node
    assert all(len(n.output) == 1 and len(n.input) <= 4 for n in attention)


def test_the_last_layer_runs_for_the_last_position_only(any_build):
    # the head reads the last position: the last layer's MLP gets one row per prompt, the layer before it every
    # row, and the last layer's cache entries are still every position's
    import numpy as np
    import onnxruntime as ort

    manifest = load_manifest(any_build)
    layers, hidden = manifest.dims["num_layers"], manifest.dims["text_hidden"]
    model = onnx.load(str(any_build / "llm.onnx"))
    down = {layer: next(n.output[0] for n in model.graph.node if f"layers/{layer}/mlp/down_proj" in n.name)
            for layer in (layers - 2, layers - 1)}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in down.values())
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"inputs_embeds": np.random.default_rng(0).standard_normal((1, 5, hidden), np.float32),
            "attention_mask": np.ones((1, 5), np.int64), "position_ids": np.arange(5)[None]}
    for value in session.get_inputs():
        if value.name.startswith("past_"):
            feed[value.name] = np.zeros((1, manifest.dims["num_kv_heads"], 0, manifest.dims["head_dim"]), np.float32)
        elif value.name == "position_ids" and len(value.shape) == 3:
            feed["position_ids"] = np.stack([feed["position_ids"]] * 3)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    assert outputs[down[layers - 2]].shape == (1, 5, hidden)
    assert outputs[down[layers - 1]].shape == (1, 1, hidden)
    assert outputs[f"present_key_{layers - 1}"].shape[2] == 5


@pytest.mark.slow  # an LLM export of its own (~15 s); the fp16 builds and engines are slow too (.ci/run)
def test_llm_fp16_variant(tmp_path):
    from apet_export.export.llm import export_llm_artifacts
    from apet_export.manifest import Manifest
    from apet_export.models.registry import family_for_checkpoint, prepare_checkpoint
    from apet_export.runtime.sessions import onnxruntime_session

    prepare_checkpoint("tiny-llava", tmp_path / "model")
    family = family_for_checkpoint(tmp_path / "model")
    model, _ = family.load(tmp_path / "model")
    manifest = Manifest({}, "llava", {}, "apet", None, {}, "fp16", 23, {})
    export_llm_artifacts(model, family, tmp_path, manifest, "fp16")
    session = onnxruntime_session(tmp_path / "llm.onnx")
    assert session.get_inputs()[0].type == "tensor(float16)"
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left in fp32


@pytest.fixture(scope="module")
def method_builds(tmp_path_factory):
    """Vision-only tiny-llava builds of the other methods, each made once for this module: method -> (folder,
    the manifest build returned)."""
    builds = {}

    def get(method: str):
        if method not in builds:
            out = tmp_path_factory.mktemp("methods") / method
            builds[method] = out, build(BuildOptions(model="tiny-llava", out=out, method=method, llm=False))
        return builds[method]
    return get


@pytest.mark.parametrize("method", ["none", "visionzip"])
def test_other_methods_build_and_match_eager(method_builds, method):
    out, manifest = method_builds(method)
    assert "vision_plugin" not in manifest.files and manifest.notes
    sections = run_parity(out, budgets=[16, 576], e2e=False)
    assert all(row.passed for row in sections["vision"])
    from apet_export.export.tensorrt import EngineOptions, build_engines

    record = build_engines(out, EngineOptions(targets=("sm89",), optimization_level=0))  # TensorRT-RTX parses it
    assert [f["artifact"] for f in record["files"]] == ["vision"]


def test_build_from_local_checkpoint(tmp_path, llava_build):
    out = tmp_path / "local"
    # the cheapest build (no ApET graph, whose export the session builds cover): reading the checkpoint is what is tested
    manifest = build(BuildOptions(model=str(llava_build / "model"), out=out, method="none", llm=False))
    assert manifest.source["model"] == str((llava_build / "model").resolve())
    assert manifest.source["sha256"] == load_manifest(llava_build).source["sha256"]


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    import apet_export.export.vision as vision

    def broken(*args, **kwargs):
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr(vision, "export_vision", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        build(BuildOptions(model="tiny-llava", out=tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force_and_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")  # in an earlier build: --force replaces only what apet-export wrote
    (out / "manifest.json").write_text('{"schema_version": 1, "apet_export_version": "0.1.0"}')
    with pytest.raises(ArtifactError, match="--force"):
        build(BuildOptions(model="tiny-llava", out=out, llm=False))
    # the cheapest build (no ApET graph, whose export the session builds cover): the output folder is what is tested
    build(BuildOptions(model="tiny-llava", out=out, method="none", llm=False, force=True))
    assert not (out / "stale.txt").exists() and (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"budget": 10}, BudgetError),
        ({"budget": 577}, BudgetError),
        ({"method": "fastv"}, InvalidInputError),
        ({"precision": "int4"}, InvalidInputError),
    ],
)
def test_bad_build_options(tmp_path, options, error):
    with pytest.raises(error):
        build(BuildOptions(model="tiny-llava", out=tmp_path / "out", llm=False, **options))
    assert not (tmp_path / "out").exists()


def test_manifest_errors(tmp_path, llava_build):
    with pytest.raises(ArtifactError, match="not an apet-export build"):
        load_manifest(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(llava_build, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="schema version 99"):
        load_manifest(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_manifest(copy)


def test_large_models_are_saved_with_external_data(tmp_path, llava_build):
    from apet_export.export.onnx_graph import save_model
    from apet_export.runtime.sessions import onnxruntime_session

    proto = onnx.load(str(llava_build / "llm.onnx"))
    save_model(proto, tmp_path / "llm.onnx", external_data_above=1024)  # as if it were over 2 GB
    assert (tmp_path / "llm.onnx.data").stat().st_size > (tmp_path / "llm.onnx").stat().st_size
    names = [i.name for i in onnxruntime_session(tmp_path / "llm.onnx").get_inputs()]
    assert names[:3] == ["inputs_embeds", "attention_mask", "position_ids"]


def test_visionzip_graph_runs_the_tower_once(method_builds):
    out, _ = method_builds("visionzip")
    names = [n.name for n in onnx.load(str(out / "vision.onnx")).graph.node]
    convolutions = [n for n in names if "patch_embedding" in n]
    assert len(convolutions) == 1, convolutions  # features and attention come from one pass


@pytest.mark.parametrize(
    ("fixture", "accepted", "refused"),
    [
        ("llava_build", [11, 576], [10, 577]),  # per image: (M, N]
        ("llava_next_build", [160, 640, 5 * 576], [5 * 576 + 1]),  # the whole image, over at most 5 crops of 576
        ("video_llava_build", [11, 256], [10, 257]),  # per frame
        ("llava_two_stage_build", [21, 576], [20, 577]),  # the average of two stages: above 2M
    ],
)
def test_build_checks_its_default_budget_by_the_rules_run_applies(request, fixture, accepted, refused):
    """`build --budget` goes through the family's budget policy, the one `run` uses: LLaVA-NeXT's budget is
    for the whole image (640 = 5 crops x 128 is accepted, as `run` accepts it), a two-stage budget is the
    average. The check runs before any export (check_default_budget needs the manifest's numbers only)."""
    import dataclasses

    from apet_export.export.build import check_default_budget
    from apet_export.models.registry import get_family

    manifest = load_manifest(request.getfixturevalue(fixture))
    family, layer = get_family(manifest.family), manifest.stage2.get("layer")
    for budget in accepted + refused:
        draft = dataclasses.replace(manifest, budget={**manifest.budget, "default": budget}, stage2={})
        if budget in accepted:
            check_default_budget(family, draft, layer)
        else:
            with pytest.raises((BudgetError, InvalidInputError)):
                check_default_budget(family, draft, layer)

