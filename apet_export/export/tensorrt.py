"""`apet-export engine DIR`: TensorRT engines for every ONNX graph of a build, written atomically to DIR/engines/.

    DIR/manifest.json + vision.onnx, vision.plugin.onnx, llm.onnx (any ONNX artifact it lists)
      │ per target (sm80, sm89, ... or the GPU here), per graph: parse → profiles → build (trt_network.py)
      ▼
    DIR/engines/<target>/<artifact>.engine, DIR/engines/timing.cache, manifest["engines"]

A separate step rather than `build --engine`, because engines and ONNX have different lifetimes: an
engine is tied to one GPU architecture and one TensorRT version, the ONNX graphs to neither. A build is
exported once (on any machine) and gets engines wherever they are needed: ahead of time on a CPU machine
for named compute capabilities with TensorRT-RTX, on a Jetson or an H100 with that machine's TensorRT
(`--target current`); a new TensorRT version rebuilds engines without re-exporting the model.

Precision: TensorRT networks are strongly typed (TensorRT 11 has nothing else), so an engine has the
precision of its graph: fp16 engines come from `apet-export build --precision fp16`; `--precision` here
only checks that the build is what the caller expects.

Everything is built into DIR/.engines.tmp-*; engines/ is replaced by renames and the manifest rewritten
atomically only once every engine is built, so a failure leaves the previous engines/ as it was.
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
    """'sm90' for this machine's first CUDA GPU, None without one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
    except (ImportError, RuntimeError):
        return None
    return f"sm{major}{minor}"


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


def build_engines(build_dir: Path, options: EngineOptions = EngineOptions(), console: Console | None = None) -> dict:
    """Build the engines of every (target, ONNX artifact) into DIR/engines/; returns manifest["engines"]."""
    from apet_export.export.trt_network import build_engine, has_timing_cache, make_logger
    from apet_export.export.trt_profiles import profiles_for

    console = console or Console(stderr=True)
    build_dir = Path(build_dir).resolve()
    manifest = load_manifest(build_dir)
    check_options(build_dir, manifest, options)
    graphs = onnx_artifacts(build_dir, manifest, options.artifacts)
    trt = import_tensorrt()
    targets = resolve_targets(trt, options.targets, current_gpu_target())

    skipped = {}
    if any(name in PLUGIN_ARTIFACTS for name in graphs):
        reason = register_plugins(trt)
        if reason:
            skipped = {name: reason for name in graphs if name in PLUGIN_ARTIFACTS}
            graphs = [name for name in graphs if name not in skipped]
            console.print(f"[yellow]skipped[/yellow] {', '.join(skipped)}: {reason}")

    final = build_dir / ENGINES_DIR
    old_cache = final / TIMING_CACHE
    timing_cache = old_cache.read_bytes() if old_cache.is_file() else None
    staging = Path(tempfile.mkdtemp(prefix=f".{ENGINES_DIR}.tmp-", dir=build_dir))
    stages = Stages(console)
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    files = []
    try:
        for target in targets:
            (staging / target.name).mkdir()
            for name in graphs:
                source = manifest.file(build_dir, name)
                relative = f"{ENGINES_DIR}/{target.name}/{name}.engine"
                profiles = profiles_for(manifest, name, options.max_batch, options.max_context)
                start = time.perf_counter()
                with stages.stage(f"{target.name}: {source.name} -> {relative}"):
                    engine, timing_cache, marked = build_engine(
                        trt, builder, logger, source, profiles, target.capability, timing_cache,
                        options.optimization_level,
                    )
                    (staging / target.name / f"{name}.engine").write_bytes(engine)
                files.append({
                    "artifact": name, "target": target.name, "path": relative, "bytes": len(engine),
                    "build_seconds": round(time.perf_counter() - start, 2), "decomposable_attention": marked,
                    "profiles": [p.to_dict() for p in profiles],
                })
        if has_timing_cache(trt) and timing_cache is not None and not isinstance(timing_cache, bytes):
            (staging / TIMING_CACHE).write_bytes(bytes(timing_cache.serialize()))
        staging.chmod(0o755)
        record = {
            "tensorrt": {"module": trt.__name__, "version": trt.__version__},
            "precision": manifest.precision,
            "targets": [t.name for t in targets],
            "settings": {
                "strongly_typed": True, "tf32": False, "builder_optimization_level": options.optimization_level,
                "max_batch": options.max_batch,
                "max_context": options.max_context or manifest.dims.get("max_context"),
                "decomposable_attention": True,
                # TensorRT-RTX does not time tactics ahead of time: no cache to save there
                "timing_cache": f"{ENGINES_DIR}/{TIMING_CACHE}" if has_timing_cache(trt) else None,
            },
            "files": files,
            "skipped": skipped,
        }
        _swap_into_place(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest.engines = record
    manifest.write(build_dir)
    total = sum(f["bytes"] for f in files) / 2**20
    console.print(f"[green]built[/green] {len(files)} engine(s), {total:.1f} MiB, in {final}")
    return record


def _swap_into_place(staging: Path, final: Path) -> None:
    """Replace `final` by `staging` with renames only; the previous engines are removed after the swap."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    staging.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
