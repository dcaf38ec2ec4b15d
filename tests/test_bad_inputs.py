"""Bad input a new user meets (issue 8): each must end as one `error: ...` line and exit status 1, with
nothing printed before it and no traceback."""

import json
import shutil

import pytest

from tests.test_cli import run_cli


def damaged_copy(build, target, damage: str):
    """A copy of `build` with one kind of damage."""
    shutil.copytree(build, target)
    if damage == "truncated vision.onnx":
        data = (build / "vision.onnx").read_bytes()
        (target / "vision.onnx").write_bytes(data[: len(data) // 2])
    elif damage == "llm.onnx over vision.onnx":
        shutil.copy(build / "llm.onnx", target / "vision.onnx")
    elif damage == "truncated llm.onnx":
        data = (build / "llm.onnx").read_bytes()
        (target / "llm.onnx").write_bytes(data[: len(data) * 3 // 4])
    elif damage == "empty vision.onnx":
        (target / "vision.onnx").write_bytes(b"")
    elif damage == "truncated llm.onnx.data":  # a graph over 2 GB keeps its weights beside it
        import onnx

        from apet_export.export.onnx_graph import save_model

        save_model(onnx.load(str(build / "llm.onnx")), target / "llm.onnx", external_data_above=1024)
        data = (target / "llm.onnx.data").read_bytes()
        (target / "llm.onnx.data").write_bytes(data[: len(data) // 2])
    elif damage == "truncated embeddings":
        data = (build / "embeddings.safetensors").read_bytes()
        (target / "embeddings.safetensors").write_bytes(data[:1000])
    elif damage == "garbage embeddings":
        (target / "embeddings.safetensors").write_bytes(b"\xff" * 64)
    elif damage == "truncated checkpoint":
        data = (build / "model" / "model.safetensors").read_bytes()
        (target / "model" / "model.safetensors").write_bytes(data[:-10])
    elif damage == "model/ missing":
        shutil.rmtree(target / "model")
    elif damage == "manifest is a JSON list":
        (target / "manifest.json").write_text("[1, 2, 3]\n")
    elif damage == "manifest misses fields":
        (target / "manifest.json").write_text('{"schema_version": 1}\n')
    elif damage == "manifest without budget range":
        data = json.loads((build / "manifest.json").read_text())
        data["budget"] = {"default": 64}
        (target / "manifest.json").write_text(json.dumps(data))
    elif damage == "manifest points outside":
        data = json.loads((build / "manifest.json").read_text())
        data["files"]["llm"]["path"] = "../../llm.onnx"
        (target / "manifest.json").write_text(json.dumps(data))
    return target


DAMAGES = {
    "truncated vision.onnx": "vision.onnx is not a readable ONNX model",
    "llm.onnx over vision.onnx": "vision.onnx is not the graph the manifest describes",
    "truncated llm.onnx": "llm.onnx is not a readable ONNX model (truncated",
    "empty vision.onnx": "vision.onnx is not a readable ONNX model (the file is empty)",
    "truncated llm.onnx.data": "llm.onnx.data, the weights of llm.onnx, is missing or truncated",
    "truncated embeddings": "embeddings.safetensors is truncated or corrupt",
    "garbage embeddings": "embeddings.safetensors is not a readable safetensors file",
    "truncated checkpoint": "model.safetensors is truncated or corrupt",
    "model/ missing": "model is missing",
    "manifest is a JSON list": "holds a JSON list, not the manifest object",
    "manifest misses fields": "is incomplete or malformed",
    "manifest without budget range": "is incomplete or malformed ('min')",
    "manifest points outside": "points 'llm' outside the build",
}
COMMANDS = {
    "inspect": ["inspect", "{dir}"],
    "run": ["run", "{dir}", "--prompt", "x", "--max-new-tokens", "2"],
    "parity": ["parity", "{dir}", "--budgets", "64"],
    "bench": ["bench", "{dir}", "--budgets", "64", "--runs", "1"],
    "visualize": ["visualize", "{dir}", "-o", "{dir}/figure.png"],
}


def assert_one_error_line(code, out, err, message):
    assert code == 1, (out, err)
    assert out == "", f"partial output before the error: {out!r}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


CASES = [(command, damage) for command in ("inspect", "run", "parity") for damage in DAMAGES]
CASES += [(command, damage) for command in ("bench", "visualize") for damage in ("truncated vision.onnx", "model/ missing")]


@pytest.mark.parametrize(("command", "damage"), CASES)
def test_damaged_builds(capsys, tmp_path, llava_build, command, damage):
    target = damaged_copy(llava_build, tmp_path / "damaged", damage)
    code, out, err = run_cli(capsys, *[a.format(dir=target) for a in COMMANDS[command]])
    assert_one_error_line(code, out, err, DAMAGES[damage])


def test_checkpoints_load_from_local_files_only(llava_build, monkeypatch):
    """A missing model/ is reported by name, and transformers is never allowed to try the Hub."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    calls = []
    for cls in (AutoProcessor, LlavaForConditionalGeneration):
        original = cls.from_pretrained

        def spy(*args, original=original, **kwargs):
            calls.append(kwargs.get("local_files_only"))
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    from apet_export.runtime.pipeline import Pipeline

    with Pipeline.from_dir(llava_build, backend="torch"):
        pass
    assert calls and all(flag is True for flag in calls), calls


def test_generate_takes_one_image_or_a_list(tmp_path, llava_build):
    from apet_export.errors import BudgetError
    from apet_export.runtime.images import synthetic_image
    from apet_export.runtime.pipeline import Pipeline

    picture = synthetic_image(1)
    path = tmp_path / "x.png"
    picture.save(path)
    with Pipeline.from_dir(llava_build) as pipeline:
        run = lambda images: pipeline.generate(images, "Hi", max_new_tokens=3, stream=False).token_ids  # noqa: E731
        expected = run([path])
        assert run(str(path)) == run(path) == run(picture) == expected
        with pytest.raises(BudgetError, match="keep=0 is outside"):  # 0 is not "the default"
            pipeline.generate(picture, "Hi", budget=0)


def test_visualize_without_image_and_into_a_folder(capsys, tmp_path, llava_build):
    target = tmp_path / "figure.png"
    code, _, err = run_cli(capsys, "visualize", str(llava_build), "-o", str(target))
    assert code == 0 and target.stat().st_size > 10_000, err
    folder = tmp_path / "folder"
    folder.mkdir()
    code, out, err = run_cli(capsys, "visualize", str(llava_build), "-o", str(folder))
    assert_one_error_line(code, out, err, "is a folder: pass the PNG file to write")
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["figure.png", "folder"]


def test_visualize_labels_the_basis_tokens(tmp_path, llava_build, monkeypatch):
    """The right panel numbers the M basis tokens at the positions the eager reference selected."""
    import matplotlib.axes

    from apet_export import visualize
    from apet_export.manifest import load_manifest

    labels = []
    original = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda self, x, y, s, **kw: labels.append((x, y, s)) or original(self, x, y, s, **kw))
    visualize.visualize_build(llava_build, None, 64, tmp_path / "figure.png")
    manifest = load_manifest(llava_build)
    assert [s for _, _, s in labels] == [str(i) for i in range(1, manifest.compression.num_basis + 1)]
    assert len({(x, y) for x, y, _ in labels}) == manifest.compression.num_basis  # distinct tokens


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "{build}", "--prompt", "x", "--budget", "0"], "keep=0 is outside (10, 576]"),
        (["run", "{build}", "--prompt", "x", "--temperature", "nan"], "temperature must be a finite number"),
        (["run", "{build}", "--prompt", "x", "--temperature", "inf"], "temperature must be a finite number"),
        (["run", "{build}", "--prompt", "x", "--seed", "-1"], "seed must be an integer >= 0"),
        (["run", "{build}", "--prompt", "x", "--image", "{tmp}"], "is a folder, not an image"),
        (["bench", "{build}", "--runs", "0"], "runs must be >= 1"),
        (["inspect", "{build}/manifest.json"], "is a file: pass the build directory"),
        (["bench", "{build}", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["visualize", "{build}", "--budget", "0", "-o", "{tmp}/v.png"], "keep=0 is outside"),
    ],
)
def test_bad_run_options(capsys, tmp_path, llava_build, args, message):
    code, out, err = run_cli(capsys, *[a.format(build=llava_build, tmp=tmp_path) for a in args])
    assert_one_error_line(code, out, err, message)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-basis", "600"], "--num-basis 600 must be smaller than the model's 576 visual tokens"),
        (["--fps-start", "576"], "--fps-start 576 is not a token index of this model (0 to 575)"),
    ],
)
def test_bad_build_options_need_the_model(capsys, tmp_path, args, message):
    """Options only the model's token count rules out: refused before any graph is exported."""
    code, _, err = run_cli(capsys, "build", "--out", str(tmp_path / "out"), "--no-llm", *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and lines[-1].startswith("error: ") and message in lines[-1], err
    assert "vision.onnx" not in err and list(tmp_path.iterdir()) == []


def test_budget_error_when_the_basis_fills_the_image():
    from apet_export.errors import BudgetError

    assert "choose num_basis below 576" in str(BudgetError(600, 600, 576))  # not "between 601 and 576"


def test_hard_linked_weights_are_refused_with_the_fix(tmp_path):
    """onnx refuses external weights with more than one hard link (a build copied with `cp -al`): the
    quantiser and the CPU-graph writer say so as an ArtifactError naming the fix, and write nothing."""
    import os

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from apet_export.calibration.quantize import quantize_weights
    from apet_export.errors import ArtifactError
    from apet_export.export.cpu_graph import write_cpu_graph

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(np.ones((64, 64), np.float32), "w")])
    original, linked = tmp_path / "build", tmp_path / "linked"
    original.mkdir(), linked.mkdir()
    onnx.save_model(helper.make_model(graph), str(original / "llm.onnx"), save_as_external_data=True,
                    location="llm.onnx.data", size_threshold=0)
    for name in ("llm.onnx", "llm.onnx.data"):
        os.link(original / name, linked / name)

    with pytest.raises(ArtifactError, match=r"hard link .* copy the build with `cp -r`"):
        quantize_weights(linked / "llm.onnx", linked / "llm.int8.onnx", bits=8)
    with pytest.raises(ArtifactError, match=r"hard link .* copy the build with `cp -r`"):
        write_cpu_graph(linked / "llm.onnx", linked / "llm.cpu.onnx")
    assert sorted(p.name for p in linked.iterdir()) == ["llm.onnx", "llm.onnx.data"]
