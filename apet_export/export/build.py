"""`apet-export build`: model -> artifacts directory, written atomically.

    --model (preset | local dir) ─► DIR/model/ (checkpoint + processor)
                                 ─► DIR/vision.plugin.onnx, DIR/vision.onnx     (vision + ApET stage 1, traced once)
                                 ─► DIR/llm.onnx                                (decoder, fused attention, KV cache)
                                 ─► DIR/manifest.json
Everything is written into a temporary sibling directory that is renamed to DIR at the end, so an
interrupted build never leaves a half-written DIR.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console

from apet_export.config import ApetConfig, ArtifactSpec, TensorSpec
from apet_export.errors import ArtifactError, InvalidInputError
from apet_export.export import staging as staging_dir
from apet_export.export.progress import stage_progress
from apet_export.manifest import Manifest
from apet_export.models.registry import PRESETS, family_for_checkpoint, get_family, prepare_checkpoint


@dataclass
class BuildOptions:
    model: str = "tiny-llava"
    out: Path = Path("build/tiny-llava")
    method: str = "apet"
    compression: ApetConfig = field(default_factory=ApetConfig)
    budget: int | None = None  # None: the family's default (64 tokens; Qwen2.5-VL: 30% of each image)
    precision: str = "fp32"
    opset: int = 23
    llm: bool = True
    stage2_layer: int | None = None  # split the decoder at layer K with ApET stage 2 between (llm_split.py)
    # None: the family's ApET variant (what the authors ran for it); "uniform": one rule for every family.
    # Replaces compression.variant (recorded in the manifest's compression).
    apet_variant: str | None = None
    force: bool = False
    trust_remote_code: bool = False


def checkpoint_sha256(directory: Path) -> str:
    """Content hash of the checkpoint's config and weights (file names and bytes, sorted)."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.suffix in (".json", ".safetensors") and path.is_file():
            digest.update(path.name.encode())
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def tool_versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    import torch
    import transformers

    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__,
    }


def check_options(options: BuildOptions) -> None:
    from apet_export.export.vision import EXPORTABLE_METHODS

    if options.method not in EXPORTABLE_METHODS:
        raise InvalidInputError(f"method {options.method!r} cannot be built: choose one of {', '.join(EXPORTABLE_METHODS)}")
    if options.method == "apet" and options.compression.selection == "random":
        raise InvalidInputError(
            "selection 'random' cannot be exported (its generator runs in Python at trace time): use fps or dpc"
        )
    if options.precision not in ("fp32", "fp16"):
        raise InvalidInputError(f"precision {options.precision!r} is not supported: choose fp32 or fp16")
    if options.stage2_layer is not None and (options.method != "apet" or not options.llm):
        raise InvalidInputError(
            "--stage2-layer needs --method apet and the LLM graphs: drop --no-llm / choose --method apet, "
            "or drop --stage2-layer"
        )
    if options.stage2_layer is not None:
        family = source_family(options.model)
        if family is not None and family.stage2_refusal:
            raise InvalidInputError(
                f"--stage2-layer is not available for {family.name}: {family.stage2_refusal}; drop --stage2-layer"
            )
    model = Path(options.model)  # a preset name is no path; a checkpoint directory is an input
    staging_dir.check_output(Path(options.out), options.force, {"--model": model if model.is_dir() else None})
    if model.is_dir():
        family_for_checkpoint(model)  # config.json readable, a JSON object, of a known family: before any work


def source_family(model: str):
    """The family of `--model` (a preset's, or a checkpoint directory's config.json), None if neither yet."""
    if model in PRESETS:
        return get_family(PRESETS[model].family)
    return family_for_checkpoint(Path(model)) if (Path(model) / "config.json").is_file() else None


def build_compression(options: BuildOptions, family) -> ApetConfig:
    """The build's ApET config with its variant: the family's own (the authors' released code) or uniform."""
    variant = options.apet_variant or family.apet_variant
    if variant not in (family.apet_variant, "uniform"):
        raise InvalidInputError(
            f"--apet-variant {variant} is not a variant of the {family.name} family: choose {family.apet_variant} "
            f"(the default, what the authors' released code runs) or uniform (one rule for every family)"
        )
    return replace(options.compression, variant=variant)


def check_against_model(options: BuildOptions, num_tokens: int) -> None:
    """Options that only the model's token count N can rule out (before minutes of export)."""
    config = options.compression
    if options.method == "apet" and config.num_basis >= num_tokens:
        raise InvalidInputError(
            f"--num-basis {config.num_basis} must be smaller than the model's {num_tokens} visual tokens "
            f"(each budget must exceed it): choose a smaller --num-basis, e.g. 10"
        )
    if isinstance(config.fps_start, int) and config.fps_start >= num_tokens:
        raise InvalidInputError(
            f"--fps-start {config.fps_start} is not a token index of this model (0 to {num_tokens - 1}): "
            f"choose an index below {num_tokens}, or 'norm'"
        )


def check_default_budget(family, manifest: Manifest, stage2_layer: int | None) -> None:
    """The build's default budget through the family's budget policy, the rules `run` applies to it (a
    whole-image budget across LLaVA-NeXT's crops, a two-stage average), before minutes of export."""
    two_stage = {"layer": stage2_layer} if stage2_layer is not None else {}
    policy = family.budget_policy(replace(manifest, stage2=two_stage))
    if manifest.budget["default"] is None:  # a share of each image's own tokens, whatever their number
        return
    if policy.unit == "frames":  # a video build's default is per frame
        policy.per_frame(None, 1)
    elif policy.compresses:
        policy.resolve()
    else:  # method none keeps every token, but a budget it names must still be one of this model's
        policy.check(manifest.budget["default"])


