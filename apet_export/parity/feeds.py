"""The vision-graph feeds every parity check uses, built by the family as the runtime builds them."""

from __future__ import annotations

from pathlib import Path

from apet_export.models.registry import get_family


def vision_feeds(build_dir: Path, manifest, images, budgets: list[int], batches=(1, 2)) -> list[dict]:
    """The vision-graph feeds of the first 1 and 2 images at each budget, built as the pipeline builds them
    (one batched feed for LLaVA, one per image for dynamic-resolution families; repeats dropped)."""
    family = get_family(manifest.family)
    processor = family.load_processor(manifest.model_dir(build_dir))
    feeds, seen = [], set()
    for budget in budgets:
        for batch in batches:
            for feed in family.vision_feeds(processor, images[:batch], budget, manifest)[0]:
                key = (family.feed_label(feed), int(feed["keep"]))
                if key not in seen:
                    seen.add(key)
                    feeds.append(feed)
    return feeds
