"""LLaVA-NeXT any-resolution: packing equals transformers without compression, the released index-mask
packing under compression, parity of every artifact, budget split across crops, TensorRT-RTX parse."""

import numpy as np
import pytest
import torch

from apet_export.errors import InvalidInputError
from apet_export.manifest import load_manifest
from apet_export.models.llava_next import PINPOINTS, crops_of, pack_crops, tile_grid, unpad_cells
from apet_export.parity.e2e import e2e_parity
from apet_export.parity.run import run_parity
from apet_export.runtime.images import synthetic_image
from apet_export.runtime.pipeline import Pipeline
from tests.conftest import linked_copy
from tests.tensorrt_parse import check_build_parses


def test_pack_crops_scatters_kept_tokens_unpads_and_ends_rows_with_newline():
    """grid 4x4 per crop, one row of two tiles (4 x 8 cells); a 20 x 100 image unpads to grid rows 1-2."""
    grid, hidden = 4, 3
    index = np.array([[0, 5, 9], [0, 5, 12], [3, 6, 15]])  # crops: base, tile (0, 0), tile (0, 1)
    embeds = np.stack([np.stack([np.full(hidden, 100 * c + i, np.float32) for i in index[c]]) for c in range(3)])
    newline = np.full(hidden, -1.0, np.float32)
    rows = pack_crops(embeds, index, (20, 100), [[56, 112]], 56, grid, newline)
    # tile cells (row, col) on the 4 x 8 grid: tile 1 -> (0,0) (1,1) (3,0); tile 2 -> (0,7) (1,6) (3,7)
    # rows 0 and 3 are padding and go, with their kept tokens; rows 1 and 2 remain, each ends with a newline
    expected = [0, 5, 9, 105, 206, -1, -1]
    np.testing.assert_array_equal(rows[:, 0], expected)
    assert rows.shape == (7, hidden)


def test_grid_helpers_equal_transformers():
    """The numpy any-resolution grid the runtime packs rows with (no torch) equals transformers' helpers, on
    image sizes of every aspect ratio around the pinpoints' breakpoints."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    sizes = [(h, w) for h in (1, 20, 199, 336, 337, 500, 671, 672, 1008, 3000) for w in (1, 30, 336, 500, 672, 1009, 4000)]
    for size in sizes:
        assert crops_of(size, PINPOINTS, 336) == image_size_to_num_patches(size, PINPOINTS, 336), size
        assert tile_grid(size, PINPOINTS, 336) == get_anyres_image_grid_shape(size, PINPOINTS, 336), size
        tiles_high, tiles_wide = tile_grid(size, PINPOINTS, 336)
        cells = np.arange(tiles_high * 24 * tiles_wide * 24 * 2, dtype=np.float32).reshape(tiles_high * 24, tiles_wide * 24, 2)
        expected = unpad_image(torch.from_numpy(cells).permute(2, 0, 1), size).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(unpad_cells(cells, size), expected)


@pytest.fixture(scope="module")
def torch_pipeline(llava_next_build):
    with Pipeline.from_dir(llava_next_build, backend="torch") as pipeline:
        yield pipeline


# one size in the default run; the other tilings (a tall picture, the base resolution) are `slow` (.ci/run)
@pytest.mark.parametrize("size", [(500, 300), pytest.param((300, 700), marks=pytest.mark.slow),
                                  pytest.param((336, 336), marks=pytest.mark.slow)])
def test_uncompressed_rows_and_logits_equal_transformers(torch_pipeline, size):
    image = synthetic_image(1, size)
    model, processor = torch_pipeline.backend.model, torch_pipeline.processor
    (rows,), _, _ = torch_pipeline.encode_images([image], 5 * 576)  # every crop uncompressed
    inputs = processor(images=[image], text=torch_pipeline.tokenizer.decode(torch_pipeline.prompt_ids("Hi", 1)),
                       return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        expected = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        logits = model(**inputs).logits[0, -1].numpy()
    np.testing.assert_array_equal(rows, expected.pooler_output[0].numpy())
    result = torch_pipeline.generate([image], "Hi", budget=5 * 576, max_new_tokens=1, stream=False)
    assert result.image_tokens == len(rows)
    np.testing.assert_allclose(result.first_logits, logits, atol=1e-4)


def test_budget_is_split_across_crops(torch_pipeline):
    image = synthetic_image(2, (500, 300))  # best grid 1 x 2 tiles: 3 crops
    calls = []
    infer = torch_pipeline.backend.vision.infer

    def logged(feed, **kwargs):
        calls.append((feed["pixel_values"].shape[0], int(feed["keep"])))
        return infer(feed, **kwargs)

    torch_pipeline.backend.vision.infer = logged
    try:
        (rows,), _, _ = torch_pipeline.encode_images([image], 160)
    finally:
        torch_pipeline.backend.vision.infer = infer
    assert calls == [(3, 53)]  # one call, all crops, 160 // 3 each
    assert 53 < len(rows) <= 3 * 53 + 24  # unpadding drops some tile tokens; <= 24 newline rows
    with pytest.raises(InvalidInputError, match="tokens per crop: pass at least 33"):
        torch_pipeline.generate([image], "Hi", budget=30, stream=False)  # known once the image is tiled
    with pytest.raises(InvalidInputError, match=r"outside \[11, 2880\]"):
        torch_pipeline.generate([image], "Hi", budget=3000)


def test_vision_and_e2e_parity(llava_next_build, tmp_path):
    """Vision: both graphs at whole-image budgets 160, 640 and 2880 (32, 128 and 576 per crop of 5), each
    image's crops in one call; e2e: greedy 32 tokens at budgets 160 and 640 per image and uncompressed (5 x 576)."""
    vision = run_parity(linked_copy(llava_next_build, tmp_path / "build"), budgets=[160, 640, 2880], e2e=False)["vision"]
    assert all(row.passed for row in vision), [row for row in vision if not row.passed]
    worst = max((row for row in vision if row.output == "image_embeds"), key=lambda r: r.max_abs)
    print(f"largest image_embeds diff: {worst.max_abs:.3g} ({worst.check})")
    image = synthetic_image(0, (500, 300))
    e2e = e2e_parity(llava_next_build, load_manifest(llava_next_build), image, budgets=[160, 640, 5 * 576])
    for row in e2e:
        print(row.check, row.output, row.max_abs, row.detail)
    assert all(row.passed for row in e2e), [row for row in e2e if not row.passed]
    assert len(e2e) == 6 and all(r.detail == "identical (32 tokens)" for r in e2e if r.output == "token_ids")


