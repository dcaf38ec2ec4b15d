"""The parity table says which tolerance decided each verdict, next to the figure it was compared with."""

import io

from rich.console import Console

from apet_export.parity.report import ParityRow, decided_by, print_table


def row(max_abs, max_rel, atol=1e-4, rtol=1e-3, passed=True):
    return ParityRow("vision.onnx k=64 b=1", "image_embeds", max_abs, max_rel, atol, rtol, passed)


def test_the_deciding_tolerance_is_named():
    assert decided_by(row(2e-5, 0.966)) == "every |diff| <= atol"  # a large rel diff did not matter
    assert decided_by(row(5e-3, 4e-4)) == "every rel diff <= rtol"
    assert decided_by(row(5e-3, 0.9)) == "each element within atol or rtol"  # neither max alone: elementwise
    assert decided_by(row(5e-3, 0.9, passed=False)) == "elements beyond both atol and rtol"
    assert decided_by(row(0.0, float("nan"), 0.0, 0.0)) == "exact match"
    assert decided_by(row(3.0, float("nan"), 0.0, 0.0, passed=False)) == "not identical"


def test_table_shows_each_figure_against_its_tolerance():
    buffer = io.StringIO()
    print_table([row(2e-5, 0.966), row(5e-3, 4e-4)], Console(file=buffer, width=200))
    lines = [line for line in buffer.getvalue().splitlines() if "image_embeds" in line]
    assert "2e-05 <= 0.0001" in lines[0] and "0.966 > 0.001" in lines[0] and "PASS: every |diff| <= atol" in lines[0]
    assert "0.005 > 0.0001" in lines[1] and "0.0004 <= 0.001" in lines[1] and "PASS: every rel diff <= rtol" in lines[1]
