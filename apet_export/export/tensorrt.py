"""`apet-export engine DIR`: TensorRT engines for every ONNX graph of a build, written atomically to DIR/engines/.

    DIR/manifest.json + vision.onnx, vision.plugin.onnx, llm.onnx (any ONNX artifact it lists)
      │ per target (sm80, sm89, ... or the GPU here), per graph: parse → profiles → build (trt_network.py)
      ▼
    DIR/engines/<target>/<artifact>.engine, DIR/engines/timing.cache, manifest["engines"]["files"]

A separate step rather than `build --engine`, because engines and ONNX have different lifetimes: an
engine is tied to one GPU architecture and one TensorRT version, the ONNX graphs to neither. A build is
exported once (on any machine) and gets engines wherever they are needed: ahead of time on a CPU machine
for named compute capabilities with TensorRT-RTX, on a Jetson or an H100 with that machine's TensorRT
(`--target current`); a new TensorRT version rebuilds engines without re-exporting the model.

Precision: TensorRT networks are strongly typed (TensorRT 11 has nothing else), so an engine has the
precision of its graph: fp16 engines come from `apet-export build --precision fp16`; `--precision` here
only checks that the build is what the caller expects.

Engines of different targets and artifacts live side by side: a run replaces only the (target, artifact)
engines it builds. Each is built into DIR/.engines.tmp-*, then renamed over its place once every engine of
the run was tried, and the manifest (which lists every engine with the TensorRT module, version and settings
that built it) is rewritten atomically after that. An engine that fails to build is reported by name with
its reason and leaves its previous engine (if any) as it was; the run then fails (EngineBuildError) after
keeping what did build.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from apet_export.compat import import_tensorrt, is_tensorrt_rtx
from apet_export.errors import ArtifactError, EngineTargetError, InvalidInputError, UnknownNameError
from apet_export.manifest import load_manifest
from apet_export.outputs import unwritable_reason

ENGINES_DIR = "engines"
TIMING_CACHE = "timing.cache"
PLUGIN_ARTIFACTS = ("vision_plugin",)  # graphs with the ApetScore node: need the TensorRT plugin registered


@dataclass(frozen=True)
class EngineOptions:
    targets: tuple[str, ...] = ("current",)  # "smXY" names, or "current" (this machine's GPU)
    precision: str | None = None  # checked against the build's graphs (engines take their precision)
    artifacts: tuple[str, ...] | None = None  # manifest artifact names; None = every ONNX graph
    optimization_level: int = 3  # TensorRT builder optimisation level, 0 (fast builds) .. 5
    max_batch: int = 4  # upper end of every "batch" axis
    max_context: int | None = None  # cap of the decoder's sequence axes; None = dims.max_context


@dataclass(frozen=True)
class Target:
    name: str  # "sm89"
    capability: object | None  # trt.ComputeCapability (TensorRT-RTX), None = the GPU here (full TensorRT)


def current_gpu_target() -> str | None:
    """'sm90' for this machine's first CUDA GPU, None without one (asked of the CUDA runtime, as the tensorrt
    backend does when it picks the engines to load)."""
    from apet_export.export.cuda_device import gpu_target

    return gpu_target()


def _normalise_target(name: str) -> str:
    name = name.strip().lower()
    if name == "current" or (name.startswith("sm") and name[2:].isdigit()):
        return name
    raise EngineTargetError(f"target {name!r} is not a compute capability: write smXY (e.g. sm80, sm89) or 'current'")


def resolve_targets(trt, requested: Sequence[str], gpu: str | None = None) -> list[Target]:
    """The build targets, or EngineTargetError naming what this TensorRT can build for."""
    names = list(dict.fromkeys(_normalise_target(n) for n in requested))
    if not names:
        raise EngineTargetError("no target given: pass --target current or e.g. --target sm80,sm89")
    if is_tensorrt_rtx(trt) or hasattr(trt, "ComputeCapability"):
        known = {m.lower(): m for m in trt.ComputeCapability.__members__ if m.startswith("SM")}
        targets = []
        for name in names:
            if name == "current":
                if gpu is None:
                    raise EngineTargetError(
                        "--target current needs a CUDA GPU on this machine and there is none: name the targets "
                        f"to build ahead of time, e.g. --target sm80,sm89 (this TensorRT builds {', '.join(known)})"
                    )
                capability = getattr(trt.ComputeCapability, known[gpu]) if gpu in known else trt.ComputeCapability.CURRENT
                targets.append(Target(gpu, capability))
            elif name in known:
                targets.append(Target(name, getattr(trt.ComputeCapability, known[name])))
            else:
                raise EngineTargetError(
                    f"{trt.__name__} {trt.__version__} cannot build engines for {name}: choose from "
                    f"{', '.join(known)} or 'current'"
                )
        return list({t.name: t for t in targets}.values())
    # Full TensorRT builds for the GPU it runs on (hardware-compatible engines aside).
    if gpu is None:
        raise EngineTargetError(
            f"TensorRT {trt.__version__} builds engines only for the GPU it runs on and this machine has none: "
            f"run `apet-export engine` on the target GPU, or install TensorRT-RTX to build ahead of time for a "
            f"named compute capability (pip install -e '.[trt-rtx]')"
        )
    for name in names:
        if name not in ("current", gpu):
            raise EngineTargetError(
                f"TensorRT {trt.__version__} builds only for this machine's GPU ({gpu}), not {name}: run "
                f"`apet-export engine DIR --target current` on a {name} machine"
            )
    return [Target(gpu, None)]


def onnx_artifacts(build_dir: Path, manifest, only: Sequence[str] | None) -> list[str]:
    """The manifest's ONNX artifacts to build (checked to exist)."""
    # llm_cpu (llm.cpu.onnx) is onnxruntime's CPU form of llm.onnx: no engine of its own
    graphs = [name for name, spec in manifest.files.items() if spec.path.endswith(".onnx") and name != "llm_cpu"]
    if not graphs:
        raise ArtifactError(
            f"{build_dir} has no ONNX graphs to build engines from (artifacts: {', '.join(manifest.files) or 'none'}): "
            f"export them with `apet-export build --out {build_dir}`"
        )
    if only:
        for name in only:
            if name not in graphs:
                raise UnknownNameError("ONNX artifact", name, graphs)
        graphs = [name for name in graphs if name in only]
    for name in graphs:
        manifest.file(build_dir, name)  # ArtifactError if listed but missing
    return graphs


