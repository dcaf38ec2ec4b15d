"""The `apet-export` command line: a click group; each command is a thin wrapper over a library function."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import click
from rich.console import Console

from apet_export import __version__
from apet_export.compat import require_export_extra
from apet_export.config import VARIANTS
from apet_export.errors import ApetExportError, InvalidInputError
from apet_export.outputs import DISK_FULL, check_output_file, describe, unwritable_reason, write_atomically

# Tables are wide: don't squeeze them to 80 columns when the output is a pipe or a CI log.
console = Console(width=None if sys.stdout.isatty() else 160)
status_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)  # off stdout's streamed text


def stage_pair(budget1: int | None, budget2: int | None) -> tuple[int, int] | None:
    """--budget1/--budget2 of a two-stage build, given together (--budget2 alone has no stage 1)."""
    if budget1 is None and budget2 is None:
        return None
    if budget1 is None or budget2 is None:
        raise click.BadParameter("give --budget1 and --budget2 together")
    return budget1, budget2


def parse_budgets(_ctx, _param, value: str | None) -> list[int] | None:
    """None when the option is absent (the command's default); an empty or invalid value is an error."""
    if value is None:
        return None
    example = "a comma-separated list of budgets, e.g. 16,64,192"
    parts = [v.strip() for v in value.split(",")]
    if not all(parts):
        raise click.BadParameter(f"{value!r} has an empty entry: pass {example} (omit --budgets for the default)")
    try:
        budgets = [int(v) for v in parts]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not {example}") from None
    if min(budgets) < 1:
        raise click.BadParameter(f"{value!r}: a budget is a number of tokens kept, at least 1")
    return budgets


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="apet-export")
def cli():
    """Export vision-language models with ApET visual-token compression, check parity, run them."""


@cli.command()
@click.option("--model", default="tiny-llava", show_default=True, help="a preset name or a local HF checkpoint directory")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="build directory to create")
@click.option("--method", type=click.Choice(["apet", "visionzip", "none"]), default="apet", show_default=True)
@click.option("--num-basis", default=10, show_default=True, help="ApET basis size M")
@click.option("--selection", type=click.Choice(["fps", "dpc"]), default="fps", show_default=True)
@click.option("--ridge", default=1e-5, show_default=True, help="ridge lambda of the least squares")
@click.option("--fps-start", default="norm", show_default=True, help="'norm' or a token index")
@click.option("--budget", type=int, default=None,
              help="default visual-token budget (runtime input; default 64, Qwen2.5-VL: 30% of each image's tokens)")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True, help="graph precision: fp16 = vision tower, projector and LLM in fp16 (ApET stays fp32), what fp16 TensorRT engines need")
@click.option("--no-llm", is_flag=True, help="export the vision graphs only")
@click.option("--stage2-layer", type=int, default=None,
              help="ApET stage 2 after decoder layer K: llm_a.onnx + stage2.onnx + llm_b.onnx (--budget is then the average, 64 = 96/32)")
@click.option("--apet-variant", type=click.Choice(VARIANTS), default=None,
              help="where ApET puts the basis features and in which order the kept rows come: default the family's "
                   "own (what the authors' released code runs for it); 'uniform' = one rule for every family")
@click.option("--force", is_flag=True, help="replace an existing --out")
@click.option("--trust-remote-code", is_flag=True, help="allow code from the checkpoint directory (off by default)")
def build(model, out, method, num_basis, selection, ridge, fps_start, budget, precision, no_llm, stage2_layer, apet_variant, force, trust_remote_code):
    """Export vision (+ ApET) and LLM graphs, the checkpoint and a manifest into OUT."""
    require_export_extra("build (it exports the PyTorch model)")
    from apet_export.config import ApetConfig
    from apet_export.export.build import BuildOptions
    from apet_export.export.build import build as run_build

    start = int(fps_start) if fps_start.isdigit() else fps_start
    options = BuildOptions(
        model=model, out=out, method=method, budget=budget, precision=precision, llm=not no_llm, force=force,
        compression=ApetConfig(num_basis=num_basis, selection=selection, ridge=ridge, fps_start=start),
        trust_remote_code=trust_remote_code, stage2_layer=stage2_layer, apet_variant=apet_variant,
    )
    run_build(options, console=status_console)


@cli.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--target", "targets", default="current", show_default=True,
              help="comma-separated compute capabilities (sm80,sm89; TensorRT-RTX builds them ahead of time) or 'current'")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default=None,
              help="expected graph precision (engines are strongly typed: fp16 engines need `build --precision fp16`)")
