"""Every registered family on every path (tests/matrix/cells.py): each cell works, or is refused before any
work with one `error:` line giving the documented reason. Generated from the registry: cheap cells run in
the default suite on the shared session builds, the others are `slow` (run by .ci/run)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import linked_copy
from tests.matrix.cells import CELLS, Workspace, families, refusal, tiny_preset
from tests.test_bad_inputs import assert_one_error_line

# the session builds of tests/conftest.py that a row reuses (other families build their own)
SHARED_BUILDS = {"llava": "llava_build", "llava_next": "llava_next_build", "video_llava": "video_llava_build",
                 "qwen2_5_vl": "qwen_build"}
README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.fixture(scope="session")
def workspaces(tmp_path_factory) -> dict[str, Workspace]:
    return {}


def workspace(workspaces, family: str, request, capsys, tmp_path_factory) -> Workspace:
    if family not in workspaces:
        fixture, root = SHARED_BUILDS.get(family), tmp_path_factory.mktemp(f"matrix-{family}")
        # cells add files to the fp32 build (parity.json, the calibration cache): a private view of the shared one
        build = linked_copy(request.getfixturevalue(fixture), root / "fp32") if fixture else None
        workspaces[family] = Workspace(family, root, build)
    found = workspaces[family]
    found.capsys = capsys
    return found


def check_cell(ws: Workspace, cell) -> None:
    reason = refusal(ws.family, cell.name)
    code, out, err = cell.run(ws)
    if reason is None:
        assert code == 0, f"{ws.family} / {cell.name} failed:\n{err[-4000:]}"
    else:
        assert_one_error_line(code, out, err, reason)


CASES = [
    pytest.param(family, cell, id=f"{family}-{cell.name.replace(' ', '-')}", marks=[pytest.mark.slow] if cell.slow else [])
    for family in families()
    for cell in CELLS
]


@pytest.mark.parametrize(("family", "cell"), CASES)
def test_cell(family, cell, workspaces, request, capsys, tmp_path_factory):
    check_cell(workspace(workspaces, family, request, capsys, tmp_path_factory), cell)


def test_every_registered_family_has_a_row():
    from apet_export.models.registry import FAMILIES

    assert set(families()) == set(FAMILIES)  # every family ships a tiny preset, so every family is walked
    assert {case.values[0] for case in CASES} == set(FAMILIES)


def test_readme_matrix_shows_the_same_cells():
    """The README's support matrix: a row per cell, a column per family's tiny preset; refused cells say so."""
    table = README[README.index("<!-- support-matrix -->"):README.index("<!-- /support-matrix -->")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
    header, body = rows[0], {row[0]: row[1:] for row in rows[2:]}
    assert header[1:] == [f"`{tiny_preset(f)}`" for f in families()]
    assert list(body) == [cell.name for cell in CELLS]
    for cell in CELLS:
        for family, text in zip(families(), body[cell.name], strict=True):
            refused = refusal(family, cell.name) is not None
            assert refused == bool(re.match(r"refused", text)), (cell.name, family, text)
