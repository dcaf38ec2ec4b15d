"""TensorRT: every graph the build writes parses with a real TensorRT parser and builds fp16 engines ahead
of time for SM80 and SM89 (TensorRT-RTX, no GPU needed); engine selection and the errors around it."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest

from apet_export.compat import import_tensorrt
from apet_export.errors import (
    ArtifactError,
    DeviceError,
    EngineCompatibilityError,
    EngineTargetError,
    InvalidInputError,
    MissingDependencyError,
)
from apet_export.export.cuda_device import gpu_target
from apet_export.export.tensorrt import EngineOptions, build_engines, resolve_targets
from apet_export.export.trt_profiles import profiles_for
from apet_export.manifest import load_manifest

trt = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is in the dev extras: pip install -e '.[dev]'")
HAS_GPU = gpu_target() is not None
AOT_TARGETS = ("sm80", "sm89")


def _fp16_build(tmp_path_factory, preset: str) -> Path:
    from apet_export.export.build import BuildOptions, build

    out = tmp_path_factory.mktemp("builds-fp16") / preset
    build(BuildOptions(model=preset, out=out, precision="fp16"))
    return out


@pytest.fixture(scope="module", params=["tiny-llava", "tiny-llava-siglip-qwen2"])
def fp16_engines(request, tmp_path_factory) -> Path:
    """An fp16 build of each tiny preset with SM80 + SM89 engines (builder optimisation level 0). Two fp16 builds
    and twelve engines (~2 min on 2 cores): its tests are `slow` (.ci/run runs them). The default run builds
    engines from the fp32, two-stage and calibrated builds it has anyway."""
    if request.param == "tiny-llava":  # the shared session build, copied: engines are written into it
        out = tmp_path_factory.mktemp("builds-fp16") / request.param
        shutil.copytree(request.getfixturevalue("llava_fp16_build"), out)
    else:
        out = _fp16_build(tmp_path_factory, request.param)
    build_engines(out, EngineOptions(targets=AOT_TARGETS, precision="fp16", optimization_level=0))
    return out


def parse(path: Path):
    from apet_export.export.trt_network import make_logger, parse_onnx

    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network, parser = parse_onnx(trt, builder, logger, path)
    return network, parser, builder


@pytest.mark.parametrize("artifact", ["vision", "llm"])
def test_graphs_parse_without_errors(any_build, artifact):
    manifest = load_manifest(any_build)
    network, parser, _ = parse(manifest.file(any_build, artifact))
    assert parser.num_errors == 0 and network.num_layers > 100
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    assert set(inputs) == {t.name for t in manifest.files[artifact].inputs}
    if artifact == "vision":
        assert inputs["keep"].is_shape_tensor  # the budget is a shape: profiles give it a value range
    else:
        layers = [network.get_layer(i).type for i in range(network.num_layers)]
        assert layers.count(trt.LayerType.ATTENTION_OUTPUT) == manifest.dims["num_layers"]


def test_fp32_attention_needs_the_decomposable_fallback(llava_build, monkeypatch):
    """What mark_attention_decomposable is for: fp32 head_dim-16 attention has no fused kernel."""
    from apet_export.errors import EngineBuildError
    from apet_export.export import trt_network

    manifest = load_manifest(llava_build)
    profiles = profiles_for(manifest, "llm")
    sm89 = trt.ComputeCapability.SM89
    logger = trt_network.make_logger(trt)
    builder = trt.Builder(logger)
    monkeypatch.setattr(trt_network, "mark_attention_decomposable", lambda trt, network: 0)
    with pytest.raises(EngineBuildError, match="could not build llm.onnx: .*dedicated kernel"):
        trt_network.build_engine(trt, builder, logger, manifest.file(llava_build, "llm"), profiles, sm89, None, 0)
    monkeypatch.undo()
    engine, _, marked = trt_network.build_engine(
        trt, builder, logger, manifest.file(llava_build, "llm"), profiles, sm89, None, 0
    )
    assert marked == manifest.dims["num_layers"] and len(engine) > 1_000_000


@pytest.mark.slow  # fp16_engines
def test_fp16_engines_for_sm80_and_sm89(fp16_engines):
    manifest = load_manifest(fp16_engines)
    record = manifest.engines
    assert record["targets"] == list(AOT_TARGETS) and not record["failed"]
    for entry in record["files"]:  # every engine says what built it, in what precision, with which settings
        assert entry["tensorrt"] == {"module": trt.__name__, "version": trt.__version__}
        assert entry["precision"] == "fp16"
        assert entry["settings"]["builder_optimization_level"] == 0 and entry["settings"]["strongly_typed"]
        assert entry["settings"]["timing_cache"] is None  # TensorRT-RTX: no timing at build time
    built = {(f["target"], f["artifact"]) for f in record["files"]}
    # the ApetScore plugin is registered by the builder, so the plugin graph builds like the others
    assert {(t, a) for t in AOT_TARGETS for a in ("vision", "vision_plugin", "llm")} <= built
    assert not record.get("skipped")
    for entry in record["files"]:
        path = fp16_engines / entry["path"]
        assert path.stat().st_size == entry["bytes"] > 1_000_000
        print(f"{entry['target']} {entry['artifact']}: {entry['bytes'] / 2**20:.1f} MiB in {entry['build_seconds']} s")
    llm = next(f for f in record["files"] if f["artifact"] == "llm")
    assert [p["name"] for p in llm["profiles"]] == ["prefill", "decode", "extend"]
    from apet_export.inspect import engines_summary

    assert f"by {trt.__name__} {trt.__version__}, fp16, targets sm80, sm89" in engines_summary(record)
    assert not list(fp16_engines.glob(".engines*"))  # no staging left behind


@pytest.mark.slow  # fp16_engines
def test_fp16_vision_graphs_match_eager_fp32_within_fp16_tolerance(fp16_engines):
    """build --precision fp16: tower + projector in fp16, ApET in fp32; the kept tokens stay identical."""
    from apet_export.parity.run import vision_feeds
    from apet_export.parity.vision import TOLERANCES_FP16, vision_parity
    from apet_export.runtime.images import synthetic_image

    manifest = load_manifest(fp16_engines)
    feeds = vision_feeds(fp16_engines, manifest, [synthetic_image(0), synthetic_image(1)], [64])
    rows = vision_parity(fp16_engines, manifest, feeds)
    for output in TOLERANCES_FP16:
        worst = max((r for r in rows if r.output == output), key=lambda r: r.max_abs)
        print(f"fp16 {output}: largest abs diff {worst.max_abs:.3g} ({worst.check})")
    assert rows and all(row.passed for row in rows)


def test_profiles_come_from_the_manifest_axis_names(llava_build):
    manifest = load_manifest(llava_build)
    (vision,) = profiles_for(manifest, "vision", max_batch=3)
    budget = manifest.budget
    assert vision.values == {"keep": (budget["min"], budget["default"], budget["max"])}
    assert vision.shapes["pixel_values"][0][0] == 1 and vision.shapes["pixel_values"][2][0] == 3
    prefill, decode, extend = profiles_for(manifest, "llm", max_context=512)
    assert prefill.shapes["inputs_embeds"][2][1] == 512 and prefill.shapes["past_key_0"][2][2] == 0
    assert decode.shapes["inputs_embeds"][2][1] == 1 and decode.shapes["past_key_0"][2][2] == 511
    step = {"inputs_embeds": (1, 1, 64), "attention_mask": (1, 101), "position_ids": (1, 1)}
    step |= {f"past_{k}_{i}": (1, 2, 100, 16) for i in range(4) for k in ("key", "value")}
    assert decode.accepts(step) and not prefill.accepts(step)
    # several tokens onto a non-empty cache (a video frame's 64 kept tokens after 100 cached ones)
    chunk = {"inputs_embeds": (1, 64, 64), "attention_mask": (1, 164), "position_ids": (1, 64)}
    chunk |= {f"past_{k}_{i}": (1, 2, 100, 16) for i in range(4) for k in ("key", "value")}
    assert extend.accepts(chunk) and not prefill.accepts(chunk) and not decode.accepts(chunk)
    assert extend.shapes["past_key_0"][0][2] == 1 and extend.shapes["attention_mask"][2][1] == 512
    # any graph with these axis names gets the same profiles (two-stage LLM parts, say)
    manifest.files["llm_b"] = manifest.files["llm"]
    assert [p.name for p in profiles_for(manifest, "llm_b")] == ["prefill", "decode", "extend"]
    from apet_export.config import ArtifactSpec, TensorSpec

    manifest.files["odd"] = ArtifactSpec("odd.onnx", (TensorSpec("x", "float32", ("frames", 3)),), ())
    with pytest.raises(ArtifactError, match="dynamic axis 'frames'"):
        profiles_for(manifest, "odd")


def test_target_errors_name_the_fix():
    with pytest.raises(EngineTargetError, match="cannot build engines for sm70: choose from .*sm89"):
        resolve_targets(trt, ["sm70"], gpu=None)
    with pytest.raises(EngineTargetError, match="not a compute capability"):
        resolve_targets(trt, ["ampere"], gpu=None)
    with pytest.raises(EngineTargetError, match="needs a CUDA GPU .* --target sm80,sm89"):
        resolve_targets(trt, ["current"], gpu=None)
    assert [t.name for t in resolve_targets(trt, ["current", "sm89"], gpu="sm89")] == ["sm89"]
    full = types.SimpleNamespace(__name__="tensorrt", __version__="10.14.1")  # full TensorRT: no AOT targets
    with pytest.raises(EngineTargetError, match=r"builds only for this machine's GPU \(sm90\), not sm80"):
        resolve_targets(full, ["sm80"], gpu="sm90")
    with pytest.raises(EngineTargetError, match="only for the GPU it runs on .* TensorRT-RTX"):
        resolve_targets(full, ["current"], gpu=None)
    assert resolve_targets(full, ["current"], gpu="sm90")[0].name == "sm90"


def test_missing_tensorrt_and_wrong_inputs(llava_build, tmp_path, monkeypatch):
    with pytest.raises(MissingDependencyError, match="pip install"):
        import_tensorrt(prefer="tensorrt")  # the full library is not installable here
    with pytest.raises(InvalidInputError, match="build --precision fp16"):
        build_engines(llava_build, EngineOptions(targets=("sm89",), precision="fp16"))
    copy = tmp_path / "no-onnx"
    copy.mkdir()
    data = json.loads((llava_build / "manifest.json").read_text())
    data["files"] = {k: v for k, v in data["files"].items() if not v["path"].endswith(".onnx")}
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="has no ONNX graphs"):
        build_engines(copy, EngineOptions(targets=("sm89",)))

    def no_tensorrt(prefer=None):
        raise MissingDependencyError("TensorRT is not installed: pip install ...")

    monkeypatch.setattr("apet_export.export.tensorrt.import_tensorrt", no_tensorrt)
    with pytest.raises(MissingDependencyError):
        build_engines(llava_build, EngineOptions(targets=("sm89",)))


def _vision_and_llm_copy(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("engines", "vision.plugin.onnx"))
    data = json.loads((destination / "manifest.json").read_text())
    data["files"].pop("vision_plugin", None)
    (destination / "manifest.json").write_text(json.dumps(data))
    return destination


def _snapshot(build: Path) -> dict[str, int]:
    return {str(p.relative_to(build)): p.stat().st_mtime_ns for p in (build / "engines").rglob("*.engine")}


def test_targets_and_artifacts_live_side_by_side(llava_build, tmp_path):
    """engine --target sm80 after --target sm89 keeps the sm89 engines; --artifact llm keeps the others."""
    build = _vision_and_llm_copy(llava_build, tmp_path / "build")
    build_engines(build, EngineOptions(targets=("sm89",), optimization_level=0))
    sm89 = _snapshot(build)
    assert set(sm89) == {"engines/sm89/vision.engine", "engines/sm89/llm.engine"}
    build_engines(build, EngineOptions(targets=("sm80",), optimization_level=0))
    both = _snapshot(build)
    assert {k: v for k, v in both.items() if "sm89" in k} == sm89  # untouched
    assert set(both) == set(sm89) | {"engines/sm80/vision.engine", "engines/sm80/llm.engine"}
    record = build_engines(build, EngineOptions(targets=("sm89",), artifacts=("llm",), optimization_level=0))
    after = _snapshot(build)
    assert after["engines/sm89/llm.engine"] != both["engines/sm89/llm.engine"]  # rebuilt ...
    assert {k: v for k, v in after.items() if k != "engines/sm89/llm.engine"} == {
        k: v for k, v in both.items() if k != "engines/sm89/llm.engine"}  # ... and only it
    listed = {(e["target"], e["artifact"]) for e in record["files"]}
    assert listed == {(t, a) for t in ("sm80", "sm89") for a in ("vision", "llm")}
    assert load_manifest(build).engines == record and record["targets"] == ["sm80", "sm89"]
    assert all(e["tensorrt"]["module"] == trt.__name__ and e["settings"]["max_batch"] == 4 for e in record["files"])
    assert not [p for p in build.iterdir() if p.name.startswith(".")]


def test_engine_runs_at_once_on_one_build_keep_each_others_engines(llava_build, tmp_path):
    """Two `engine` runs on one build at the same time (another target each): both engines are listed in the
    manifest (each run updates it under the build's lock, from the manifest as it is then)."""
    import threading

    build = _vision_and_llm_copy(llava_build, tmp_path / "build")
    errors = []

    def engine(target):
        try:
            build_engines(build, EngineOptions(targets=(target,), artifacts=("vision",), optimization_level=0))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    runs = [threading.Thread(target=engine, args=(target,)) for target in AOT_TARGETS]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert not errors
    listed = {(e["target"], e["artifact"]) for e in load_manifest(build).engines["files"]}
    assert listed == {(target, "vision") for target in AOT_TARGETS}
    assert set(_snapshot(build)) == {f"engines/{target}/vision.engine" for target in AOT_TARGETS}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no lock or staging folder left


def test_failed_engine_is_reported_and_the_others_kept(llava_build, tmp_path, monkeypatch, capsys):
    """An engine that fails leaves its previous engine as it was; the others of the run are built and
    listed; the command names what it built and what it could not, and exits 1."""
    from tests.test_cli import run_cli

    build = _vision_and_llm_copy(llava_build, tmp_path / "build")
    build_engines(build, EngineOptions(targets=("sm89",), artifacts=("llm",), optimization_level=0))
    before = _snapshot(build)

    from apet_export.errors import EngineBuildError
    from apet_export.export import trt_network

    real = trt_network.build_engine

    def fail_llm(trt_module, builder, logger, path, *args, **kwargs):
        if path.name == "llm.onnx":
            raise EngineBuildError("TensorRT could not build llm.onnx: simulated failure")
        return real(trt_module, builder, logger, path, *args, **kwargs)

    monkeypatch.setattr(trt_network, "build_engine", fail_llm)
    code, _, err = run_cli(capsys, "engine", str(build), "--target", "sm89,sm80", "--opt-level", "0")
    assert "failed sm89/llm: TensorRT could not build llm.onnx" in err  # said as it happens, per engine
    err = err.splitlines()[-1]  # after the progress lines: one error line
    assert code == 1 and err.startswith("error: 2 engine(s) could not be built")
    assert "sm89/llm: TensorRT could not build llm.onnx: simulated failure" in err and "sm80/llm" in err
    assert "built and kept: sm89/vision.engine, sm80/vision.engine" in err
    after = _snapshot(build)
    assert after["engines/sm89/llm.engine"] == before["engines/sm89/llm.engine"]  # the old engine, as it was
    assert set(after) == {f"engines/{t}/{a}.engine" for t in ("sm80", "sm89") for a in ("vision", "llm")} - {
        "engines/sm80/llm.engine"}
    record = load_manifest(build).engines
    assert {(e["target"], e["artifact"]) for e in record["files"]} == {("sm89", "llm"), ("sm89", "vision"), ("sm80", "vision")}
    assert set(record["failed"]) == {"sm89/llm", "sm80/llm"}
    assert not [p for p in build.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_fp8_is_refused_for_targets_without_fp8_hardware(llava_build, tmp_path, capsys):
    """Before anything is built: FP8 needs sm89+ (Ada, Hopper, ...), so sm80 gets the reason and the fix."""
    from tests.test_cli import run_cli

    build = _vision_and_llm_copy(llava_build, tmp_path / "build")
    data = json.loads((build / "manifest.json").read_text())
    data["precision"] = "fp8"  # only the manifest is read before the refusal
    (build / "manifest.json").write_text(json.dumps(data))
    code, _, err = run_cli(capsys, "engine", str(build), "--target", "sm89,sm80")
    assert code == 1 and "sm80 has no FP8 hardware (FP8 needs sm89 or newer" in err and err.count("\n") == 1
    assert not (build / "engines").exists() and not [p for p in build.iterdir() if p.name.startswith(".")]


def test_engine_selection_checks_version_and_gpu(llava_build, tmp_path):
    from apet_export.runtime.backends.trt import select_engines

    build = tmp_path / "build"
    shutil.copytree(llava_build, build, ignore=shutil.ignore_patterns("engines", "*.onnx", "model"))
    manifest = load_manifest(build)
    with pytest.raises(ArtifactError, match="no TensorRT engines: build them with `apet-export engine"):
        select_engines(build, manifest, trt.__name__, trt.__version__, "sm89")
    (build / "engines" / "sm89").mkdir(parents=True)
    (build / "engines" / "sm89" / "llm.engine").write_bytes(b"engine")
    manifest.engines = {
        "tensorrt": {"module": trt.__name__, "version": trt.__version__}, "targets": ["sm89"],
        "files": [{"artifact": "llm", "target": "sm89", "path": "engines/sm89/llm.engine"}],
    }
    assert select_engines(build, manifest, trt.__name__, trt.__version__, "sm89")["llm"]["path"].endswith("llm.engine")
    with pytest.raises(EngineCompatibilityError, match="was built by .* 1.7.1.116 and this is tensorrt 10.14.1"):
        select_engines(build, manifest, "tensorrt", "10.14.1", "sm89")
    with pytest.raises(EngineCompatibilityError, match="are for sm89 and this GPU is sm90: .*--target current"):
        select_engines(build, manifest, trt.__name__, trt.__version__, "sm90")


def test_engines_for_this_gpu_that_cannot_run_are_an_error(llava_build, tmp_path, monkeypatch):
    """parity / bench: no GPU or no engines for it is a skip (an error with --require-tensorrt); engines
    for this GPU whose TensorRT module is absent or of another version are an error, never a skip."""
    from apet_export.errors import MissingDependencyError
    from apet_export.runtime.backends import trt as trt_backend

    build = tmp_path / "build"
    shutil.copytree(llava_build, build, ignore=shutil.ignore_patterns("engines", "*.onnx", "model"))
    manifest = load_manifest(build)
    if not HAS_GPU:  # the CUDA runtime's answer, e.g. "cudaGetDeviceCount failed: CUDA driver version is ..."
        assert trt_backend.tensorrt_skip_reason(build, manifest).startswith("no CUDA GPU: ")
        with pytest.raises(DeviceError, match="--require-tensorrt: the TensorRT engines were not run \\(no CUDA GPU: "):
            trt_backend.tensorrt_skip_reason(build, manifest, require=True)
    monkeypatch.setattr(trt_backend, "probe_gpu", lambda: ("sm89", None))  # a GPU, as far as the check goes
    monkeypatch.setattr(trt_backend, "current_target", lambda: "sm89")
    assert "no TensorRT engines in the build" in trt_backend.tensorrt_skip_reason(build, manifest)
    (build / "engines" / "sm80").mkdir(parents=True)
    (build / "engines" / "sm80" / "llm.engine").write_bytes(b"engine")
    entry = {"artifact": "llm", "target": "sm80", "path": "engines/sm80/llm.engine",
             "tensorrt": {"module": trt.__name__, "version": trt.__version__}}
    manifest.engines = {"files": [entry]}
    assert "no engines for this GPU (sm89; the build has sm80)" in trt_backend.tensorrt_skip_reason(build, manifest)
    with pytest.raises(DeviceError, match="--require-tensorrt"):
        trt_backend.tensorrt_skip_reason(build, manifest, require=True)
    entry = {**entry, "target": "sm89", "path": "engines/sm89/llm.engine"}
    manifest.engines = {"files": [entry]}  # engines for this GPU, file missing
    with pytest.raises(ArtifactError, match="listed in the manifest but missing"):
        trt_backend.tensorrt_skip_reason(build, manifest)
    (build / "engines" / "sm80").rename(build / "engines" / "sm89")
    assert trt_backend.tensorrt_skip_reason(build, manifest) is None  # usable: parity and bench run them
    other = {**entry, "tensorrt": {"module": trt.__name__, "version": "1.0.0.1"}}
    manifest.engines = {"files": [other]}
    with pytest.raises(EngineCompatibilityError, match="built by .* 1.0.0.1 and this is"):
        trt_backend.tensorrt_skip_reason(build, manifest)
    # the module the manifest records is the one imported (not `tensorrt` first): absent here -> error
    manifest.engines = {"files": [{**entry, "tensorrt": {"module": "tensorrt", "version": "10.14.1"}}]}
    with pytest.raises(MissingDependencyError, match="tensorrt"):
        trt_backend.tensorrt_skip_reason(build, manifest)


@pytest.mark.skipif(HAS_GPU, reason="checks the message a machine without a GPU prints")
def test_tensorrt_backend_without_gpu_says_so(capsys, llava_build):
    from apet_export.bench import run_bench_with_tensorrt
    from apet_export.runtime.pipeline import Pipeline

    with pytest.raises(DeviceError, match="needs a CUDA GPU .* --backend onnxruntime"):
        Pipeline.from_dir(llava_build, backend="tensorrt")
    rows = run_bench_with_tensorrt(llava_build, "onnxruntime", [64], runs=1, max_new_tokens=2)
    assert {r.backend for r in rows} == {"onnxruntime"}
    assert "tensorrt: skipped (no CUDA GPU: " in capsys.readouterr().out
    from tests.test_cli import run_cli

    for command in ("bench", "parity"):  # GPU CI: a skip is a failure, said before any other work
        code, out, err = run_cli(capsys, command, str(llava_build), "--require-tensorrt")
        assert code == 1 and err.startswith("error: --require-tensorrt: the TensorRT engines were not run (no CUDA GPU: ")
        assert "budget" not in out  # no table was printed: nothing ran before the check


@pytest.mark.slow
def test_realistic_preset_builds_fp16_engines(tmp_path_factory):
    """CLIP-L/336 + Qwen2-0.5B-shaped LLM: the sizes where fused kernels and tactics matter."""
    out = _fp16_build(tmp_path_factory, "bench-llava-clip-l-qwen2-0.5b")
    record = build_engines(out, EngineOptions(targets=AOT_TARGETS, precision="fp16", optimization_level=0))
    built = {(f["target"], f["artifact"]) for f in record["files"]}
    assert {(t, a) for t in AOT_TARGETS for a in ("vision", "vision_plugin", "llm")} <= built
    for entry in record["files"]:
        print(f"{entry['target']} {entry['artifact']}: {entry['bytes'] / 2**20:.1f} MiB in {entry['build_seconds']} s")


@pytest.mark.skipif(not HAS_GPU, reason="runs engines: needs a CUDA GPU (scripts/gpu_end_to_end.sh runs it)")
def test_tensorrt_generation_matches_onnxruntime(tmp_path_factory):
    """On a GPU: engines for this GPU generate the same greedy tokens as onnxruntime (fp32 build)."""
    from apet_export.export.build import BuildOptions, build
    from apet_export.export.tensorrt import current_gpu_target
    from apet_export.runtime.pipeline import Pipeline

    out = tmp_path_factory.mktemp("gpu") / "tiny-llava"
    build(BuildOptions(model="tiny-llava", out=out))
    try:
        build_engines(out, EngineOptions(targets=("current",), optimization_level=0))
    except EngineTargetError as error:
        pytest.skip(f"this TensorRT cannot build for {current_gpu_target()}: {error}")
    from apet_export.runtime.images import synthetic_image

    tokens = {}
    for backend in ("onnxruntime", "tensorrt"):
        with Pipeline.from_dir(out, backend=backend) as pipeline:
            result = pipeline.generate([synthetic_image(0)], "Describe the image.", budget=64, max_new_tokens=16, stream=False)
            tokens[backend] = result.token_ids
            print(backend, result.summary())
    assert tokens["tensorrt"] == tokens["onnxruntime"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "sm70"], "cannot build engines for sm70: choose from"),
        (["--target", "sm89", "--precision", "fp16"], "rebuild with `apet-export build --precision fp16"),
        (["--target", "sm89", "--max-context", "99999"], "max context 99999 must be within 2..2048"),
        (["--target", "sm89", "--artifact", "nope"], "unknown ONNX artifact 'nope'"),
    ],
)
def test_engine_command_errors_are_one_line(capsys, llava_build, args, message):
    from tests.test_cli import run_cli

    code, _, err = run_cli(capsys, "engine", str(llava_build), *args)
    assert code == 1 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (llava_build / "engines").exists() and not list(llava_build.glob(".engines*"))


