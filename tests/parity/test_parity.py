"""Parity of every artifact against eager PyTorch, on both presets, and that a broken graph is caught."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from apet_export.errors import ParityError
from apet_export.parity.run import run_parity
from tests.conftest import linked_copy


# Parity is one of the most expensive checks (~20 s a build): the second LLaVA preset re-runs it on another tower and
# LLM, so that case is `slow` (.ci/run runs it); its graphs' structure is checked in the default run (any_build).
@pytest.mark.parametrize("preset", ["llava_build", pytest.param("siglip_qwen2_build", marks=pytest.mark.slow)])
def test_all_artifacts_match_eager_pytorch(preset, request, tmp_path):
    any_build = linked_copy(request.getfixturevalue(preset), tmp_path / "build")  # parity.json is written here
    sections = run_parity(any_build)  # vision (both graphs, 4 budgets, batch 1 and 2) + e2e
    vision, e2e = sections["vision"], sections["e2e"]
    failed = [row for row in vision + e2e if not row.passed]
    worst = max(vision, key=lambda r: r.max_abs if r.output == "image_embeds" else 0)
    print(f"largest image_embeds diff: {worst.max_abs:.3g} ({worst.check})")
    assert not failed, failed
    checks = {row.check for row in vision}
    assert any("vision.plugin.onnx" in c for c in checks) and any("b=2" in c for c in checks)
    assert {row.output for row in e2e} == {"token_ids", "first-step logits"}
    assert len(e2e) == 4  # budgets 64 and N
    report = json.loads((any_build / "parity.json").read_text())
    assert report["passed"] is True and len(report["vision"]) == len(vision)


def test_a_corrupted_graph_is_reported(tmp_path, llava_build):
    broken = tmp_path / "broken"
    shutil.copytree(llava_build, broken)
    model = onnx.load(str(broken / "vision.onnx"))
    # perturb the projector's last weight: embeddings drift while the ApET ranking stays the same
    matmul = next(n for n in model.graph.node if n.name.startswith("/vision/multi_modal_projector/linear_2") and n.op_type == "MatMul")
    initializer = next(i for i in model.graph.initializer if i.name in matmul.input)
    weight = numpy_helper.to_array(initializer)
    initializer.CopyFrom(numpy_helper.from_array((weight * 1.01).astype(np.float32), initializer.name))
    onnx.save(model, str(broken / "vision.onnx"))
    with pytest.raises(ParityError, match="image_embeds"):
        run_parity(broken, budgets=[64], e2e=False)
    report = json.loads((broken / "parity.json").read_text())
    assert report["passed"] is False
    failing = {(row["check"].split()[0], row["output"]) for row in report["vision"] if not row["passed"]}
    assert failing == {("vision.onnx", "image_embeds")}  # the untouched plugin graph still passes
