"""The streaming pipeline on both backends, and its errors."""

import numpy as np
import pytest

from apet_export.errors import (
    BudgetError,
    ImageError,
    PromptTooLongError,
    UnknownNameError,
)
from apet_export.runtime.images import synthetic_image
from apet_export.runtime.pipeline import Pipeline
from apet_export.runtime.sampling import Sampler
from apet_export.runtime.streaming import IncrementalDecoder


@pytest.fixture(scope="module")
def onnx_pipeline(llava_build):
    with Pipeline.from_dir(llava_build, backend="onnxruntime") as pipeline:
        yield pipeline


def test_streams_deltas_that_add_up_to_the_result(onnx_pipeline):
    generation = onnx_pipeline.generate([synthetic_image(1)], "Describe the image.", budget=64, max_new_tokens=12)
    deltas = list(generation)
    result = generation.result
    assert "".join(deltas) == result.text
    assert 1 <= len(result.token_ids) <= 12
    assert result.image_tokens == 64 and result.prompt_tokens > 5
    assert result.vision_ms > 0 and result.prefill_ms > 0
    assert len(result.decode_ms) == len(result.token_ids) - 1 or result.finish_reason == "eos"
    assert result.first_logits.shape == (onnx_pipeline.manifest.dims["vocab_size"],)


def test_one_event_per_token(onnx_pipeline):
    generation = onnx_pipeline.generate([synthetic_image(2)], "Hi", budget=32, max_new_tokens=6)
    events = list(generation.events())
    tokens = [e for e in events if e.token_id is not None]
    assert [e.token_id for e in tokens] == generation.result.token_ids
    assert [e.index for e in tokens] == list(range(len(tokens)))


def test_incremental_decoding_never_splits_a_character(onnx_pipeline):
    tokenizer = onnx_pipeline.tokenizer
    text = "café 日本語 ✓ 😀 naïve"
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(t) for t in tokenizer(text, add_special_tokens=False).input_ids]
    assert "".join(deltas) + decoder.flush() == text
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # some tokens were partial characters, held back


def test_chat_template_and_image_placeholders(onnx_pipeline):
    ids = onnx_pipeline.prompt_ids("What is this?", num_images=2)
    tokenizer = onnx_pipeline.tokenizer
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.image_token_id) == 2
    assert tokenizer.decode(ids).endswith("What is this? ASSISTANT:")


def test_two_images_and_both_backends_agree(llava_build, onnx_pipeline):
    images = [synthetic_image(3), synthetic_image(4)]
    expected = onnx_pipeline.generate(images, "Compare them.", budget=16, max_new_tokens=8, stream=False)
    assert expected.image_tokens == 32
    with Pipeline.from_dir(llava_build, backend="torch") as torch_pipeline:
        actual = torch_pipeline.generate(images, "Compare them.", budget=16, max_new_tokens=8, stream=False)
    assert actual.token_ids == expected.token_ids
    np.testing.assert_allclose(actual.first_logits, expected.first_logits, atol=1e-3)


def test_sampling_is_seeded_and_stops_at_eos(onnx_pipeline):
    image = synthetic_image(5)
    run = lambda seed: onnx_pipeline.generate([image], "Hi", max_new_tokens=8, temperature=1.0, seed=seed, stream=False)  # noqa: E731
    assert run(7).token_ids == run(7).token_ids
    greedy = onnx_pipeline.generate([image], "Hi", max_new_tokens=8, stream=False)
    first = greedy.token_ids[0]
    eos = onnx_pipeline.manifest.dims["eos_token_id"]
    onnx_pipeline.manifest.dims["eos_token_id"] = first  # make the greedy first token the end token
    try:
        stopped = onnx_pipeline.generate([image], "Hi", max_new_tokens=8, stream=False)
    finally:
        onnx_pipeline.manifest.dims["eos_token_id"] = eos
    assert stopped.finish_reason == "eos" and stopped.token_ids == []


def test_top_p_keeps_the_nucleus():
    logits = np.array([10.0, 9.0, -5.0, -5.0])
    sampler = Sampler(temperature=1.0, top_p=0.5, seed=0)
    assert {sampler(logits) for _ in range(50)} == {0}  # token 0 alone has > 50% of the mass


def test_errors_before_any_work(onnx_pipeline, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("vision ran although the request was invalid")

    monkeypatch.setattr(onnx_pipeline.backend.vision, "infer", no_work)
    image = synthetic_image(0)
    with pytest.raises(PromptTooLongError, match="context of 2048"):
        onnx_pipeline.generate([image], "word " * 3000, max_new_tokens=4)
    with pytest.raises(PromptTooLongError):
        onnx_pipeline.generate([image], "Hi", budget=576, max_new_tokens=1500)
    with pytest.raises(BudgetError, match="between 11 and 576"):
        onnx_pipeline.generate([image], "Hi", budget=5)
    onnx_pipeline.generate([image], "What is <image>?")  # typed, the placeholder is text: no error, no work yet
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        onnx_pipeline.generate([bad], "Hi")
    with pytest.raises(ImageError, match="does not exist"):
        onnx_pipeline.generate([tmp_path / "missing.jpg"], "Hi")


def test_unknown_backend(llava_build):
    with pytest.raises(UnknownNameError, match="onnxruntime, tensorrt, torch"):
        Pipeline.from_dir(llava_build, backend="tensorrt-llm")
