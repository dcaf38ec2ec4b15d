"""Qwen2.5-VL family: the preset, the exportable ViT against HF's own forward, M-RoPE positions against
HF's get_rope_index, and the per-image budget."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from apet_export.errors import InvalidInputError
from apet_export.models.qwen2_5_vl import QwenVLFamily
from apet_export.models.registry import family_for_checkpoint, prepare_checkpoint
from apet_export.runtime.images import synthetic_image

LAYOUT = ("pixel_values", "patch_positions", "window_index", "window_patch", "window_slot")


def manifest(method="apet", budget=None):
    return SimpleNamespace(method=method, budget={"default": budget, "min": 11, "max": 64, "ratio": 0.3}, stage2={}, dims={})


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen") / "ckpt"
    prepare_checkpoint("tiny-qwen2.5-vl", path)
    family = family_for_checkpoint(path)
    model, processor = family.load(path)
    return path, family, model, processor


def test_preset_is_the_real_hf_classes_and_deterministic(tmp_path, qwen):
    path, family, model, processor = qwen
    prepare_checkpoint("tiny-qwen2.5-vl", tmp_path / "again")
    assert (path / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    assert isinstance(family, QwenVLFamily)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(model.model.visual).__name__ == "Qwen2_5_VisionTransformerPretrainedModel"
    assert type(model.model.language_model).__name__ == "Qwen2_5_VLTextModel"
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    tokenizer = processor.tokenizer
    for name in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"):
        assert tokenizer.convert_tokens_to_ids(name) not in (None, tokenizer.unk_token_id), name
    assert tokenizer.image_token_id == model.config.image_token_id
    assert tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    assert "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>" in text and text.endswith("assistant\n")
    assert family.vision_dims(model, processor).num_tokens == 64  # max_pixels / 28²


@pytest.mark.parametrize("size", [(400, 300), (300, 500), (640, 200)])
def test_exportable_vit_matches_hf_forward(qwen, size):
    _, family, model, processor = qwen
    (feed,), (layout,) = family.vision_feeds(processor, [synthetic_image(1, size)], None, manifest())
    with torch.no_grad():
        reference, _ = family.eager_features(model, feed)  # HF: per-window attention over cu_seqlens
        ours = family.vision_features(model, *(torch.from_numpy(feed[k]) for k in LAYOUT))
    t, rows, cols = layout
    assert reference.shape == ours.shape == (1, t * rows * cols, model.config.vision_config.out_hidden_size)
    diff = (reference - ours).abs().max().item()
    print(f"{size}: grid {layout}, max |diff| {diff:.3g}")
    assert diff <= 1e-5


def test_window_attention_is_not_full_attention(qwen, monkeypatch):
    """Guards the test above: treating every block as full attention changes the features."""
    _, family, model, processor = qwen
    (feed,), _ = family.vision_feeds(processor, [synthetic_image(1)], None, manifest())
    with torch.no_grad():
        reference, _ = family.eager_features(model, feed)
        monkeypatch.setattr(model.model.visual, "fullatt_block_indexes", list(range(len(model.model.visual.blocks))))
        all_full = family.vision_features(model, *(torch.from_numpy(feed[k]) for k in LAYOUT))
    assert (reference - all_full).abs().max().item() > 1e-3


def expand_and_rope(model, ids, layouts):
    """HF's positions for the uncompressed prompt: each image placeholder expanded to its t*rows*cols tokens."""
    image_token_id = model.config.image_token_id
    merge = model.config.vision_config.spatial_merge_size
    expanded, image = [], 0
    for token in ids:
        if token == image_token_id:
            t, rows, cols = layouts[image]
            expanded += [token] * (t * rows * cols)
            image += 1
        else:
            expanded.append(token)
    input_ids = torch.tensor([expanded])
    grid = torch.tensor([[t, rows * merge, cols * merge] for t, rows, cols in layouts])
    mm_types = (input_ids == image_token_id).int()
    positions, delta = model.model.get_rope_index(input_ids, mm_token_type_ids=mm_types, image_grid_thw=grid)
    return positions.numpy(), int(delta)


def test_positions_match_hf_without_compression_and_keep_theirs_with(qwen):
    _, family, model, processor = qwen
    image_token_id = model.config.image_token_id
    images = [synthetic_image(1), synthetic_image(2, (300, 500))]
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}],
        add_generation_prompt=True, tokenize=False,
    )
    ids = processor.tokenizer(text, add_special_tokens=False).input_ids
    feeds, layouts = family.vision_feeds(processor, images, None, manifest())
    full_index = [np.arange(t * r * c) for t, r, c in layouts]
    ours, delta = family.position_ids(ids, image_token_id, layouts, full_index)
    expected, expected_delta = expand_and_rope(model, ids, layouts)
    assert ours.shape == expected.shape and (ours == expected).all() and delta == expected_delta

    # Compressed: each kept token keeps its full-grid position; text positions are unchanged (gaps allowed).
    kept = [np.sort(np.random.default_rng(i).choice(len(f), size=int(feed["keep"]), replace=False))
            for i, (f, feed) in enumerate(zip(full_index, feeds, strict=True))]
    compressed, compressed_delta = family.position_ids(ids, image_token_id, layouts, kept)
    selected, column, image = [], 0, 0  # columns of the uncompressed prompt that survive
    for token in ids:
        if token == image_token_id:
            selected += list(column + kept[image])
            column += len(full_index[image])
            image += 1
        else:
            selected.append(column)
            column += 1
    assert (compressed == expected[:, :, selected]).all()
    assert compressed.shape[-1] == len(ids) - 2 + sum(len(k) for k in kept)
    # the next token continues from the same position as without compression
    assert compressed.shape[-1] + compressed_delta == expected.shape[-1] + expected_delta
    assert (family.decode_position_ids(compressed.shape[-1], compressed_delta) == expected.max() + 1).all()


def test_per_image_budget(qwen):
    _, family, _, _ = qwen
    policy = family.budget_policy(manifest())
    assert policy.per_image(None, 54) == 16  # int(0.3 * 54): the released default
    assert policy.per_image(None, 20) == 11  # floored at M + 1
    assert policy.per_image(32, 54) == 32
    assert policy.per_image(64, 54) == 54  # a budget over N keeps everything
    assert family.budget_policy(manifest("none")).per_image(16, 54) == 54
    with pytest.raises(InvalidInputError, match="larger image"):
        policy.per_image(None, 8)