def register_plugins(trt) -> str | None:
    """Register the ApetScore TensorRT plugin; the reason it is unavailable, or None."""
    try:
        from apet_export.plugins.trt_plugin import register_apet_score_plugin
    except ImportError as error:
        return f"the ApetScore TensorRT plugin is not available ({error})"
    register_apet_score_plugin(trt)
    return None


def check_options(build_dir: Path, manifest, options: EngineOptions) -> None:
    if options.precision is not None and options.precision != manifest.precision:
        raise InvalidInputError(
            f"the graphs in {build_dir} are {manifest.precision} and TensorRT networks are strongly typed (an "
            f"engine has its graph's precision): rebuild with `apet-export build --precision {options.precision} "
            f"--out {build_dir} --force`, then run `apet-export engine` again"
        )
    if options.max_batch < 1:
        raise InvalidInputError(f"max batch must be >= 1, got {options.max_batch}")
    if not 0 <= options.optimization_level <= 5:
        raise InvalidInputError(f"the builder optimisation level must be within 0..5, got {options.optimization_level}")
    context = manifest.dims.get("max_context")
    if options.max_context is not None and not (context and 2 <= options.max_context <= context):
        raise InvalidInputError(
            f"max context {options.max_context} must be within 2..{context} (the model's context): choose a cap in that range"
        )


class Stages:
    """A spinner per stage on a terminal; one plain line per finished stage otherwise (CI logs)."""

    def __init__(self, console: Console):
        self.console = console

    @contextlib.contextmanager
    def stage(self, description: str):
        start = time.perf_counter()
        status = self.console.status(description) if self.console.is_terminal else contextlib.nullcontext()
        with status:
            yield
        self.console.print(f"[green]done[/green] {description} ({time.perf_counter() - start:.1f} s)")


FP8_MIN_CAPABILITY = 89  # FP8 tensor cores: Ada (SM89), Hopper (SM90) and later; not Ampere (SM80/86/87)