@click.option("--artifact", "artifacts", multiple=True, help="only these manifest artifacts (default: every ONNX graph)")
@click.option("--opt-level", default=3, show_default=True, help="TensorRT builder optimisation level 0..5 (0: fastest build)")
@click.option("--max-batch", default=4, show_default=True, help="upper end of the batch axis in every profile")
@click.option("--max-context", type=int, default=None, help="cap of the LLM sequence axes (default: the model's context)")
def engine(build_dir, targets, precision, artifacts, opt_level, max_batch, max_context):
    """Build TensorRT engines for BUILD_DIR's ONNX graphs into BUILD_DIR/engines/ (atomically)."""
    from apet_export.export.tensorrt import EngineOptions, build_engines

    options = EngineOptions(
        targets=tuple(t for t in targets.split(",") if t.strip()), precision=precision,
        artifacts=tuple(artifacts) or None, optimization_level=opt_level, max_batch=max_batch, max_context=max_context,
    )
    build_engines(build_dir, options, console=status_console)


@cli.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--images", "-i", multiple=True, type=click.Path(path_type=Path), help="images to check with (default: generated)")
@click.option("--budgets", callback=parse_budgets, help="comma-separated budgets (default: 16,64,192,N)")
@click.option("--e2e/--no-e2e", default=True, show_default=True, help="also compare end-to-end generation")
@click.option("--budget1", type=int, default=None, help="two-stage builds: e2e at this stage-1 budget (with --budget2)")
@click.option("--budget2", type=int, default=None, help="two-stage builds: e2e at this stage-2 budget")
@click.option("--min-cosine-mean", type=float, help="quantised builds: image-embedding cosine mean (default 0.99)")
@click.option("--min-cosine", type=float, help="quantised builds: image-embedding cosine min (default 0.90)")
@click.option("--min-keep-overlap", type=float, help="quantised builds: kept-index overlap %%, ties within ±1 grey level of noise agree (default 80; fp8 70)")
@click.option("--max-logit-diff", type=float, help="quantised builds: first-step max|dlogit| / max|logit| at budget N (default 0.10; fp8 0.35)")
@click.option("--min-token-agreement", type=float, help="quantised builds: greedy 32-token agreement at budget N (default 0.5; fp8 0.4)")
@click.option("--require-tensorrt", is_flag=True, help="fail instead of skipping the TensorRT engines (GPU CI)")
def parity(
    build_dir, images, budgets, e2e, budget1, budget2, min_cosine_mean, min_cosine, min_keep_overlap, max_logit_diff,
    min_token_agreement, require_tensorrt,
):
    """Compare every artifact in BUILD_DIR against eager PyTorch; writes parity.json, exits 1 on failure.

    On a quantised build (apet-export calibrate): its accuracy cost against the fp32 build and eager PyTorch."""
    require_export_extra("parity (it compares against eager PyTorch)")
    from apet_export.manifest import load_manifest
    from apet_export.parity.quantized import AccuracyThresholds
    from apet_export.parity.run import run_parity

    manifest = load_manifest(build_dir)
    reason = unwritable_reason(build_dir / "parity.json")  # checked first: the results are printed either way
    if reason:
        status_console.print(f"[yellow]warning:[/yellow] parity.json cannot be written ({reason}): the results "
                             f"will be printed but not saved")
    thresholds = AccuracyThresholds.for_precision(
        manifest.precision, min_cosine_mean=min_cosine_mean, min_cosine_min=min_cosine,
        min_keep_overlap=min_keep_overlap, max_logit_diff=max_logit_diff, min_token_agreement=min_token_agreement,
    )
    pair = stage_pair(budget1, budget2)
    run_parity(build_dir, list(images) or None, budgets, e2e=e2e, console=console, pair=pair, thresholds=thresholds,
               require_tensorrt=require_tensorrt)


@cli.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--images", "images", type=click.Path(path_type=Path), required=True, help="folder of calibration pictures (recursive)")
@click.option("--prompts", type=click.Path(path_type=Path), help="text file, one prompt per line (default: a built-in set)")
@click.option("--precision", type=click.Choice(["int8", "fp8"]), required=True)
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax", show_default=True)
@click.option("--samples", default=32, show_default=True, help="images to calibrate on (a seeded sample)")
@click.option("--out", type=click.Path(path_type=Path), help="quantised build to create (default: BUILD_DIR-PRECISION)")
@click.option("--llm-bits", type=click.Choice(["8", "4"]), default="8", show_default=True, help="int8 builds: weight-only bits of llm.onnx")
@click.option("--seed", default=0, show_default=True, help="seed of the image sample")
@click.option("--force", is_flag=True, help="replace an existing --out")
def calibrate(build_dir, images, prompts, precision, method, samples, out, llm_bits, seed, force):
    """Calibrate BUILD_DIR's graphs on pictures and write an INT8 / FP8 build beside it."""
    require_export_extra("calibrate (it reads the checkpoint with transformers and rewrites graphs with onnx-ir)")
    from apet_export.calibration.build import CalibrationOptions
    from apet_export.calibration.build import calibrate as run_calibrate

    run_calibrate(CalibrationOptions(
        build_dir=build_dir, images=images, precision=precision, method=method, samples=samples, prompts=prompts,
        out=out, llm_bits=int(llm_bits), seed=seed, force=force,
    ), console=status_console)