def build(options: BuildOptions, console: Console | None = None) -> Manifest:
    """Run every build step into a temporary directory, then move it to options.out."""
    from apet_export.export.vision import budget_floor, export_vision

    check_options(options)
    console = console or Console(stderr=True)
    out = Path(options.out).resolve()
    # DIR locked, stale staging folders removed; DIR appears only complete
    with staging_dir.staged_output(out, options.force) as staging, stage_progress(console) as progress:

        def step(description: str):
            return progress.add_task(description, total=1)

        task = step(f"model: {options.model}")
        checkpoint = staging / "model"
        source_id = prepare_checkpoint(options.model, checkpoint)
        family = source_family(options.model) or family_for_checkpoint(checkpoint)
        try:
            model, processor = family.load(checkpoint, trust_remote_code=options.trust_remote_code)
        except (OSError, ValueError) as error:  # name the user's checkpoint, not the staging copy
            raise ArtifactError(
                f"cannot load the checkpoint {options.model}: {str(error).replace(str(checkpoint), options.model)}"
            ) from error
        dims = family.vision_dims(model, processor)
        check_against_model(options, dims.num_tokens)
        compression = build_compression(options, family)
        minimum = budget_floor(options.method, compression)
        if options.stage2_layer is not None:  # --budget is the average of the two stages (compression/budget.py)
            from apet_export.compression.budget import average_budget_floor
            from apet_export.export.llm_split import check_stage2_layer

            check_stage2_layer(options.stage2_layer, len(family.language_model(model).layers))
            minimum = average_budget_floor(compression.num_basis)
        default_budget = options.budget if options.budget is not None else family.default_budget
        manifest = Manifest(  # its files, plugin and notes are filled in below, as each artifact is written
            source={"model": source_id, "sha256": checkpoint_sha256(checkpoint)},
            family=family.name,
            dims={
                "image_size": dims.image_size, "num_image_tokens": dims.num_tokens,
                "vision_hidden": dims.vision_hidden, "text_hidden": dims.text_hidden,
                "media": family.media, "prefix_tokens": family.prefix_tokens, **family.runtime_dims(model),
            },
            method=options.method,
            compression=compression,
            budget={
                "default": default_budget, "min": minimum + 1, "max": dims.num_tokens,
                # default None: keep this share of each image's tokens (dynamic resolution)
                **({"ratio": family.default_keep_ratio} if family.default_keep_ratio else {}),
            },
            precision=options.precision,
            opset=options.opset,
            files={},
            tool_versions=tool_versions(),
        )
        check_default_budget(family, manifest, options.stage2_layer)
        progress.update(task, completed=1)

        files, notes = manifest.files, manifest.notes
        plugin_graph = options.method == "apet" and compression.selection == "fps"  # what the plugin implements
        if plugin_graph:  # traced once, with the plugin node; vision.onnx is derived from it (plain_scoring.py)
            from apet_export.export.plain_scoring import write_plain_vision_graph
            from apet_export.plugins import apet_score

            task = step("vision.plugin.onnx: tower + ApET stage 1 (ApetScore plugin node) + projector")
            inputs, outputs = export_vision(
                model, family, options.method, compression, staging / "vision.plugin.onnx",
                use_plugin=True, opset=options.opset, precision=options.precision,
            )
            progress.update(task, completed=1)
            task = step("vision.onnx: the same graph, ApET scoring in standard ONNX ops")
            write_plain_vision_graph(staging / "vision.plugin.onnx", staging / "vision.onnx", compression, options.opset)
        else:
            task = step("vision.onnx: tower + ApET stage 1 + projector")
            inputs, outputs = export_vision(
                model, family, options.method, compression, staging / "vision.onnx", opset=options.opset,
                precision=options.precision,
            )
        files["vision"] = ArtifactSpec("vision.onnx", tuple(inputs), tuple(outputs))
        progress.update(task, completed=1)

        extras = family.extra_tensors(model)
        if extras:  # weights the runtime applies outside the graphs (e.g. LLaVA-NeXT's image_newline)
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in extras.items()}, str(staging / "vision_extras.safetensors"))
            specs = tuple(TensorSpec(k, "float32", tuple(v.shape)) for k, v in extras.items())
            files["vision_extras"] = ArtifactSpec("vision_extras.safetensors", (), specs)

        if plugin_graph:
            files["vision_plugin"] = ArtifactSpec("vision.plugin.onnx", tuple(inputs), tuple(outputs))
            manifest.plugin = {
                "op_type": apet_score.OP_TYPE, "domain": apet_score.DOMAIN,
                "plugin_namespace": apet_score.PLUGIN_NAMESPACE, "plugin_version": apet_score.PLUGIN_VERSION,
            }
        else:
            notes.append("vision.plugin.onnx not built: the ApetScore plugin implements method apet with fps selection")

        if options.llm and options.stage2_layer is not None:
            from apet_export.export.llm_split import export_split_llm_artifacts

            task = step(f"llm_a.onnx, stage2.onnx, llm_b.onnx: decoder split at layer {options.stage2_layer}")
            export_split_llm_artifacts(model, family, staging, manifest, options.precision, options.stage2_layer)
            progress.update(task, completed=1)
        elif options.llm:
            from apet_export.export.cpu_graph import add_cpu_graph
            from apet_export.export.llm import export_llm_artifacts

            task = step("llm.onnx: decoder with fused attention and KV cache")
            export_llm_artifacts(model, family, staging, manifest, options.precision)
            add_cpu_graph(staging, manifest)  # llm.cpu.onnx: the same decoder, its cache written in place (CPU)
            progress.update(task, completed=1)
        manifest.write(staging)
    console.print(f"[green]built[/green] {out}")
    return manifest
