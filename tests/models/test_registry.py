import json

import pytest
import torch

from apet_export.errors import ArtifactError, UnknownNameError
from apet_export.models.registry import FAMILIES, PRESETS, family_for_checkpoint, prepare_checkpoint


def test_every_family_has_a_tiny_preset():
    families_with_presets = {preset.family for preset in PRESETS.values() if preset.tiny}
    missing = set(FAMILIES) - families_with_presets
    assert not missing, f"families without a tiny preset: {missing}"


@pytest.mark.parametrize(
    ("preset", "tower", "text", "tokens"),
    [("tiny-llava", "CLIPVisionModel", "LlamaModel", 576), ("tiny-llava-siglip-qwen2", "SiglipVisionModel", "Qwen2Model", 256)],
)
def test_preset_is_the_real_hf_classes_and_deterministic(tmp_path, preset, tower, text, tokens):
    for name in ("a", "b"):
        prepare_checkpoint(preset, tmp_path / name)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    family = family_for_checkpoint(tmp_path / "a")
    model, processor = family.load(tmp_path / "a")
    assert type(model.model.vision_tower).__name__ == tower
    assert type(model.model.language_model).__name__ == text
    assert model.model.language_model.config.num_hidden_layers >= 4
    dims = family.vision_dims(model)
    assert dims.num_tokens == tokens
    # the processor expands <image> to exactly N placeholders
    from apet_export.runtime.images import synthetic_image

    inputs = processor(images=synthetic_image(), text="USER: <image>\nHi ASSISTANT:", return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tokens
    features = family.vision_features(model, inputs["pixel_values"])
    assert features.shape == (1, tokens, dims.vision_hidden)


def test_tokenizer_round_trips_multibyte_text(tmp_path):
    from transformers import AutoTokenizer

    prepare_checkpoint("tiny-llava", tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = "café 日本語 ✓ 😀 naïve Ω"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<s>USER: hi ASSISTANT:"


def test_cls_attention_matches_hf_attention_weights(tmp_path):
    prepare_checkpoint("tiny-llava", tmp_path)
    family = family_for_checkpoint(tmp_path)
    model, _ = family.load(tmp_path, attn_implementation="eager")
    pixels = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        attention = model.model.vision_tower(pixels, output_attentions=True).attentions[-2]  # [B, H, S, S]
        features, cls_attention = family.vision_features_and_attention(model, pixels)
        torch.testing.assert_close(cls_attention, attention[:, :, 0, 1:].sum(1))
        torch.testing.assert_close(features, family.vision_features(model, pixels))


def test_unknown_model_and_bad_checkpoint(tmp_path):
    with pytest.raises(UnknownNameError, match="tiny-llava"):
        prepare_checkpoint("no-such-model", tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no config.json"):
        prepare_checkpoint(str(tmp_path / "empty"), tmp_path / "y")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(UnknownNameError, match="whisper"):
        prepare_checkpoint(str(tmp_path / "other"), tmp_path / "z")