@cli.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
def inspect(build_dir):
    """Summarise a build: manifest, graph inputs/outputs, op histogram."""
    from apet_export.inspect import inspect_build

    inspect_build(build_dir, console)


@cli.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--image", type=click.Path(path_type=Path), help="image to draw (default: a generated test picture)")
@click.option("--budget", type=int, default=None, help="tokens kept (default: the build's)")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="PNG to write")
def visualize(build_dir, image, budget, output):
    """Draw the approximation-error heatmap and the kept tokens next to the image."""
    require_export_extra("visualize (it runs the eager ApET reference)")
    from apet_export.visualize import visualize_build

    visualize_build(build_dir, image, budget, output)
    status_console.print(f"wrote {output}")


@cli.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="image(s) to ask about (default: a generated test picture)")
@click.option("--video", type=click.Path(path_type=Path), default=None,
              help="a video to ask about (video builds): frames are sampled uniformly and encoded as decoded")
@click.option("--frames", "num_frames", default=8, show_default=True, help="frames sampled from --video")
@click.option("--prompt", required=True)
@click.option("--budget", type=int, default=None,
              help="visual tokens kept per image, or for the whole --video, split evenly across its frames "
                   "(default: the build's, per image or frame)")
@click.option("--budget1", type=int, default=None, help="two-stage builds: tokens kept by stage 1 (vision)")
@click.option("--budget2", type=int, default=None, help="two-stage builds: tokens kept by stage 2 (LLM layer K)")
@click.option("--backend", type=click.Choice(["onnxruntime", "torch", "tensorrt"]), default="onnxruntime", show_default=True)
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--json", "as_json", is_flag=True, help="one JSON event per token, then a summary event")
@click.option("--vision-graph", type=click.Choice(["plain", "plugin"]), default="plain", show_default=True,
              help="vision.onnx, or vision.plugin.onnx (ApET scoring as one ApetScore node; not on torch)")
def run(
    build_dir, images, video, num_frames, prompt, budget, budget1, budget2, backend, max_new_tokens, temperature, top_p,
    seed, as_json, vision_graph,
):
    """Answer PROMPT about the image(s), streaming the text as it is generated."""
    import json

    from apet_export.runtime.images import synthetic_image
    from apet_export.runtime.pipeline import Pipeline
    from apet_export.runtime.streaming import printable

    if video is not None and images:
        raise InvalidInputError("pass --image or --video, not both: a request is about pictures or one video")
    pictures = list(images) or [synthetic_image(0)]
    graph = {"plain": "vision", "plugin": "vision_plugin"}[vision_graph]
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    with Pipeline.from_dir(build_dir, backend=backend, vision_graph=graph) as pipeline:
        if video is not None:
            from apet_export.runtime.video import iter_video_frames

            if budget1 is not None or budget2 is not None:  # video builds are one-stage (no --stage2-layer)
                raise InvalidInputError("--budget1/--budget2 are for two-stage image builds: pass --budget with --video")
            generation = pipeline.generate_video(
                iter_video_frames(video, num_frames), prompt, budget=budget, num_frames=num_frames, **sampling
            )
        else:
            generation = pipeline.generate(pictures, prompt, budget=budget, budget1=budget1, budget2=budget2, **sampling)
            if not images:  # after the checks: a bad request or build gets its error line alone
                status_console.print("[dim]no --image given: using a generated test picture[/dim]")
        for event in generation.events():
            if as_json:
                if event.token_id is not None:  # a final partial character is in the summary's text
                    click.echo(json.dumps({"event": "token", "index": event.index, "token_id": event.token_id,
                                           "text": event.text, "ms": round(event.ms, 3)}))
            elif event.text:
                click.echo(printable(event.text), nl=False)  # a model's control bytes must not drive the terminal
                sys.stdout.flush()
        summary = generation.result.summary()
    if as_json:
        click.echo(json.dumps({"event": "summary", **summary}))
    else:
        click.echo()
        status_console.print(
            f"[dim]{summary['generated_tokens']} tokens ({summary['finish_reason']}), image tokens "
            f"{summary['image_tokens']}, vision {summary['vision_ms']:.1f} ms, prefill {summary['prefill_ms']:.1f} ms, "
            f"decode {summary['decode_tokens_per_s']:.1f} tok/s[/dim]"
        )


