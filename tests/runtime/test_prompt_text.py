"""A prompt is what the user typed: control-token strings stay text, undecodable bytes and wrong types are
typed errors, a closed Pipeline says so."""

import numpy as np
import pytest

from apet_export.errors import CalibrationDataError, ImageError, InvalidInputError, PipelineClosedError
from apet_export.runtime.images import synthetic_image
from apet_export.runtime.pipeline import Pipeline
from tests.test_cli import run_cli


@pytest.mark.parametrize("fixture", ["llava_build", "qwen_build", "video_llava_build"])
def test_typed_control_tokens_stay_text(request, fixture):
    build = request.getfixturevalue(fixture)
    with Pipeline.from_dir(build) as pipeline:
        tokenizer = pipeline.tokenizer
        controls = sorted({token.content for token in tokenizer.added_tokens_decoder.values()})
        assert {"</s>", "<s>"} <= set(controls) or {"<|im_end|>", "<|im_start|>"} <= set(controls)
        typed = "Say " + " and ".join(["</s>", "<s>", "<|im_end|>", "<|im_start|>", *controls]) + " please."
        special = set(tokenizer.added_tokens_decoder)
        plain_ids = pipeline.prompt_ids("Say hi please.", 1)
        typed_ids = pipeline.prompt_ids(typed, 1)
        # the control tokens are exactly the template's: the typed ones became ordinary text tokens
        assert [i for i in typed_ids if i in special] == [i for i in plain_ids if i in special]
        assert typed in tokenizer.decode(typed_ids)
        # a prompt without control strings is tokenised as before: the whole rendered template at once
        assert len(plain_ids) < len(typed_ids)


def test_undecodable_prompt_bytes_are_an_error_line(capsys, llava_build):
    prompt = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # how Python passes Latin-1 argv bytes
    code, out, err = run_cli(capsys, "run", str(llava_build), "--prompt", prompt, "--max-new-tokens", "2")
    assert code == 1 and out == "" and err.startswith("error: the prompt is not valid UTF-8 text"), err
    assert "b'\\xe9'" in err and len(err.strip().splitlines()) == 1


def test_prompts_file_that_is_not_utf8_or_a_folder(tmp_path):
    from apet_export.calibration.data import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes(b"first\nsecond caf\xe9\n")
    with pytest.raises(CalibrationDataError, match=r"not UTF-8 text \(byte b'\\xe9' on line 2\)"):
        read_prompts(path)
    with pytest.raises(CalibrationDataError, match="is a folder, not a prompts file"):
        read_prompts(tmp_path)


def test_python_api_arguments_are_typed_errors(llava_build):
    image = synthetic_image(0)
    pipeline = Pipeline.from_dir(llava_build)
    with pytest.raises(InvalidInputError, match="the prompt must be a str, got bytes"):
        pipeline.generate(image, b"Describe.")
    with pytest.raises(InvalidInputError, match="the prompt must be a str, got list"):
        pipeline.generate(image, ["Describe."])
    with pytest.raises(ImageError, match="an image of type dict cannot be read"):
        pipeline.generate({"image": image}, "Describe.")
    with pytest.raises(InvalidInputError, match=r"max_new_tokens must be an integer, got 2.5"):
        pipeline.generate(image, "Describe.", max_new_tokens=2.5)
    with pytest.raises(InvalidInputError, match=r"budget must be an integer, got 64.0"):
        pipeline.generate(image, "Describe.", budget=64.0)
    one_array = pipeline.generate(np.asarray(image), "Describe.", max_new_tokens=2, stream=False)  # one numpy image
    assert one_array.token_ids == pipeline.generate(image, "Describe.", max_new_tokens=2, stream=False).token_ids
    pipeline.close()
    pipeline.close()  # twice is harmless
    with pytest.raises(PipelineClosedError, match="was closed"):
        pipeline.generate(image, "Describe.")
