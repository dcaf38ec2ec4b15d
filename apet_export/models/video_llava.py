"""Video-LLaVA family: transformers VideoLlavaForConditionalGeneration, video path, one frame at a time.

    frame pixel_values [F, 3, 224, 224] → video tower → hidden_states[-2] [F, 1+N, Dv]
        → multi_modal_projector → [F, 1+N, H] ─┬─ CLS row [F, 1, H]        kept whole, in front
                                              └─ patch rows [F, N, H] → (ApET stage 1, budget T per frame)
    image_embeds [F, 1+T, H]; the LLM sees the F frames' rows in order where the prompt has <video>.

Why this route (not the LLaVA image path with frames as images): it is the model the paper evaluates,
transformers ships it, and the released ApET code for it (video-llava/videollava/model/llava_arch.py,
`encode_videos`) compresses each frame separately, after the projector, keeping the frame's CLS row in
front: 8 frames x (1 CLS + 22 merged + 10 basis) = 8 x 33 tokens. The transformers video tower runs on
each frame independently (frames are folded into the batch), so a frame can be encoded the moment it
arrives.

ApET variant "video_llava" (the default, what the authors ran): per frame [CLS row, the T-M highest-error
tokens in top-k (descending error) order, each merged with all N-(T-M) other tokens, then the M basis
features in FPS order]. The rows are then not in patch order: keep_index gives the patch each row stands
for (basis rows: the basis tokens' patches). The LLM's positions are 1-D and contiguous over the rows, so
the row order is what the LLM sees, as in the released code. `build --apet-variant uniform` runs the image
rule instead (rows in ascending patch order, basis features in the M lowest-error slots).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from apet_export.config import AxisRange, TensorSpec
from apet_export.models.base import ModelFamily, VisionDims, rename_axis
from apet_export.models.llava import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TINY_TEXT, TINY_TOWER

VIDEO_TOKEN = "<video>"
if TYPE_CHECKING:  # imported where the model runs: the runtime hooks need neither torch nor transformers
    import torch

FRAMES_PER_VIDEO = 8  # the model's video_seq_length = 8 x 257 rows


class VideoLlavaFamily(ModelFamily):
    name = "video_llava"
    model_types = ("video_llava",)
    media = "video"
    budget_unit = "frames"  # a request's budget is for the whole video, split evenly over its frames
    prefix_tokens = 1  # the frame's CLS row
    exportable_methods = ("apet", "none")  # VisionZip is not wired up for the video tower
    fixed_image_rows = False  # a video placeholder becomes F x (1 + T) rows
    model_class = "VideoLlavaForConditionalGeneration"
    apet_variant = "video_llava"  # released encode_videos: merged rows in top-k order, basis rows appended
    stage2_refusal = ("the released Video-LLaVA code compresses each frame once, after the projector (no LLM stage), "
                      "and its frames' rows are not in patch order, so an LLM stage would have no released rule to follow")

    def vision_dims(self, model, processor=None) -> VisionDims:
        vision, hidden = model.config.vision_config, model.config.text_config.hidden_size
        grid = vision.image_size // vision.patch_size
        # ApET runs after the projector here, so it sees text-hidden-sized tokens
        return VisionDims(vision.image_size, grid * grid, hidden, hidden)

    def vision_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """frames [F, 3, S, S] -> projected rows [F, 1+N, H] (CLS first), as get_video_features computes them."""
        layer = model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise NotImplementedError("multi-layer vision features (a list of layers) are not supported yet")
        hidden = model.model.video_tower(pixel_values, output_hidden_states=True).hidden_states[layer]
        return model.model.multi_modal_projector(hidden)

    def split_prefix(self, model, features: torch.Tensor):
        return features[:, :1], features[:, 1:]  # CLS row [F, 1, H], patch rows [F, N, H]

    def project(self, model, features: torch.Tensor) -> torch.Tensor:
        return features  # vision_features already projected (the released code compresses after the projector)

    def image_token_id(self, model) -> int:
        return model.config.video_token_id  # the placeholder that the frames' rows replace

    def vision_io(self, dims: VisionDims, model=None) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """LLaVA's I/O with the batch axis named `frames` and CLS + kept rows out: image_embeds [F, 1+T, H]."""
        inputs, outputs = super().vision_io(dims, model)
        outputs[0] = TensorSpec("image_embeds", "float32", ("batch", "image_tokens", dims.text_hidden))  # 1 + keep
        return rename_axis(inputs, "batch", "frames"), rename_axis(outputs, "batch", "frames")

    def axis_ranges(self, manifest, max_batch: int) -> dict[str, AxisRange]:
        # the runtime encodes each frame as it arrives (1); parity and calibration batch up to a video's frames
        return {"frames": AxisRange(1, 1, max(FRAMES_PER_VIDEO, max_batch))}


# Video-LLaVA's conversation: "USER: <video>\n{prompt} ASSISTANT:" (LLaVA-1.5 format with a video part).
def video_chat_template() -> str:
    from apet_export.models.tokenizer import CHAT_TEMPLATE

    image_part = "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}"
    video_part = "{% if part['type'] == 'video' %}{{ '<video>\n' }}{% endif %}"
    template = CHAT_TEMPLATE.replace(image_part, image_part + video_part)
    if template == CHAT_TEMPLATE:
        raise RuntimeError("the shared chat template changed: update video_chat_template()")  # a developer error
    return template


def build_random_video_llava(
    out_dir: Path, tower_size: dict = TINY_TOWER, text_size: dict = TINY_TEXT, text_model: str = "llama", seed: int = 0,
) -> None:
    """Write a randomly initialised Video-LLaVA checkpoint (CLIP 224px/14 towers + Llama or Qwen2) and processor."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaProcessor,
        Qwen2Config,
        VideoLlavaConfig,
        VideoLlavaForConditionalGeneration,
    )

    from apet_export.models.tokenizer import build_tiny_tokenizer

    template = video_chat_template()
    tokenizer = build_tiny_tokenizer(
        extra_special_tokens={"image_token": "<image>", "video_token": VIDEO_TOKEN}, max_length=4096, chat_template=template
    )
    text = dict(
        vocab_size=len(tokenizer), max_position_embeddings=4096,  # 8 frames x 257 rows uncompressed = 2056
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, **text_size,
    )
    text_config = LlamaConfig(**text) if text_model == "llama" else Qwen2Config(**text, use_sliding_window=False)
    vision = CLIPVisionConfig(image_size=224, patch_size=14, projection_dim=512, **tower_size)
    config = VideoLlavaConfig(
        vision_config=vision, text_config=text_config, image_token_index=tokenizer.image_token_id,
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=256, video_seq_length=8 * 257,
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # wider logit gaps, as for the LLaVA presets (greedy parity decided by the model)
        model.lm_head.weight.mul_(math.sqrt(text_config.hidden_size))
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    # Frames are preprocessed like Video-LLaVA's image/video processors (CLIP: shortest edge 224, centre
    # crop, bicubic, OpenAI mean/std). LlavaProcessor holds it: VideoLlavaProcessor needs torchvision.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=template, image_token="<image>",
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
