"""vision.onnx is derived from vision.plugin.onnx (export/plain_scoring.py): the vision tower is traced once."""

import numpy as np
import onnx
import pytest

from apet_export.manifest import load_manifest
from apet_export.runtime.images import synthetic_image

SCORING = "/vision/apet/score/"


def test_vision_graph_is_the_plugin_graph_with_the_scoring_in_standard_ops(any_build):
    plugin = onnx.load(str(any_build / "vision.plugin.onnx"))
    plain = onnx.load(str(any_build / "vision.onnx"))
    (score,) = [n for n in plugin.graph.node if n.op_type == "ApetScore"]
    scoring = [n for n in plain.graph.node if n.name.startswith(SCORING)]
    rest = [n for n in plain.graph.node if not n.name.startswith(SCORING)]
    # every other node, in the same order, with the same inputs and outputs
    assert rest == [n for n in plugin.graph.node if n is not score]
    assert scoring and all(n.domain in ("", "ai.onnx") for n in scoring)
    assert {o.domain for o in plain.opset_import} <= {"", "ai.onnx"}
    # the scoring reads the node's input and writes its two outputs; the plugin graph's weights are kept
    assert score.input[0] in {name for n in scoring for name in n.input}
    assert set(score.output) <= {name for n in scoring for name in n.output}
    assert {i.name for i in plugin.graph.initializer} <= {i.name for i in plain.graph.initializer}
    assert plain.graph.input == plugin.graph.input and plain.graph.output == plugin.graph.output


@pytest.mark.slow  # a second trace of the vision graph, the one the build no longer makes (~20 s a preset)
@pytest.mark.parametrize("fixture", ["llava_build", "llava_fp16_build", "qwen_build", "video_llava_build", "llava_next_build"])
def test_derived_vision_graph_equals_a_direct_trace_bit_for_bit(fixture, request, tmp_path):
    """The build's vision.onnx gives exactly the outputs of the vision graph traced with ApET in standard ops
    (export_vision without the plugin, what builds did before), at the smallest, a middle and the largest budget."""
    from apet_export.export.vision import export_vision
    from apet_export.models.registry import budget_policy, family_for_checkpoint
    from apet_export.parity.feeds import vision_feeds
    from apet_export.runtime.sessions import onnxruntime_session

    build = request.getfixturevalue(fixture)
    manifest = load_manifest(build)
    family = family_for_checkpoint(manifest.model_dir(build))
    model, _ = family.load(manifest.model_dir(build))
    export_vision(model, family, manifest.method, manifest.compression, tmp_path / "traced.onnx",
                  opset=manifest.opset, precision=manifest.precision)
    derived, traced = onnxruntime_session(build / "vision.onnx"), onnxruntime_session(tmp_path / "traced.onnx")
    policy = budget_policy(manifest)  # budgets as `parity` scales them (LLaVA-NeXT: a whole image's crops)
    budgets = policy.within(policy.scaled((manifest.budget["min"], 64, manifest.budget["max"])))
    images = [synthetic_image(0, (400, 300)), synthetic_image(1, (300, 500))]  # two grid shapes where they vary
    feeds = vision_feeds(build, manifest, images, budgets)
    assert feeds
    for feed in feeds:
        for name, a, b in zip([o.name for o in traced.get_outputs()], derived.run(None, feed), traced.run(None, feed),
                              strict=True):
            assert np.array_equal(a, b), (name, int(feed["keep"]), float(np.abs(a.astype(np.float64) - b).max()))
