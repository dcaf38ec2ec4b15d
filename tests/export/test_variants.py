"""Each family's ApET variant in its exported vision graphs (vision.onnx and the ApetScore plugin graph, on
onnxruntime) and in the eager reference, against a literal rendering of the authors' released rule
(tests/compression/reference.py): kept indices identical, rows within fp32 tolerance."""

import numpy as np
import pytest
import torch

from apet_export.manifest import load_manifest
from apet_export.models.registry import get_family
from apet_export.runtime.backends.torch import eager_vision
from apet_export.runtime.images import synthetic_image
from apet_export.runtime.sessions import onnxruntime_session
from tests.compression.reference import apet_reference, fps_reference, video_frame_reference

ATOL = 1e-4  # graph vs reference rows: the features differ by fp32 rounding between graph and eager tower


def graph_outputs(build_dir, manifest, feed) -> dict[str, dict[str, np.ndarray]]:
    """{graph name: {output: value}} of vision.onnx and vision.plugin.onnx on one feed, and of the eager path."""
    outputs = {}
    for name in ("vision", "vision_plugin"):
        session = onnxruntime_session(manifest.file(build_dir, name), apet_score=name == "vision_plugin")
        outputs[name] = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    family = get_family(manifest.family)
    model, _ = family.load(manifest.model_dir(build_dir))
    outputs["eager"] = dict(eager_vision(model, family, manifest, feed))
    with torch.inference_mode():
        features, _ = family.eager_features(model, feed)  # the released code's input: [B, N(+1), D]
    return outputs, family.split_prefix(model, features)


def released_rows(features: torch.Tensor, keep: int, num_basis: int, scores: np.ndarray, rule: str):
    """The released rule on one element's features [N, D], basis by FPS from the largest-norm token."""
    basis = fps_reference(features, num_basis, int(features.norm(dim=-1).argmax()))
    if rule == "append_basis":
        return video_frame_reference(features, keep, basis, torch.from_numpy(scores))
    return apet_reference(features, keep, basis, torch.from_numpy(scores), rule)


def test_qwen_basis_slots_blend_half_basis_half_own_token(qwen_build):
    """qwen2_5_vl_custom.py: image_embeds[index_mask] = 0.5 * seed + 0.5 * image_embeds[index_mask]."""
    manifest = load_manifest(qwen_build)
    assert manifest.compression.variant == "qwen2_5_vl"
    family = get_family(manifest.family)
    processor = family.load_processor(manifest.model_dir(qwen_build))
    (feed,), _ = family.vision_feeds(processor, [synthetic_image(1)], 24, manifest)
    outputs, (_, features) = graph_outputs(qwen_build, manifest, feed)
    keep = int(feed["keep"])
    rows, index = released_rows(features[0], keep, manifest.compression.num_basis, outputs["vision"]["scores"][0], "blend_slots")
    for name, out in outputs.items():
        assert out["keep_index"][0].tolist() == index.tolist(), name
        diff = float(np.abs(out["image_embeds"][0] - rows.numpy()).max())
        print(f"qwen2_5_vl {name}: max abs diff against the released blend {diff:.2e}")
        assert diff <= ATOL, name


def test_video_frames_keep_cls_topk_rows_then_the_basis(video_llava_build):
    """encode_videos: per frame [CLS, T-M merged rows in top-k order, M basis rows in FPS order] = 1 + T rows."""
    manifest = load_manifest(video_llava_build)
    assert manifest.compression.variant == "video_llava"
    family = get_family(manifest.family)
    processor = family.load_processor(manifest.model_dir(video_llava_build))
    frames = [synthetic_image(seed) for seed in (3, 4)]
    (feed,), _ = family.vision_feeds(processor, frames, 32, manifest)
    outputs, (cls, features) = graph_outputs(video_llava_build, manifest, feed)
    num_basis = manifest.compression.num_basis
    for frame in range(len(frames)):
        rows, index = released_rows(features[frame], 32, num_basis, outputs["vision"]["scores"][frame], "append_basis")
        for name, out in outputs.items():
            assert out["image_embeds"].shape[1] == 1 + 32, name
            assert out["keep_index"][frame].tolist() == index.tolist(), name
            expected = np.concatenate([cls[frame].numpy(), rows.numpy()])  # [1 + T, H]
            diff = float(np.abs(out["image_embeds"][frame] - expected).max())
            print(f"video_llava {name} frame {frame}: max abs diff against encode_videos {diff:.2e}")
            assert diff <= ATOL, name
        assert index[-num_basis:].tolist() != sorted(index[-num_basis:].tolist())  # FPS order, not patch order


@pytest.mark.parametrize("keep", ["max"])
def test_video_without_compression_is_every_patch_in_order(video_llava_build, keep):
    manifest = load_manifest(video_llava_build)
    family = get_family(manifest.family)
    processor = family.load_processor(manifest.model_dir(video_llava_build))
    (feed,), _ = family.vision_feeds(processor, [synthetic_image(5)], manifest.budget[keep], manifest)
    outputs, (cls, features) = graph_outputs(video_llava_build, manifest, feed)
    for name, out in outputs.items():
        assert out["keep_index"][0].tolist() == list(range(manifest.budget["max"])), name
        np.testing.assert_allclose(out["image_embeds"][0, 1:], features[0].numpy(), atol=ATOL)
