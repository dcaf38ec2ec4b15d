"""`apet-export parity DIR`: every artifact against eager PyTorch; table, parity.json, verdict."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from apet_export.errors import InvalidInputError, ParityError
from apet_export.manifest import load_manifest
from apet_export.models.registry import budget_policy
from apet_export.parity.feeds import vision_feeds
from apet_export.parity.report import ParityRow, print_table, write_report
from apet_export.parity.vision import vision_parity
from apet_export.runtime.images import load_image, synthetic_image


def run_parity(
    build_dir: Path, image_paths: list[Path] | None = None, budgets: list[int] | None = None,
    e2e: bool = True, console: Console | None = None, pair: tuple[int, int] | None = None, thresholds=None,
    require_tensorrt: bool = False,
) -> dict[str, list[ParityRow]]:
    """pair: an explicit (stage-1, stage-2) budget for the e2e check of a two-stage build.
    require_tensorrt: not running the TensorRT engines (no GPU, no engines for it) is an error, not a skip."""
    console = console or Console()
    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    manifest.check_files(build_dir)  # a damaged build fails before any table is printed
    if manifest.quantization:  # a calibrated build: its accuracy cost against fp32 and eager PyTorch
        from apet_export.parity.quantized import run_quantized_parity

        if require_tensorrt:  # that comparison runs on onnxruntime: requiring TensorRT there would be a lie
            raise InvalidInputError(
                f"{build_dir} is a calibrated build, whose accuracy parity runs on onnxruntime without TensorRT: drop "
                f"--require-tensorrt (its engines run with `apet-export run {build_dir} --backend tensorrt`)"
            )

        return {"accuracy": run_quantized_parity(build_dir, image_paths, thresholds, console)}
    policy = budget_policy(manifest)
    budgets = budgets or policy.within(policy.scaled((16, 64, 192, manifest.budget["max"])))
    for budget in budgets:
        policy.check(budget)
    images = [load_image(p) for p in image_paths] if image_paths else []
    # batch 2 needs two; the second is portrait, so dynamic-resolution families see two grid shapes
    images += [synthetic_image(seed, (400, 300) if seed == 0 else (300, 500)) for seed in range(len(images), 2)]

    from apet_export.runtime.backends.trt import available_engines, tensorrt_skip_reason

    # TensorRT runs where it can and says why not; engines for this GPU that cannot be used raise
    skipped = tensorrt_skip_reason(build_dir, manifest, require=require_tensorrt)
    engines = None if skipped else available_engines(build_dir, manifest)
    feeds = vision_feeds(build_dir, manifest, images, budgets)
    sections = {"vision": vision_parity(build_dir, manifest, feeds, tensorrt=engines)}
    print_table(sections["vision"], console, title="vision graphs vs eager PyTorch")
    if manifest.stage2:
        from apet_export.parity.stage2 import stage2_parity

        sections["stage2"] = stage2_parity(build_dir, manifest)
        print_table(sections["stage2"], console, title="ApET stage 2 (stage2.onnx) vs eager apet_compress")
    if e2e and ("llm" in manifest.files or manifest.stage2):
        from apet_export.parity.e2e import e2e_parity

        sections["e2e"] = e2e_parity(build_dir, manifest, images[0], pair=pair)
        print_table(sections["e2e"], console, title="end-to-end generation: onnxruntime vs torch")
        if engines and ({"llm_a", "stage2", "llm_b"} <= set(engines) if manifest.stage2 else "llm" in engines):
            sections["e2e_tensorrt"] = e2e_parity(build_dir, manifest, images[0], backend="tensorrt", pair=pair)
            print_table(sections["e2e_tensorrt"], console, title="end-to-end generation: tensorrt vs torch")
    if skipped:
        console.print(f"tensorrt: skipped ({skipped})")
    path = write_report(build_dir, sections, console) or "no report (parity.json could not be written)"
    failed = [row for rows in sections.values() for row in rows if not row.passed]
    if failed:
        worst = max(failed, key=lambda r: r.max_abs)
        raise ParityError(
            f"{len(failed)} parity check(s) failed (worst: {worst.check} {worst.output} max abs diff "
            f"{worst.max_abs:.3g} > atol {worst.atol:g}); details in {path}"
        )
    console.print(f"[green]all {sum(len(r) for r in sections.values())} parity checks passed[/green]; report: {path}")
    return sections
