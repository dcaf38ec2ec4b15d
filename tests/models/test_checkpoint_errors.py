"""A checkpoint's config.json that is not a JSON object, or weights whose shapes the config does not give:
one `error:` line naming the file and the mismatch, before any export."""

import json
import shutil

import pytest

from tests.test_cli import run_cli


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "config.json is not valid JSON (Expecting property name enclosed in double quotes at line 1"),
    ("[1, 2]", "config.json holds a JSON list, not an object of settings"),
    ('"llava"', "config.json holds a JSON str, not an object of settings"),
    (b"\xff\xfe{}", "config.json is not UTF-8 text"),
])
def test_config_json_that_is_not_an_object(capsys, tmp_path, text, message):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    (checkpoint / "model.safetensors").write_bytes(b"")
    code, _, err = run_cli(capsys, "build", "--model", str(checkpoint), "--out", str(tmp_path / "out"))
    assert code == 1 and err.strip().startswith(f"error: {checkpoint / 'config.json'}") and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_weights_that_do_not_match_the_config(capsys, tmp_path, llava_build):
    checkpoint = shutil.copytree(llava_build / "model", tmp_path / "ckpt")
    config = json.loads((checkpoint / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96  # the weights were saved with 128
    (checkpoint / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "build", "--model", str(checkpoint), "--out", str(tmp_path / "out"))
    last = err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in err, err
    assert f"{checkpoint / 'model.safetensors'} does not match {checkpoint / 'config.json'}" in last, last
    assert "mlp.down_proj.weight is [64, 128] in the weights but [64, 96] by the config (12 tensor(s) differ)" in last
    assert ".build-" not in last and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_build_whose_config_json_is_damaged(capsys, tmp_path, llava_build):
    build = shutil.copytree(llava_build, tmp_path / "build")
    (build / "model" / "config.json").write_text("{")
    code, _, err = run_cli(capsys, "run", str(build), "--prompt", "x")
    assert code == 1 and err.startswith(f"error: {build / 'model' / 'config.json'} is not valid JSON"), err
