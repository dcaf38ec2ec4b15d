"""Parity rows, the printed table and parity.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

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


def print_table(rows: list[ParityRow], console: Console, title: str = "parity vs eager PyTorch") -> None:
    table = Table(title=title)
    for column in ("check", "output", "max abs diff", "max rel diff", "tolerance (atol / rtol)", "result"):
        table.add_column(column, justify="right" if "diff" in column else "left")
    for row in rows:
        verdict = "[green]PASS[/green]" if row.passed else "[red]FAIL[/red]"
        table.add_row(
            row.check, row.output, f"{row.max_abs:.3g}", "-" if row.max_rel != row.max_rel else f"{row.max_rel:.3g}",
            f"{row.atol:g} / {row.rtol:g}",
            verdict + (f" {row.detail}" if row.detail else ""),
        )
    console.print(table)


def write_report(build_dir: Path, sections: dict[str, list[ParityRow]]) -> Path:
    """parity.json: every row per section and the overall verdict; written via a temporary file."""
    report = {
        "passed": all(row.passed for rows in sections.values() for row in rows),
        **{name: [asdict(row) for row in rows] for name, rows in sections.items()},
    }
    path = Path(build_dir) / REPORT_NAME
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(path)
    return path
