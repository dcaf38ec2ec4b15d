"""`apet-export parity DIR`: every artifact against eager PyTorch; table, parity.json, verdict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console

from apet_export.errors import ParityError
from apet_export.manifest import load_manifest
from apet_export.parity.report import ParityRow, print_table, write_report
from apet_export.parity.vision import vision_parity
from apet_export.runtime.images import load_image, synthetic_image


def preprocess(build_dir: Path, images) -> np.ndarray:
    """PIL images -> pixel_values [K, 3, S, S] float32 with the build's saved processor."""
    from transformers import AutoProcessor

    from apet_export.manifest import load_manifest
    from apet_export.models.registry import get_family

    processor = AutoProcessor.from_pretrained(Path(build_dir) / "model", backend="pil")
    return get_family(load_manifest(build_dir).family).preprocess_crops(processor, images)  # LLaVA-NeXT: all crops


def run_parity(
    build_dir: Path, image_paths: list[Path] | None = None, budgets: list[int] | None = None,
    e2e: bool = True, console: Console | None = None,
) -> dict[str, list[ParityRow]]:
    console = console or Console()
    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    budgets = budgets or manifest.budgets_within((16, 64, 192, manifest.budget["max"]))
    for budget in budgets:
        manifest.check_budget(budget)
    images = [load_image(p) for p in image_paths] if image_paths else []
    images += [synthetic_image(seed) for seed in range(len(images), 2)]  # batch 2 needs two
    pixel_values = preprocess(build_dir, images)

    sections = {"vision": vision_parity(build_dir, manifest, pixel_values, budgets)}
    print_table(sections["vision"], console, title="vision graphs vs eager PyTorch")
    if e2e and "llm" in manifest.files:
        from apet_export.parity.e2e import e2e_parity

        sections["e2e"] = e2e_parity(build_dir, manifest, images[0])
        print_table(sections["e2e"], console, title="end-to-end generation: onnxruntime vs torch")
    path = write_report(build_dir, sections)
    failed = [row for rows in sections.values() for row in rows if not row.passed]
    if failed:
        worst = max(failed, key=lambda r: r.max_abs)
        raise ParityError(
            f"{len(failed)} parity check(s) failed (worst: {worst.check} {worst.output} max abs diff "
            f"{worst.max_abs:.3g} > atol {worst.atol:g}); details in {path}"
        )
    console.print(f"[green]all {sum(len(r) for r in sections.values())} parity checks passed[/green]; report: {path}")
    return sections
