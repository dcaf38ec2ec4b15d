"""Shared fixtures: each tiny preset is built once per test session (a build takes ~20-40 s)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run and machine: a random draw can land on a degenerate
# input (basis size close to N, residuals ~1e-6 apart) where float order decides a tie, which made the suite
# fail on one run in several without any change. Their assertions are unchanged.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.load_profile("repeatable")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on the CPU through Triton's interpreter; triton reads the flag when it is first
# imported (its own tl.* helpers are @jit functions), so it is set before anything can import triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(2)


def _build(tmp_path_factory, preset: str, **options) -> Path:
    from apet_export.export.build import BuildOptions, build

    out = tmp_path_factory.mktemp("builds") / preset
    build(BuildOptions(model=preset, out=out, **options))
    return out


@pytest.fixture(scope="session")
def llava_build(tmp_path_factory) -> Path:
    """tiny-llava (CLIP + Llama), ApET fps, all artifacts."""
    return _build(tmp_path_factory, "tiny-llava")


@pytest.fixture(scope="session")
def llava_fp16_build(tmp_path_factory) -> Path:
    """tiny-llava exported with --precision fp16 (tower, projector and LLM in fp16: what fp16 engines need).
    Shared: copy it before writing into it (engines)."""
    return _build(tmp_path_factory, "tiny-llava", precision="fp16")


@pytest.fixture(scope="session")
def siglip_qwen2_build(tmp_path_factory) -> Path:
    """tiny-llava-siglip-qwen2 (SigLIP + Qwen2), ApET fps, all artifacts."""
    return _build(tmp_path_factory, "tiny-llava-siglip-qwen2")


@pytest.fixture(scope="session")
def video_llava_build(tmp_path_factory) -> Path:
    """tiny-video-llava (Video-LLaVA: CLIP video tower + Llama), ApET fps, all artifacts."""
    return _build(tmp_path_factory, "tiny-video-llava")


@pytest.fixture(scope="session")
def llava_next_build(tmp_path_factory) -> Path:
    """tiny-llava-next (any-resolution tiling, CLIP + Llama), ApET fps, all artifacts, default budget 160."""
    return _build(tmp_path_factory, "tiny-llava-next", budget=160)


@pytest.fixture(scope="session", params=["tiny-llava", "tiny-llava-siglip-qwen2"])
def any_build(request) -> Path:
    fixture = {"tiny-llava": "llava_build", "tiny-llava-siglip-qwen2": "siglip_qwen2_build"}[request.param]
    return request.getfixturevalue(fixture)


@pytest.fixture(scope="session")
def qwen_build(tmp_path_factory) -> Path:
    """tiny-qwen2.5-vl (dynamic-resolution ViT + M-RoPE text model), ApET fps at the 30% default, all artifacts."""
    return _build(tmp_path_factory, "tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def llava_two_stage_build(tmp_path_factory) -> Path:
    """tiny-llava split at layer 2 of 4: llm_a + stage2 + llm_b."""
    return _build(tmp_path_factory, "tiny-llava", stage2_layer=2)


@pytest.fixture(scope="session")
def llava_next_two_stage_build(tmp_path_factory) -> Path:
    """tiny-llava-next split at layer 2 of 4: stage 2 cuts each image's base crop rows; average budget 160."""
    return _build(tmp_path_factory, "tiny-llava-next", budget=160, stage2_layer=2)


@pytest.fixture(scope="session")
def siglip_qwen2_two_stage_build(tmp_path_factory) -> Path:
    """tiny-llava-siglip-qwen2 split at layer 2 of 4."""
    return _build(tmp_path_factory, "tiny-llava-siglip-qwen2", stage2_layer=2)


@pytest.fixture(scope="session", params=["tiny-llava", pytest.param("tiny-llava-siglip-qwen2", marks=pytest.mark.slow)])
def any_two_stage_build(request) -> Path:
    """Each LLaVA preset split at layer 2. The second preset's split build is only needed here: its tests re-run
    the first's checks on another tower and LLM, so they are `slow` (a build of its own, ~30 s; .ci/run runs them)."""
    fixture = {"tiny-llava": "llava_two_stage_build", "tiny-llava-siglip-qwen2": "siglip_qwen2_two_stage_build"}
    return request.getfixturevalue(fixture[request.param])
