"""Model families and tiny presets by name; `load_source` turns `--model` into a loaded model."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from apet_export.checkpoint import read_config
from apet_export.compat import quiet_libraries
from apet_export.compression.budget import BudgetPolicy
from apet_export.errors import ArtifactError, UnknownNameError
from apet_export.models.base import ModelFamily
from apet_export.models.llava import (
    CLIP_L_TOWER,
    QWEN2_0_5B_TEXT,
    QWEN2_VOCAB,
    LlavaFamily,
    build_random_llava,
)
from apet_export.models.llava_next import LlavaNextFamily, build_random_llava_next
from apet_export.models.qwen2_5_vl import QwenVLFamily, build_random_qwen2_5_vl
from apet_export.models.video_llava import VideoLlavaFamily, build_random_video_llava

FAMILIES: dict[str, ModelFamily] = {}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def register_family(family: ModelFamily) -> ModelFamily:
    FAMILIES[family.name] = family
    return family


register_family(LlavaFamily())
register_family(VideoLlavaFamily())
register_family(LlavaNextFamily())
register_family(QwenVLFamily())


@dataclass(frozen=True)
class Preset:
    """A tiny randomly initialised model of a family's real classes, for tests and the default build."""

    name: str
    family: str
    build: Callable[[Path], None]  # writes a checkpoint + processor into the given directory
    description: str
    tiny: bool = True  # False: realistic sizes, for benchmarks only


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny-llava", "llava", lambda out: build_random_llava(out, "clip", "llama"),
               "CLIP 336px/14 (576 tokens) + 4-layer Llama, random weights"),
        Preset("tiny-llava-siglip-qwen2", "llava", lambda out: build_random_llava(out, "siglip", "qwen2"),
               "SigLIP 224px/14 (256 tokens) + 4-layer Qwen2, random weights"),
        Preset("bench-llava-clip-l-qwen2-0.5b", "llava",
               lambda out: build_random_llava(out, "clip", "qwen2", CLIP_L_TOWER, QWEN2_0_5B_TEXT),
               "CLIP-L/336 tower + Qwen2-0.5B-shaped text model (tiny vocabulary), random weights",
               tiny=False),
        Preset("bench-llava-clip-l-qwen2-0.5b-vocab", "llava",
               lambda out: build_random_llava(out, "clip", "qwen2", CLIP_L_TOWER, {**QWEN2_0_5B_TEXT, **QWEN2_VOCAB}),
               "as bench-llava-clip-l-qwen2-0.5b with Qwen2's 151936 embedding rows (the tokenizer uses 512; "
               "LM head and embeddings untied, as in most VLM language models), random weights",
               tiny=False),
        Preset("tiny-llava-next", "llava_next", build_random_llava_next,
               "LLaVA-NeXT any-resolution: CLIP 336px/14 (576 tokens per crop, up to 5 crops) + 4-layer Llama, random weights"),
        Preset("tiny-video-llava", "video_llava", build_random_video_llava,
               "Video-LLaVA: CLIP 224px/14 video tower (256 tokens + CLS per frame) + 4-layer Llama, random weights"),
        Preset("bench-video-llava-clip-l-qwen2-0.5b", "video_llava",
               lambda out: build_random_video_llava(out, CLIP_L_TOWER, QWEN2_0_5B_TEXT, "qwen2"),
               "Video-LLaVA: CLIP-L/14 224px towers + Qwen2-0.5B-shaped text model (tiny vocabulary), random weights",
               tiny=False),
        Preset("tiny-qwen2.5-vl", "qwen2_5_vl", build_random_qwen2_5_vl,
               "Qwen2.5-VL ViT (4 blocks, window + full attention, 2x2 merger; 16-64 tokens/image) + 4-layer "
               "M-RoPE text model, random weights"),
    )
}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise UnknownNameError("model family", name, list(FAMILIES))
    return FAMILIES[name]


def budget_policy(manifest) -> BudgetPolicy:
    """The budget rules of a build (its family's policy over its manifest)."""
    return get_family(manifest.family).budget_policy(manifest)


def family_for_checkpoint(path: Path) -> ModelFamily:
    """The family whose model_types include the checkpoint's config.json model_type."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ArtifactError(
            f"{path} is not a Hugging Face checkpoint directory (no config.json): pass a preset "
            f"({', '.join(PRESETS)}) or a local directory saved with save_pretrained"
        )
    model_type = read_config(Path(path)).get("model_type", "")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = [t for f in FAMILIES.values() for t in f.model_types]
    raise UnknownNameError("model_type (in config.json)", model_type, known)


def prepare_checkpoint(source: str, target: Path) -> str:
    """Put the checkpoint named by `--model` into `target` and return its source id.

    A preset is generated there; a local directory is hard-linked (no extra disk for multi-GB weights)
    or copied.
    """
    if source in PRESETS:
        quiet_libraries()
        target.mkdir(parents=True, exist_ok=True)
        PRESETS[source].build(target)
        return source
    path = Path(source)
    if not path.is_dir():
        raise UnknownNameError("model (preset or local checkpoint directory)", source, list(PRESETS))
    family_for_checkpoint(path)  # fail early on a directory we cannot handle
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        raise ArtifactError(
            f"{path} has no *.safetensors weights{f' (it has {found[0]}, a pickle checkpoint)' if found else ''}: "
            f"apet-export loads safetensors only (loading a pickle can run code); convert it once where you "
            f"trust it, e.g. LlavaForConditionalGeneration.from_pretrained(dir).save_pretrained(new_dir)"
        )

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(path, target, copy_function=link_or_copy)
    return str(path.resolve())