def test_two_stage_parts_build_engines(llava_two_stage_build, tmp_path):
    """llm_a, stage2 and llm_b get profiles from their axis names (stage2's image_start / image_length /
    keep as shape values) and build like llm.onnx."""
    build_dir = tmp_path / "two-stage"
    shutil.copytree(llava_two_stage_build, build_dir)
    parts = ("llm_a", "stage2", "llm_b")
    record = build_engines(build_dir, EngineOptions(targets=("sm89",), artifacts=parts, optimization_level=0))
    built = {entry["artifact"]: entry for entry in record["files"]}
    assert set(parts) <= set(built)
    for name in parts:
        print(f"sm89 {name}: {built[name]['bytes'] / 2**20:.1f} MiB in {built[name]['build_seconds']} s")
        assert (build_dir / built[name]["path"]).stat().st_size == built[name]["bytes"] > 0
    # stage 2 (and stage 1 with an explicit --budget1) go down to M + 1, below the average floor 2M + 1
    manifest = load_manifest(build_dir)
    lowest = manifest.compression.num_basis + 1
    assert manifest.budget["min"] == 2 * manifest.compression.num_basis + 1
    (stage2,) = built["stage2"]["profiles"]
    assert stage2["values"]["keep"][0] == lowest and stage2["values"]["image_length"][0] == lowest
    assert [p["name"] for p in built["llm_b"]["profiles"]] == ["prefill", "decode", "extend"]
