"""`apet-export visualize`: the image, its approximation-error heatmap and the kept tokens, side by side."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from apet_export.errors import InvalidInputError, MissingDependencyError
from apet_export.manifest import load_manifest
from apet_export.outputs import check_output_file, describe
from apet_export.runtime.images import load_image, synthetic_image
from apet_export.runtime.sessions import onnxruntime_session


def basis_positions(build_dir: Path, manifest, feed: dict[str, np.ndarray], budget: int) -> list[int]:
    """ApET's basis tokens in FPS order, from the eager reference (the graphs do not output them)."""
    if manifest.method != "apet":
        return []
    import torch

    from apet_export.compression import apet_compress
    from apet_export.models.registry import get_family

    family = get_family(manifest.family)
    model, _ = family.load(manifest.model_dir(build_dir))
    with torch.inference_mode():
        features, _ = family.eager_features(model, feed)  # [1, N(+prefix), D]
        _, features = family.split_prefix(model, features)  # the rows ApET sees (Video-LLaVA: no CLS)
        return apet_compress(features, budget, manifest.compression).basis_index[0].tolist()


def output_format(output: Path) -> str:
    """The file format -o names by its suffix (png, jpg, pdf, svg, webp ...), checked before any work."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    suffix = output.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise InvalidInputError(
            f"-o {output}: {'its suffix .' + suffix if suffix else 'no suffix'} names no image format this can "
            f"write: end the name with one of {', '.join('.' + f for f in sorted(formats))}, e.g. .png"
        )
    return suffix


def visualize_build(build_dir: Path, image_path: Path | None, budget: int | None, output: Path) -> None:
    """image_path None: the generated test picture `run` uses."""
    try:
        import matplotlib
    except ImportError as error:
        raise MissingDependencyError(
            f"visualize draws with matplotlib, which is not installed ({error}): pip install 'apet-export[viz]'"
        ) from error

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from apet_export.models.registry import get_family

    build_dir, output = Path(build_dir), Path(output)
    if output.is_dir():
        raise InvalidInputError(f"-o {output} is a folder: pass the PNG file to write, e.g. {output / 'apet.png'}")
    file_format = output_format(output)
    manifest = load_manifest(build_dir)
    check_output_file(output, "-o")  # before the work, after the build is known to be readable
    from apet_export.models.registry import budget_policy

    budget, _ = budget_policy(manifest).resolve(budget)  # None: the family's share of the image's tokens
    image = load_image(image_path) if image_path is not None else synthetic_image(0)
    family = get_family(manifest.family)
    feeds, layouts = family.vision_feeds(family.load_processor(manifest.model_dir(build_dir)), [image], budget, manifest)
    (feed, *_), (layout, *_) = feeds, layouts
    session = onnxruntime_session(manifest.file(build_dir, "vision"))
    _, keep_index, scores = session.run(None, feed)
    basis = basis_positions(build_dir, manifest, feed, keep_index.shape[1])

    num_tokens, budget = scores.shape[1], keep_index.shape[1]
    if layout is None:  # square input [1, 3, S, S], square token grid
        rows = cols = math.isqrt(num_tokens)
        shown = feed["pixel_values"][0].transpose(1, 2, 0)
        shown = (shown - shown.min()) / max(float(np.ptp(shown)), 1e-6)  # undo normalisation for display
    else:  # dynamic resolution: a (t, rows, cols) merged grid over the image as the processor resized it
        _, rows, cols = layout
        shown = np.asarray(image.resize((cols * 28, rows * 28)), dtype=np.float32) / 255
    height, width = shown.shape[:2]
    patch = width / cols

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 5.4))
    left.imshow(shown)
    left.set_title("input (as the model sees it)")
    middle.imshow(shown)
    heat = middle.imshow(scores[0].reshape(rows, cols), cmap="inferno", alpha=0.6, extent=(0, width, height, 0))
    middle.set_title(f"{manifest.method} score per token")
    figure.colorbar(heat, ax=middle, fraction=0.046)
    right.imshow(shown * 0.35)
    for index in keep_index[0]:
        row, col = divmod(int(index), cols)
        right.add_patch(Rectangle((col * patch, row * patch), patch, patch, fill=False, edgecolor="lime", lw=1.2))
    for order, index in enumerate(basis, start=1):  # numbered in selection (FPS) order
        row, col = divmod(index, cols)
        right.add_patch(Rectangle((col * patch, row * patch), patch, patch, fill=False, edgecolor="cyan", lw=2))
        right.text((col + 0.5) * patch, (row + 0.5) * patch, str(order), color="cyan", fontsize=7,
                   ha="center", va="center", fontweight="bold")
    basis_note = f"\nbasis tokens 1-{len(basis)} in selection order (cyan)" if basis else ""
    right.set_title(f"kept tokens: {budget} of {num_tokens} (green){basis_note}")
    for axis in (left, middle, right):
        axis.axis("off")
    figure.tight_layout()
    temporary = output.with_name(f".{output.name}.tmp{os.getpid()}.{file_format}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(temporary, dpi=100, format=file_format)
        temporary.replace(output)
    except OSError as error:
        raise InvalidInputError(f"cannot write {output} ({describe(error)}): nothing was written; choose another -o") from error
    finally:
        plt.close(figure)
        temporary.unlink(missing_ok=True)