@cli.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["onnxruntime", "torch", "tensorrt"]), default="onnxruntime", show_default=True)
@click.option("--budgets", callback=parse_budgets, help="comma-separated budgets (default: N,192,128,64)")
@click.option("--runs", default=5, show_default=True)
@click.option("--max-new-tokens", default=16, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), help="also write the rows as JSON")
@click.option("--budget1", type=int, default=None, help="two-stage builds: also measure this stage-1 budget (with --budget2)")
@click.option("--budget2", type=int, default=None, help="two-stage builds: ... and this stage-2 budget")
@click.option("--tensorrt/--no-tensorrt", default=True, show_default=True,
              help="also time the TensorRT engines where TensorRT and a GPU are present (else say why not)")
@click.option("--require-tensorrt", is_flag=True, help="fail instead of skipping the TensorRT engines (GPU CI)")
def bench(build_dir, backend, budgets, runs, max_new_tokens, json_out, budget1, budget2, tensorrt, require_tensorrt):
    """Time vision, prefill and decode per budget against no compression, in one run."""
    import json

    from apet_export.bench import rows_as_dicts, run_bench_with_tensorrt

    pair = stage_pair(budget1, budget2)
    if json_out:
        check_output_file(json_out, "--json-out")  # before minutes of timing
    rows = run_bench_with_tensorrt(
        build_dir, backend, budgets, runs, max_new_tokens, console, tensorrt, pairs=[pair] if pair else None,
        require_tensorrt=require_tensorrt,
    )
    if json_out:
        write_atomically(json_out, json.dumps(rows_as_dicts(rows), indent=2) + "\n", "--json-out")


@cli.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (0.0.0.0: every interface)")
@click.option("--port", default=8000, show_default=True)
@click.option("--backend", type=click.Choice(["onnxruntime", "torch", "tensorrt"]), default="onnxruntime", show_default=True)
@click.option("--vision-graph", type=click.Choice(["plain", "plugin"]), default="plain", show_default=True,
              help="vision.onnx, or vision.plugin.onnx (ApET scoring as one ApetScore node)")
@click.option("--replicas", default=1, show_default=True, help="model replicas (processes), spread over the Ray cluster")
@click.option("--max-batch", default=16, show_default=True,
              help="vision encodes batched together per replica, and the requests one replica runs at once")
@click.option("--api-key", default=None, envvar="APET_SERVE_API_KEY",
              help="require Authorization: Bearer KEY on /v1 (or set APET_SERVE_API_KEY)")
@click.option("--max-body-mb", default=32.0, show_default=True, help="largest request body accepted, MiB")
@click.option("--address", default=None,
              help="join this running Ray cluster (HOST:6379 or 'auto') instead of starting a private one")
@click.option("--cpus-per-replica", type=float, default=None,
              help="CPUs Ray reserves per replica (default: this machine's cores / replicas; on a cluster 1)")
@click.option("--drain-timeout", default=30.0, show_default=True, help="seconds in-flight requests get after SIGTERM")
def serve(build_dir, host, port, backend, vision_graph, replicas, max_batch, api_key, max_body_mb, address,
          cpus_per_replica, drain_timeout):
    """Serve BUILD_DIR over an OpenAI-compatible HTTP API (POST /v1/chat/completions) on Ray Serve."""
    try:
        import ray.serve  # noqa: F401
    except ImportError as error:
        from apet_export.errors import MissingDependencyError

        raise MissingDependencyError(f"serve needs Ray Serve: pip install 'apet-export[serve]' ({error})") from error
    from apet_export.serve.app import ModelOptions
    from apet_export.serve.launcher import ServeOptions, serve_until_stopped

    model = ModelOptions(
        build_dir=str(Path(build_dir).resolve()), backend=backend,
        vision_graph={"plain": "vision", "plugin": "vision_plugin"}[vision_graph], max_batch=max_batch,
        api_key=api_key, max_body_bytes=int(max_body_mb * 1024 * 1024),
    )
    options = ServeOptions(model=model, host=host, port=port, replicas=replicas, address=address,
                           cpus_per_replica=cpus_per_replica, drain_timeout_s=drain_timeout)
    serve_until_stopped(options, say=lambda text: status_console.print(f"[dim]{text}[/dim]"))


def main(argv: list[str] | None = None) -> None:
    """Entry point: typed errors become one clear line on stderr and exit status 1."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model file is local: never wait on the network
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except ApetExportError as error:
        click.secho(f"error: {error}", fg="red", err=True)
        sys.exit(1)
    except OSError as error:
        if error.errno not in (*DISK_FULL, errno.EROFS):
            raise
        # a write the command had not foreseen: atomic outputs left nothing half-written
        click.secho(f"error: cannot write {error.filename or 'the output'}: {describe(error)}; nothing was "
                    f"kept: free space or choose another output", fg="red", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