def test_graphs_parse_in_tensorrt_rtx(llava_next_build):
    check_build_parses(llava_next_build)


@pytest.mark.slow  # a split build of its own (~30 s); stage 2 is covered in the default run on tiny-llava
def test_two_stage_compresses_the_base_image_in_the_llm(llava_next_two_stage_build):
    """The released LLaVA-NeXT LLM stage cuts the base image's rows (192 -> 64 there) and leaves the tiles alone:
    layers >= K see the stage-1 rows minus the base crop's cut. Greedy tokens identical on onnxruntime and torch."""
    from apet_export.models.registry import budget_policy

    build = llava_next_two_stage_build
    manifest = load_manifest(build)
    resolve = budget_policy(manifest).resolve
    assert manifest.stage2["layer"] == 2 and manifest.compression.variant == "llava"
    assert resolve() == (240, 80)  # the average 160, split 3:1 over the whole image
    from apet_export.parity.e2e import e2e_cases

    # parity's default cases: the paper's 64 and 192 per crop (5 crops at most), e.g. 960 = 192/crop after stage 1
    assert e2e_cases(manifest, None, None) == [{"budget": 320}, {"budget": 960}]
    assert resolve(960) == (1440, 480)
    image = synthetic_image(2, (500, 300))  # best grid 1 x 2 tiles: 3 crops
    e2e = e2e_parity(build, manifest, image, pair=(240, 96), max_new_tokens=16)
    for row in e2e:
        print(row.check, row.output, row.max_abs, row.detail)
    assert e2e and all(row.passed for row in e2e), [row for row in e2e if not row.passed]
    with Pipeline.from_dir(build, backend="onnxruntime") as pipeline:
        result = pipeline.generate([image], "Hi", budget1=240, budget2=96, max_new_tokens=1, stream=False)
        assert result.image_tokens - result.image_tokens_stage2 == 240 // 3 - 96 // 3  # base crop 80 -> 32 rows
        with pytest.raises(InvalidInputError, match="keeps 10 rows of the base image"):
            pipeline.generate([image], "Hi", budget1=240, budget2=30, max_new_tokens=1, stream=False)
