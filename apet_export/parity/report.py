"""Parity rows, the printed table and parity.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from apet_export.errors import ArtifactError
from apet_export.outputs import write_atomically

REPORT_NAME = "parity.json"


@dataclass
class ParityRow:
    check: str  # what was run: graph, budget, batch (or the e2e case)
    output: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    passed: bool
    detail: str = ""  # e.g. the first differing token


def decided_by(row: ParityRow) -> str:
    """Which tolerance made the verdict: elements pass when |diff| <= atol OR |diff| / |expected| <= rtol."""
    if row.atol == 0 and row.rtol == 0:
        return "exact match" if row.passed else "not identical"
    if row.max_abs <= row.atol:
        return "every |diff| <= atol"
    if row.rtol > 0 and row.max_rel <= row.rtol:
        return "every rel diff <= rtol"
    if row.passed:
        return "each element within atol or rtol"
    return "elements beyond both atol and rtol" if row.rtol > 0 else "|diff| > atol"


def _against(value: float, tolerance: float, used: bool) -> str:
    if value != value:  # nan: not applicable
        return "-"
    if not used:
        return f"{value:.3g} (not used)"
    return f"{value:.3g} {'<=' if value <= tolerance else '>'} {tolerance:g}"


def print_table(rows: list[ParityRow], console: Console, title: str = "parity vs eager PyTorch") -> None:
    """Each figure beside the tolerance it is held to, and the tolerance that decided the result."""
    table = Table(title=title)
    for column in ("check", "output", "max abs diff vs atol", "max rel diff vs rtol", "result"):
        table.add_column(column, justify="right" if "diff" in column else "left")
    for row in rows:
        verdict = "[green]PASS[/green]" if row.passed else "[red]FAIL[/red]"
        exact = row.atol == 0 and row.rtol == 0
        table.add_row(
            row.check, row.output, _against(row.max_abs, row.atol, True),
            "-" if exact else _against(row.max_rel, row.rtol, row.rtol > 0),
            f"{verdict}: {decided_by(row)}" + (f"; {row.detail}" if row.detail else ""),
        )
    console.print(table)


def _as_dict(row) -> dict:
    """A row as JSON: tolerance rows also say which tolerance decided them (accuracy rows have thresholds)."""
    return {**asdict(row), "decided_by": decided_by(row)} if isinstance(row, ParityRow) else asdict(row)


def write_report(build_dir: Path, sections: dict[str, list], console=None) -> Path | None:
    """parity.json: every row per section and the overall verdict; written via a temporary file. A build
    that cannot be written to (read-only, full disk) keeps its results on screen: None, and one line says so."""
    report = {
        "passed": all(row.passed for rows in sections.values() for row in rows),
        **{name: [_as_dict(row) for row in rows] for name, rows in sections.items()},
    }
    path = Path(build_dir) / REPORT_NAME
    try:
        return write_atomically(path, json.dumps(report, indent=2) + "\n")
    except ArtifactError as error:
        (console or Console(stderr=True)).print(f"[yellow]warning:[/yellow] the results above are not saved: {error}")
        return None
