"""`apet-export visualize`: the image, its approximation-error heatmap and the kept tokens, side by side."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from apet_export.manifest import load_manifest
from apet_export.runtime.images import load_image
from apet_export.runtime.sessions import onnxruntime_session


def visualize_build(build_dir: Path, image_path: Path, budget: int | None, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from apet_export.models.registry import get_family

    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    budget = budget or manifest.budget["default"]  # None: the family's share of the image's tokens
    if budget is not None:
        manifest.check_budget(budget)
    image = load_image(image_path)
    family = get_family(manifest.family)
    (feed, *_), (layout, *_) = family.vision_feeds(family.load_processor(build_dir / "model"), [image], budget, manifest)
    session = onnxruntime_session(manifest.file(build_dir, "vision"))
    _, keep_index, scores = session.run(None, feed)

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
    right.set_title(f"kept tokens: {budget} of {num_tokens}")
    for axis in (left, middle, right):
        axis.axis("off")
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp{os.getpid()}.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    temporary.replace(output)
