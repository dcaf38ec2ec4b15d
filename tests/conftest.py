"""Shared fixtures: each tiny preset is built once per test run (a build takes ~20-40 s), also when pytest-xdist
runs the tests in several worker processes: the first worker that needs a build makes it, the others wait for it
(a file lock) and read the same folder.

The shared builds are read-only to tests: a test that writes into a build (parity.json, a calibration cache,
engines) works on its own copy (`linked_copy`, or a full copy where it changes files), so no worker sees
another's half-written files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock
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
# One torch thread per pytest-xdist worker: two workers already fill the two cores, and two threads each made
# four busy threads on two cores (tracing is single-threaded; the eager references are small).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def shared_folder(tmp_path_factory) -> Path:
    """A folder every process of this test run sees: under pytest-xdist each worker's base temporary folder is
    <run>/popen-gwN, so the run's is its parent; in a run without workers, the session's own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder `name` in the run's shared folder, filled by make(folder) once per test run: the first process
    to ask makes it while holding a lock, the others wait and reuse it. A failed make leaves nothing marked
    done, so the next process to ask tries again (and reports its own error)."""
    root = shared_folder(tmp_path_factory)
    folder, done = root / name, root / f"{name}.done"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


def _build(tmp_path_factory, name: str, preset: str, **options) -> Path:
    from apet_export.export.build import BuildOptions, build

    def make(folder: Path) -> None:
        build(BuildOptions(model=preset, out=folder / preset, **options))

    return made_once(tmp_path_factory, name, make) / preset


def linked_copy(build: Path, destination: Path) -> Path:
    """A private folder whose files are hard links to a shared build's (no copying; links inside the folder, not
    symbolic ones, which the manifest's checks refuse as pointing outside the build): commands that add files to
    a build (parity.json, calibration-cache/) write them here. Only for commands that add or replace files: one
    that rewrote a file in place would write through the link. Only for builds whose graphs hold their weights
    inline, as the tiny presets' do: onnx refuses external weights with more than one hard link
    (artifacts.load_onnx)."""
    return Path(shutil.copytree(build, destination, copy_function=os.link))


@pytest.fixture(scope="session")
def llava_build(tmp_path_factory) -> Path:
    """tiny-llava (CLIP + Llama), ApET fps, all artifacts."""
    return _build(tmp_path_factory, "llava", "tiny-llava")


@pytest.fixture(scope="session")
def llava_fp16_build(tmp_path_factory) -> Path:
    """tiny-llava exported with --precision fp16 (tower, projector and LLM in fp16: what fp16 engines need).
    Shared: copy it before writing into it (engines)."""
    return _build(tmp_path_factory, "llava-fp16", "tiny-llava", precision="fp16")


@pytest.fixture(scope="session")
def siglip_qwen2_build(tmp_path_factory) -> Path:
    """tiny-llava-siglip-qwen2 (SigLIP + Qwen2), ApET fps, all artifacts."""
    return _build(tmp_path_factory, "siglip-qwen2", "tiny-llava-siglip-qwen2")


@pytest.fixture(scope="session")
def video_llava_build(tmp_path_factory) -> Path:
    """tiny-video-llava (Video-LLaVA: CLIP video tower + Llama), ApET fps, all artifacts."""
    return _build(tmp_path_factory, "video-llava", "tiny-video-llava")


@pytest.fixture(scope="session")
def llava_next_build(tmp_path_factory) -> Path:
    """tiny-llava-next (any-resolution tiling, CLIP + Llama), ApET fps, all artifacts, default budget 160."""
    return _build(tmp_path_factory, "llava-next", "tiny-llava-next", budget=160)


@pytest.fixture(scope="session", params=["tiny-llava", "tiny-llava-siglip-qwen2"])
def any_build(request) -> Path:
    fixture = {"tiny-llava": "llava_build", "tiny-llava-siglip-qwen2": "siglip_qwen2_build"}[request.param]
    return request.getfixturevalue(fixture)


@pytest.fixture(scope="session")
def qwen_build(tmp_path_factory) -> Path:
    """tiny-qwen2.5-vl (dynamic-resolution ViT + M-RoPE text model), ApET fps at the 30% default, all artifacts."""
    return _build(tmp_path_factory, "qwen2.5-vl", "tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def llava_two_stage_build(tmp_path_factory) -> Path:
    """tiny-llava split at layer 2 of 4: llm_a + stage2 + llm_b."""
    return _build(tmp_path_factory, "llava-two-stage", "tiny-llava", stage2_layer=2)


@pytest.fixture(scope="session")
def llava_next_two_stage_build(tmp_path_factory) -> Path:
    """tiny-llava-next split at layer 2 of 4: stage 2 cuts each image's base crop rows; average budget 160."""
    return _build(tmp_path_factory, "llava-next-two-stage", "tiny-llava-next", budget=160, stage2_layer=2)


@pytest.fixture(scope="session")
def siglip_qwen2_two_stage_build(tmp_path_factory) -> Path:
    """tiny-llava-siglip-qwen2 split at layer 2 of 4."""
    return _build(tmp_path_factory, "siglip-qwen2-two-stage", "tiny-llava-siglip-qwen2", stage2_layer=2)


@pytest.fixture(scope="session", params=["tiny-llava", pytest.param("tiny-llava-siglip-qwen2", marks=pytest.mark.slow)])
def any_two_stage_build(request) -> Path:
    """Each LLaVA preset split at layer 2. The second preset's split build is only needed here: its tests re-run
    the first's checks on another tower and LLM, so they are `slow` (a build of its own, ~30 s; .ci/run runs them)."""
    fixture = {"tiny-llava": "llava_two_stage_build", "tiny-llava-siglip-qwen2": "siglip_qwen2_two_stage_build"}
    return request.getfixturevalue(fixture[request.param])
