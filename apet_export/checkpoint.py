"""Checks of a Hugging Face checkpoint directory that name the file and the problem in one line."""

from __future__ import annotations

import json
from pathlib import Path

from apet_export.errors import ArtifactError, CheckpointError


def read_json_object(path: Path, fix: str) -> dict:
    """A saved JSON object (a processor's or tokenizer's settings), or ArtifactError naming the file, what is
    wrong with it and `fix`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{path} is not readable JSON ({error}): {fix}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} holds a JSON {type(data).__name__}, not an object: {fix}")
    return data


def read_config(folder: Path) -> dict:
    """FOLDER/config.json as a dict, or CheckpointError naming the file and what is wrong with it."""
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}): restore the "
                              f"config.json saved with the checkpoint") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}): restore the "
            f"config.json saved with the checkpoint"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(data).__name__}, not an object of settings: restore the config.json "
            f"saved with the checkpoint"
        )
    return data


def check_loading_info(folder: Path, info: dict) -> None:
    """from_pretrained(..., output_loading_info=True)'s report: weights whose shapes differ from what
    config.json builds are an error (the library would otherwise initialise them at random)."""
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda entry: entry[0])
    if not mismatched:
        return
    name, found, expected = mismatched[0]
    weights = ", ".join(sorted(p.name for p in Path(folder).glob("*.safetensors"))) or "the weights"
    raise CheckpointError(
        f"{Path(folder) / weights} does not match {Path(folder) / 'config.json'}: {name} is "
        f"{list(found)} in the weights but {list(expected)} by the config ({len(mismatched)} tensor(s) differ): "
        f"the config and the weights come from different models; use the config.json saved with these weights"
    )
