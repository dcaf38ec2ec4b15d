"""LLaVA family: transformers LlavaForConditionalGeneration, CLIP or SigLIP tower, Llama or Qwen2 text model.

    pixel_values [B, 3, S, S] → vision tower → hidden_states[vision_feature_layer]  (CLS dropped for CLIP)
        → features [B, N, Dv] → (ApET stage 1) → multi_modal_projector → image_embeds [B, T, H]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from apet_export.models.base import ModelFamily, VisionDims

if TYPE_CHECKING:  # imported where the model runs: the runtime hooks need neither torch nor transformers
    import torch

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class LlavaFamily(ModelFamily):
    name = "llava"
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    apet_variant = "llava"  # released llava_arch.py (vision stage) + modeling_llama_x.py layer_prune (LLM stage)

    def vision_dims(self, model, processor=None) -> VisionDims:
        config = model.config
        vision = config.vision_config
        grid = vision.image_size // vision.patch_size
        return VisionDims(vision.image_size, grid * grid, vision.hidden_size, config.text_config.hidden_size)

    def _has_cls(self, model) -> bool:
        return model.config.vision_feature_select_strategy == "default"

    def _hidden_states(self, model, pixel_values: torch.Tensor):
        tower = model.model.vision_tower
        return tower(pixel_values, output_hidden_states=True).hidden_states  # num_layers + 1 entries

    def vision_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._features(model, self._hidden_states(model, pixel_values))

    def vision_features_and_attention(self, model, pixel_values: torch.Tensor):
        hidden = self._hidden_states(model, pixel_values)  # one tower pass serves both
        return self._features(model, hidden), self._attention(model, hidden)

    def _features(self, model, hidden) -> torch.Tensor:
        layer = model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise NotImplementedError("multi-layer vision features (a list of layers) are not supported yet")
        features = hidden[layer]  # [B, (1+)N, Dv]
        return features[:, 1:] if self._has_cls(model) else features

    def _attention(self, model, hidden) -> torch.Tensor:
        """The attention of the feature layer, recomputed from its q/k without the full [S, S] matrix."""
        from apet_export.compression.baselines import attention_received, cls_attention_from_qk

        layer_index = model.config.vision_feature_layer
        layers = model.model.vision_tower.encoder.layers
        encoder_layer = layers[layer_index]
        # hidden[i] is the input of encoder layer i (hidden[0] = embeddings).
        layer_input = hidden[layer_index % (len(layers) + 1) - 1]
        attention = encoder_layer.self_attn
        normed = encoder_layer.layer_norm1(layer_input)  # [B, S, Dv]
        heads = attention.num_heads
        batch, seq, dim = normed.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # [B, S, Dv] -> [B, heads, S, Dv/heads]
            return t.view(batch, seq, heads, dim // heads).transpose(1, 2)

        query, key = split(attention.q_proj(normed)), split(attention.k_proj(normed))
        if self._has_cls(model):
            return cls_attention_from_qk(query, key)
        return attention_received(query, key)

    def project(self, model, features: torch.Tensor) -> torch.Tensor:
        return model.model.multi_modal_projector(features)


# Sizes of the random presets: tiny for tests, real shapes for benchmarks.
TINY_TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
CLIP_L_TOWER = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
QWEN2_0_5B_TEXT = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2)
# Qwen2's real embedding rows: the LM head and the embedding table are then the real model's size (a third of
# Qwen2-0.5B's weights); the tiny tokenizer uses the first 512 ids, as Qwen2's own tokenizer leaves rows unused
QWEN2_VOCAB = dict(vocab_size=151936)


def random_llava_config(tokenizer, tower: str, tower_size: dict, text_size: dict, text_model: str):
    """A LLaVA config of the real classes: tower 'clip' (336 px / 14 = 576 tokens + CLS) or 'siglip'
    (224 px / 14 = 256 tokens), text_model 'llama' or 'qwen2'."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config, SiglipVisionConfig

    text = dict(
        vocab_size=len(tokenizer), max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    text.update(text_size)  # sizes, and a vocabulary larger than the tokenizer's where a preset names one
    text_config = LlamaConfig(**text) if text_model == "llama" else Qwen2Config(**text, use_sliding_window=False)
    if tower == "clip":
        vision = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, **tower_size)
        strategy = "default"  # drop CLS
    else:
        vision = SiglipVisionConfig(image_size=224, patch_size=14, vision_use_head=False, **tower_size)
        strategy = "full"  # no CLS
    return LlavaConfig(
        vision_config=vision, text_config=text_config, image_token_index=tokenizer.image_token_id,
        image_seq_length=(vision.image_size // 14) ** 2, vision_feature_layer=-2,
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu", tie_word_embeddings=False,
    )


def build_random_llava(
    out_dir: Path, tower: str, text_model: str, tower_size: dict = TINY_TOWER, text_size: dict = TINY_TEXT,
    seed: int = 0,
) -> None:
    """Write a randomly initialised LLaVA checkpoint + processor to out_dir (no downloads)."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessorPil,
    )

    from apet_export.models.tokenizer import CHAT_TEMPLATE, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = random_llava_config(tokenizer, tower, tower_size, text_size, text_model)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # Random init gives logits of std ~0.16: widen the gaps between the top candidates so that greedy
    # token parity between backends is decided by the model, not by rounding.
    with torch.no_grad():
        model.lm_head.weight.mul_(math.sqrt(config.text_config.hidden_size))
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id

    side = config.vision_config.image_size
    if tower == "clip":
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_center_crop=True,
            image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
        )
    else:
        image_processor = SiglipImageProcessorPil(
            size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if tower == "clip" else 0,  # CLIP's CLS, removed again by "default"
        chat_template=CHAT_TEMPLATE, image_token="<image>",
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
