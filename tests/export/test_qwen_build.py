"""tiny-qwen2.5-vl end to end: manifest contract, parity on two resolutions and three budgets, the pipeline
against HF's own generation forward, and the TensorRT-RTX parse of the graphs."""

import numpy as np
import onnx
import pytest
import torch

from apet_export.errors import MissingDependencyError
from apet_export.manifest import load_manifest
from apet_export.parity.run import run_parity
from apet_export.runtime.images import synthetic_image
from apet_export.runtime.pipeline import Pipeline
from tests.conftest import linked_copy
from tests.tensorrt_parse import network_inputs, tensorrt_network


def graph_io(path):
    model = onnx.load(str(path), load_external_data=False)
    shape = lambda v: tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)  # noqa: E731
    return [(v.name, shape(v)) for v in model.graph.input], [(v.name, shape(v)) for v in model.graph.output]


def test_manifest_is_the_graphs_io_contract(qwen_build):
    manifest = load_manifest(qwen_build)
    assert manifest.family == "qwen2_5_vl"
    assert set(manifest.files) == {"vision", "vision_plugin", "llm", "llm_cpu", "embeddings"}
    for name in ("vision", "vision_plugin", "llm"):
        inputs, outputs = graph_io(manifest.file(qwen_build, name))
        assert inputs == [(t.name, t.shape) for t in manifest.files[name].inputs], name
        assert outputs == [(t.name, t.shape) for t in manifest.files[name].outputs], name
    vision = manifest.files["vision"]
    assert [(t.name, t.shape) for t in vision.inputs] == [
        ("pixel_values", ("patches", 1176)), ("patch_positions", ("patches", 2)), ("window_index", ("merged",)),
        ("window_patch", ("windows", 64)), ("window_slot", ("patches",)), ("keep", ()),
    ]
    assert [t.shape for t in vision.outputs] == [(1, "keep", 64), (1, "keep"), (1, "merged")]
    llm_positions = next(t for t in manifest.files["llm"].inputs if t.name == "position_ids")
    assert llm_positions.shape == (3, "batch", "sequence")  # M-RoPE
    assert manifest.budget == {"default": None, "min": 11, "max": 64, "ratio": 0.3}
    attention = [n for n in onnx.load(str(qwen_build / "vision.onnx")).graph.node if n.op_type == "Attention"]
    assert len(attention) == 4  # one fused attention per ViT block, window blocks masked


def test_parity_two_resolutions_three_budgets(qwen_build, tmp_path):
    sections = run_parity(linked_copy(qwen_build, tmp_path / "build"))  # raises ParityError on any failure
    vision, e2e = sections["vision"], sections["e2e"]
    for output in ("image_embeds", "scores"):
        worst = max((r for r in vision if r.output == output), key=lambda r: r.max_abs)
        print(f"largest {output} diff: {worst.max_abs:.3g} ({worst.check})")
    assert all(row.passed for row in vision + e2e)
    grids = {row.check.split()[-1] for row in vision}
    assert grids == {"grid=1x12x18", "grid=1x20x12"}  # two resolutions through one graph
    assert all(row.max_abs == 0 for row in vision if row.output == "keep_index")
    assert {row.check for row in e2e} == {f"greedy 32 tokens k={k}" for k in (16, 32, 64)}
    assert all(row.detail == "identical (32 tokens)" for row in e2e if row.output == "token_ids")


def test_default_budget_is_30_percent_and_positions_continue(qwen_build):
    with Pipeline.from_dir(qwen_build, backend="onnxruntime") as pipeline:
        image = synthetic_image(1)  # 12 x 18 patches -> 54 merged tokens
        result = pipeline.generate([image], "Describe the image.", max_new_tokens=4, stream=False)
        assert result.image_tokens == int(0.3 * 54)
        two = pipeline.generate([image, synthetic_image(2, (300, 500))], "Compare.", budget=20, max_new_tokens=2, stream=False)
        assert two.image_tokens == 40


def test_uncompressed_pipeline_matches_hf_generation_forward(qwen_build):
    """At budget N the torch pipeline (our merge + M-RoPE positions) equals HF's own forward, which expands
    the placeholders, runs the ViT and computes get_rope_index itself."""
    image = synthetic_image(3, (300, 500))
    with Pipeline.from_dir(qwen_build, backend="torch") as pipeline:
        ours = pipeline.generate([image], "What is it?", budget=64, max_new_tokens=1, stream=False).first_logits
        ids = pipeline.prompt_ids("What is it?", 1)
        processor, model = pipeline.processor, pipeline.backend.model
        pixels = processor.image_processor([image], return_tensors="pt")
        tokens = int(pixels["image_grid_thw"].prod()) // 4
        expanded = []
        for token in ids:
            expanded += [token] * (tokens if token == model.config.image_token_id else 1)
        input_ids = torch.tensor([expanded])
        with torch.no_grad():
            reference = model(
                input_ids=input_ids, pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                mm_token_type_ids=(input_ids == model.config.image_token_id).int(),
            ).logits[0, -1].numpy()
    diff = np.abs(ours - reference).max()
    print(f"first-step logits vs HF forward: max |diff| {diff:.3g}")
    assert diff <= 1e-4


@pytest.mark.parametrize("graph", ["vision.onnx", "llm.onnx"])
def test_graphs_parse_in_tensorrt_rtx(qwen_build, graph):
    network, _parser = tensorrt_network(qwen_build / graph)  # the product's parse (strongly typed)
    inputs = network_inputs(network)
    if graph == "llm.onnx":
        assert inputs["position_ids"] == (3, -1, -1)
    else:
        assert inputs["pixel_values"] == (-1, 1176) and inputs["window_index"] == (-1,)


def test_visualize_draws_the_merged_grid(qwen_build, tmp_path):
    from apet_export.visualize import visualize_build

    image = tmp_path / "portrait.png"
    synthetic_image(4, (300, 500)).save(image)
    visualize_build(qwen_build, image, None, tmp_path / "out.png")
    assert (tmp_path / "out.png").stat().st_size > 10_000


def test_vision_engine_builds_ahead_of_time_for_a_range_of_resolutions(qwen_build):
    """TensorRT-RTX on CPU: vision.onnx → SM89 engine with the product's profile (the family's patches /
    merged / windows ranges) and the budget `keep` as a shape input (fp32 head-dim-16 attention marked
    decomposable, as docs/design.md notes)."""
    from apet_export.compat import import_tensorrt

    try:
        trt = import_tensorrt()
    except MissingDependencyError as error:
        pytest.skip(str(error))
    if not hasattr(trt, "ComputeCapability"):
        pytest.skip("ahead-of-time builds need TensorRT-RTX (set_compute_capability)")
    from apet_export.export.trt_network import build_engine, make_logger
    from apet_export.export.trt_profiles import profiles_for

    manifest = load_manifest(qwen_build)
    (profile,) = profiles_for(manifest, "vision")  # the product's profile, from the family's axis ranges
    low, high = manifest.budget["min"], manifest.budget["max"]  # merged tokens per image: M + 1 .. N (max_pixels)
    assert profile.shapes["pixel_values"] == ((4 * low, 1176), (4 * high, 1176), (4 * high, 1176))
    assert profile.shapes["window_index"][0] == (low,) and profile.shapes["window_patch"][2] == (high, 64)
    assert profile.values["keep"] == (low, int(0.3 * high), high)
    logger = make_logger(trt)
    plan, _, _ = build_engine(trt, trt.Builder(logger), logger, qwen_build / "vision.onnx", [profile],
                              trt.ComputeCapability.SM89, None, 0)
    assert plan is not None and len(plan) > 1_000_000