def capability_number(target: str) -> int:
    """'sm89' -> 89 (targets are checked to be smXY before this is called)."""
    return int(target[2:])


def check_quantized_targets(manifest, targets: list[Target]) -> None:
    """Refuse, before building anything, a (precision, target) cell TensorRT cannot build."""
    if manifest.precision == "fp8":
        lacking = [t.name for t in targets if capability_number(t.name) < FP8_MIN_CAPABILITY]
        if lacking:
            raise EngineTargetError(
                f"this build is fp8 and {', '.join(lacking)} has no FP8 hardware (FP8 needs sm89 or newer: Ada, "
                f"Hopper, Blackwell): build its engines for sm89+ only, or calibrate an int8 build for "
                f"{', '.join(lacking)} (`apet-export calibrate ... --precision int8`)"
            )


@dataclass
class RunResult:
    """What one `engine` run did, per (target, artifact)."""

    built: list[dict]  # manifest entries of the engines built and moved into place
    failed: dict[str, str]  # "sm80/llm" -> why it could not be built
    skipped: dict[str, str]  # artifact -> why it was not attempted (a plugin not available here)


def engine_key(target: str, artifact: str) -> str:
    return f"{target}/{artifact}"


def build_settings(trt, options: EngineOptions, manifest) -> dict:
    from apet_export.export.trt_network import has_timing_cache

    return {
        "strongly_typed": True, "tf32": False, "builder_optimization_level": options.optimization_level,
        "max_batch": options.max_batch,
        "max_context": options.max_context or manifest.dims.get("max_context"),
        "decomposable_attention": True,
        # TensorRT-RTX does not time tactics ahead of time: no cache to save there
        "timing_cache": f"{ENGINES_DIR}/{TIMING_CACHE}" if has_timing_cache(trt) else None,
    }


def build_engines(build_dir: Path, options: EngineOptions = EngineOptions(), console: Console | None = None) -> dict:
    """Build the engines of every (target, ONNX artifact) into DIR/engines/<target>/; returns manifest["engines"].

    Engines this run does not build stay as they are. EngineBuildError (after the others are in place)
    when any engine could not be built, naming each with its reason."""
    from apet_export.errors import EngineBuildError

    console = console or Console(stderr=True)
    build_dir = Path(build_dir).resolve()
    manifest = load_manifest(build_dir)
    check_options(build_dir, manifest, options)
    unwritable = unwritable_reason(build_dir / "manifest.json")  # engines/ and the manifest are written there
    if unwritable:
        raise ArtifactError(f"cannot write engines into {build_dir} ({unwritable}): make the build writable, or "
                            f"copy it somewhere writable and run engine there")
    graphs = onnx_artifacts(build_dir, manifest, options.artifacts)
    trt = import_tensorrt()
    targets = resolve_targets(trt, options.targets, current_gpu_target())
    check_quantized_targets(manifest, targets)

    skipped = {}
    if any(name in PLUGIN_ARTIFACTS for name in graphs):
        reason = register_plugins(trt)
        if reason:
            asked = [name for name in graphs if name in PLUGIN_ARTIFACTS and name in (options.artifacts or ())]
            if asked:  # named on the command line: not building it is a failure, not a skip
                raise EngineBuildError(f"cannot build {', '.join(asked)}: {reason}")
            skipped = {name: reason for name in graphs if name in PLUGIN_ARTIFACTS}
            graphs = [name for name in graphs if name not in skipped]
            console.print(f"[yellow]skipped[/yellow] {', '.join(skipped)}: {reason}")

    final = build_dir / ENGINES_DIR
    staging = Path(tempfile.mkdtemp(prefix=f".{ENGINES_DIR}.tmp-", dir=build_dir))
    try:
        result = _build_into(staging, trt, build_dir, manifest, graphs, targets, options, Stages(console))
        result.skipped = skipped
        record = _publish(staging, final, build_dir, result)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    built = sum(f["bytes"] for f in result.built) / 2**20
    names = ", ".join(f["path"].removeprefix(f"{ENGINES_DIR}/") for f in result.built) or "none"
    console.print(f"[green]built[/green] {len(result.built)} engine(s), {built:.1f} MiB, in {final}: {names}")
    if result.failed:
        failures = "; ".join(f"{key}: {why}" for key, why in result.failed.items())
        raise EngineBuildError(
            f"{len(result.failed)} engine(s) could not be built ({failures}); built and kept: {names}"
        )
    return record


