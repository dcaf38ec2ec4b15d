"""Video-LLaVA: the preset is the real transformers model, the exported graphs match eager PyTorch, frames
stream through the pipeline one at a time, and every graph parses in TensorRT-RTX."""

import json

import numpy as np
import pytest
import torch

from apet_export.errors import InvalidInputError
from apet_export.models.registry import family_for_checkpoint, prepare_checkpoint
from apet_export.parity.e2e import e2e_parity
from apet_export.parity.run import run_parity
from apet_export.runtime.pipeline import Pipeline
from apet_export.runtime.video import synthetic_frames, write_video
from tests.conftest import linked_copy
from tests.tensorrt_parse import check_build_parses


def test_preset_features_are_hf_video_features(tmp_path):
    prepare_checkpoint("tiny-video-llava", tmp_path)
    family = family_for_checkpoint(tmp_path)
    model, processor = family.load(tmp_path)
    assert type(model).__name__ == "VideoLlavaForConditionalGeneration"
    assert type(model.model.video_tower).__name__ == "CLIPVisionModel"
    frames = torch.randn(3, 3, 224, 224)  # [F, 3, S, S]
    with torch.no_grad():
        expected = model.model.get_video_features(pixel_values_videos=frames[None]).pooler_output  # [F, 257, H]
        features = family.vision_features(model, frames)
    torch.testing.assert_close(features, expected)
    prefix, tokens = family.split_prefix(model, features)
    assert prefix.shape == (3, 1, 64) and tokens.shape == (3, family.vision_dims(model).num_tokens, 64)
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    assert prompt == "<s>USER: <video>\nHi ASSISTANT:"


def test_vision_and_e2e_parity(video_llava_build, tmp_path):
    """Vision: both graphs at per-frame budgets 16, 32 and N, batch 1 and 2 (frames); e2e: 8 frames, greedy
    32 tokens at 32 and 64 tokens per frame and uncompressed (N = 256 per frame)."""
    sections = run_parity(linked_copy(video_llava_build, tmp_path / "build"), budgets=[16, 32, 256], e2e=False)
    vision = sections["vision"]
    assert all(row.passed for row in vision), [row for row in vision if not row.passed]
    assert {row.output for row in vision if row.max_abs == 0.0} >= {"keep_index"}
    worst = max((row for row in vision if row.output == "image_embeds"), key=lambda r: r.max_abs)
    print(f"largest image_embeds diff: {worst.max_abs:.3g} ({worst.check})")
    from apet_export.manifest import load_manifest

    e2e = e2e_parity(video_llava_build, load_manifest(video_llava_build), None, budgets=[32, 64, 256])
    for row in e2e:
        print(row.check, row.output, row.max_abs, row.detail)
    assert all(row.passed for row in e2e), [row for row in e2e if not row.passed]
    assert len(e2e) == 6 and all("identical (32 tokens)" == r.detail for r in e2e if r.output == "token_ids")


@pytest.fixture(scope="module")
def video_pipeline(video_llava_build):
    with Pipeline.from_dir(video_llava_build, backend="onnxruntime") as pipeline:
        yield pipeline


def test_frames_are_encoded_as_they_arrive(video_pipeline, monkeypatch):
    log = []
    infer = video_pipeline.backend.vision.infer

    def logged_infer(feed, **kwargs):
        log.append(("encode", feed["pixel_values"].shape[0], int(feed["keep"])))
        return infer(feed, **kwargs)

    def camera():  # a live source: frame i exists only once frame i-1 was taken
        for i, frame in enumerate(synthetic_frames(8)):
            log.append(("frame", i))
            yield frame

    monkeypatch.setattr(video_pipeline.backend.vision, "infer", logged_infer)
    streamed = video_pipeline.generate_video(camera(), "What happens?", budget=256, num_frames=8, max_new_tokens=8, stream=False)
    expected_log = [entry for i in range(8) for entry in (("frame", i), ("encode", 1, 32))]
    assert log == expected_log  # one frame through the vision graph before the next is pulled
    assert streamed.image_tokens == 8 * 33  # per frame: the CLS row + 32 kept tokens
    assert 0 < streamed.prefill_ms <= streamed.first_token_ms
    whole = video_pipeline.generate_video(synthetic_frames(8), "What happens?", budget=256, max_new_tokens=8, stream=False)
    assert whole.token_ids == streamed.token_ids
    np.testing.assert_array_equal(whole.first_logits, streamed.first_logits)


def test_budget_split_and_errors(video_pipeline):
    budgets = video_pipeline.budgets  # the family's policy: the video's budget split across its frames
    assert budgets.per_frame(256, 8) == [32] * 8
    assert budgets.per_frame(259, 8) == [33] * 3 + [32] * 5  # evenly, the remainder to the first frames
    assert budgets.per_frame(None, 4) == [64] * 4  # the build's default per frame
    with pytest.raises(InvalidInputError, match="between 88 and 2048"):
        budgets.per_frame(80, 8)
    with pytest.raises(InvalidInputError, match="pass num_frames"):
        video_pipeline.generate_video(iter(synthetic_frames(2)), "Hi")
    with pytest.raises(InvalidInputError, match="3 frames arrived, 4 were announced"):
        video_pipeline.generate_video(iter(synthetic_frames(3)), "Hi", num_frames=4, budget=64, stream=False)
    with pytest.raises(InvalidInputError, match="video frames"):
        video_pipeline.generate([synthetic_frames(1)[0]], "Hi")


def test_cli_run_video(video_llava_build, tmp_path):
    from click.testing import CliRunner

    from apet_export.cli import cli

    video = write_video(tmp_path / "clip.mp4", synthetic_frames(20))
    args = ["run", str(video_llava_build), "--video", str(video), "--frames", "8", "--budget", "256",
            "--prompt", "What happens?", "--max-new-tokens", "4", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["event"] == "summary" and summary["image_tokens"] == 8 * 33 and summary["generated_tokens"] == 4

    # a video build is one-stage: --budget1/--budget2 are refused by name
    refused = CliRunner().invoke(cli, [*args, "--budget1", "64"])
    assert refused.exit_code != 0 and "--budget1/--budget2 are for two-stage image builds" in str(refused.exception)


def test_graphs_parse_in_tensorrt_rtx(video_llava_build):
    check_build_parses(video_llava_build)
