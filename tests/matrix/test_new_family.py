"""A family added in a test — a copy of LLaVA registered under another name, with its own tiny preset — is
walked by the support matrix with nothing else changed: its row comes from the registry, its build records
its name, and every path reads its contract from there."""

from __future__ import annotations

import pytest

from apet_export.manifest import load_manifest
from apet_export.models.llava import LlavaFamily
from apet_export.models.registry import FAMILIES, PRESETS, Preset, register_family
from tests.matrix.cells import CELLS, Workspace, families, refusal, tiny_preset
from tests.matrix.test_matrix import check_cell


class CopiedLlavaFamily(LlavaFamily):
    name = "llava_copy"
    model_types = ()  # reached through its preset (its checkpoints are LLaVA's)


@pytest.fixture
def copied_family(monkeypatch):
    """The module and the registry line a new family needs; both are removed again after the test."""
    register_family(CopiedLlavaFamily())
    preset = Preset("tiny-llava-copy", "llava_copy", PRESETS["tiny-llava"].build, "a copy of tiny-llava")
    monkeypatch.setitem(PRESETS, preset.name, preset)
    yield preset
    FAMILIES.pop("llava_copy")


# A full build of the copy (~30 s) and its cheap cells: the same code the default run walks on tiny-llava's row,
# so `slow` (.ci/run runs it).
@pytest.mark.slow
def test_a_new_family_is_walked_by_the_matrix(copied_family, tmp_path, capsys):
    assert "llava_copy" in families() and tiny_preset("llava_copy") == "tiny-llava-copy"
    workspace = Workspace("llava_copy", tmp_path)
    workspace.capsys = capsys
    for cell in CELLS:
        if not cell.slow:  # the slow cells run the same code (and spawn processes that would not see the copy)
            check_cell(workspace, cell)
    assert load_manifest(workspace.build("fp32")).family == "llava_copy"
    assert refusal("llava_copy", "stage 2") is None  # a LLaVA copy keeps LLaVA's paths