def _build_into(staging: Path, trt, build_dir: Path, manifest, graphs, targets, options, stages) -> RunResult:
    """Build every (target, graph) engine into staging/<target>/<graph>.engine; a failure is recorded for that
    engine and the run goes on."""
    from apet_export.errors import EngineBuildError
    from apet_export.export.trt_network import build_engine, has_timing_cache, make_logger
    from apet_export.export.trt_profiles import profiles_for

    old_cache = build_dir / ENGINES_DIR / TIMING_CACHE
    timing_cache = old_cache.read_bytes() if old_cache.is_file() else None
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    settings = build_settings(trt, options, manifest)
    result = RunResult([], {}, {})
    for target in targets:
        (staging / target.name).mkdir()
        for name in graphs:
            source = manifest.file(build_dir, name)
            relative = f"{ENGINES_DIR}/{target.name}/{name}.engine"
            profiles = profiles_for(manifest, name, options.max_batch, options.max_context)
            start = time.perf_counter()
            try:
                with stages.stage(f"{target.name}: {source.name} -> {relative}"):
                    engine, timing_cache, marked = build_engine(
                        trt, builder, logger, source, profiles, target.capability, timing_cache,
                        options.optimization_level,
                    )
                    (staging / target.name / f"{name}.engine").write_bytes(engine)
            except EngineBuildError as error:
                result.failed[engine_key(target.name, name)] = str(error)
                stages.console.print(f"[red]failed[/red] {engine_key(target.name, name)}: {error}")
                continue
            result.built.append({
                "artifact": name, "target": target.name, "path": relative, "bytes": len(engine),
                "tensorrt": {"module": trt.__name__, "version": trt.__version__},
                "precision": manifest.precision, "settings": settings,
                "build_seconds": round(time.perf_counter() - start, 2), "decomposable_attention": marked,
                "profiles": [p.to_dict() for p in profiles],
            })
    if has_timing_cache(trt) and timing_cache is not None and not isinstance(timing_cache, bytes):
        (staging / TIMING_CACHE).write_bytes(bytes(timing_cache.serialize()))
    return result


def _publish(staging: Path, final: Path, build_dir: Path, result: RunResult) -> dict:
    """Move each staged engine over its place (one rename each), then rewrite the manifest atomically with
    the engines of earlier runs that this run did not replace. Under DIR's lock, with the manifest read
    again: an `engine` run that finished meanwhile (another target, another artifact) keeps its entries."""
    from apet_export.export.staging import updating

    with updating(build_dir):
        manifest = load_manifest(build_dir)
        for entry in result.built:
            (final / entry["target"]).mkdir(parents=True, exist_ok=True)
            os.replace(staging / entry["target"] / f"{entry['artifact']}.engine", build_dir / entry["path"])
        if (staging / TIMING_CACHE).is_file() and final.is_dir():
            os.replace(staging / TIMING_CACHE, final / TIMING_CACHE)
        replaced = {engine_key(e["target"], e["artifact"]) for e in result.built}
        previous = [e for e in earlier_engines(manifest.engines)
                    if engine_key(e["target"], e["artifact"]) not in replaced]
        files = sorted(previous + result.built, key=lambda e: (e["target"], e["artifact"]))
        record = {
            "targets": sorted({e["target"] for e in files}),
            "files": files,
            "skipped": {**manifest.engines.get("skipped", {}), **result.skipped} if manifest.engines else result.skipped,
            "failed": result.failed,  # of the last run: what it could not build, and why
        }
        for entry in result.built:  # an artifact built now is no longer skipped
            record["skipped"].pop(entry["artifact"], None)
        manifest.engines = record
        manifest.write(build_dir)
    return record


def earlier_engines(record: dict) -> list[dict]:
    """The engine entries of an existing manifest["engines"], each with its TensorRT module, version,
    precision and settings (records written before engines lived side by side carried these once, for all)."""
    if not record:
        return []
    shared = {key: record[key] for key in ("tensorrt", "precision", "settings") if key in record}
    return [{**shared, **entry} for entry in record.get("files", [])]
