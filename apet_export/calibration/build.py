"""`apet-export calibrate DIR --images FOLDER --precision int8|fp8`: a quantised build beside the fp32 one.

    DIR (fp32 build) ──► sample images (+ prompts) ──► ranges of vision.onnx (cached in DIR/calibration-cache)
         │                                             └► ranges of llm.onnx prefill (fp8 only, cached)
         ▼
    OUT (new build, written in a temporary sibling directory, then renamed):
        vision.onnx, vision.plugin.onnx   INT8 / FP8 QDQ, /vision/apet/... and the patch embedding left in float
        llm.onnx                          int8: weight-only int8 / int4 DequantizeLinear -> MatMul; fp8: FP8 QDQ
        model/, embeddings.safetensors    hard-linked (copied where links are impossible)
        manifest.json                     precision, and a `quantization` section (method, samples, cache keys)
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from apet_export.calibration import cache, data, quantize
from apet_export.errors import InvalidInputError
from apet_export.export import staging as staging_dir
from apet_export.manifest import Manifest, load_manifest


@dataclass
class CalibrationOptions:
    build_dir: Path
    images: Path
    precision: str = "int8"
    method: str = "minmax"
    samples: int = 32
    prompts: Path | None = None
    out: Path | None = None  # default: DIR-<precision>
    llm_bits: int = 8  # weight-only bits of llm.onnx for int8 builds (4 or 8)
    batch_size: int = 1
    # Feeds whose intermediate outputs are held at once. 1: memory stays one feed's worth, and feeds of
    # different shapes (prompt lengths, a last partial batch) never meet in one of onnxruntime's histograms.
    feeds_per_pass: int = 1
    seed: int = 0
    cache_dir: Path | None = None  # default: DIR/calibration-cache
    force: bool = False

    @property
    def output(self) -> Path:
        return Path(self.out) if self.out else Path(self.build_dir).with_name(f"{Path(self.build_dir).name}-{self.precision}")


def check_options(options: CalibrationOptions, manifest: Manifest) -> None:
    if options.precision not in quantize.PRECISIONS:
        raise InvalidInputError(f"precision {options.precision!r} cannot be calibrated: choose one of {', '.join(quantize.PRECISIONS)}")
    quantize.calibration_method(options.method)
    if manifest.quantization:
        raise InvalidInputError(
            f"{options.build_dir} is already quantised ({manifest.precision}): calibrate the fp32 build it came "
            f"from ({manifest.quantization.get('source_build')})"
        )
    if manifest.precision != "fp32":
        raise InvalidInputError(f"{options.build_dir} is a {manifest.precision} build: calibrate an fp32 build")
    if options.batch_size < 1 or options.feeds_per_pass < 1:
        raise InvalidInputError("--batch-size and feeds per pass must be >= 1")
    staging_dir.check_output(options.output, options.force, {
        "source build": Path(options.build_dir), "--images": Path(options.images),
        "--prompts": Path(options.prompts) if options.prompts else None,
    })


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link a file or a directory tree (no extra disk for multi-GB weights), copying where linking fails."""
    source = Path(source)
    if source.is_dir():
        shutil.copytree(source, target, copy_function=link_or_copy)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def cached_ranges(graph: Path, name: str, fingerprint: str, settings: dict, cache_dir: Path, make_reader, method, feeds_per_pass):
    """(ranges file, key, hit): the cached ranges of `graph`, computed and saved first if absent."""
    key = cache.cache_key(cache.file_sha256(graph), fingerprint, settings)
    path = cache.cache_path(cache_dir, name, key)
    hit = path.is_file()
    if not hit:
        ranges = quantize.collect_ranges(graph, make_reader(), method, feeds_per_pass)
        cache.save_ranges(ranges, path)
    return path, key, hit


def calibrate(options: CalibrationOptions, console: Console | None = None) -> Manifest:
    """Calibrate DIR's graphs on the images and write the quantised build to options.output."""
    console = console or Console(stderr=True)
    source = Path(options.build_dir).resolve()
    manifest = load_manifest(source)
    check_options(options, manifest)
    dataset = data.select_images(options.images, options.samples, options.prompts, options.seed)
    if dataset.skipped:
        console.print(f"[yellow]skipped {len(dataset.skipped)} unreadable image file(s)[/yellow] "
                      f"(first: {dataset.skipped[0][0]}: {dataset.skipped[0][1]})")
    fingerprint = dataset.fingerprint()
    cache_dir = Path(options.cache_dir) if options.cache_dir else source / cache.CACHE_DIR_NAME
    from apet_export.models.registry import get_family

    family = get_family(manifest.family)
    keep = manifest.budget["default"]  # the request budget calibrated at (None: the family's share per image)
    settings = {"method": options.method, "keep": keep, "batch_size": options.batch_size, "seed": options.seed}
    processor = data.load_processor(source, manifest)

    out = options.output.resolve()
    with staging_dir.staged_output(out, options.force) as staging:  # as `build`: locked, atomic
        shown = "the family's share" if keep is None else keep
        console.print(f"calibrating vision.onnx on {len(dataset.images)} images ({options.method}, budget {shown})")
        vision_graph = manifest.file(source, "vision")
        ranges_file, vision_key, hit = cached_ranges(
            vision_graph, "vision", fingerprint, settings, cache_dir,
            lambda: data.vision_feeds(dataset, family, processor, manifest, keep, options.batch_size),
            options.method, options.feeds_per_pass,
        )
        console.print(f"  ranges {'read from' if hit else 'saved to'} {ranges_file}")
        graphs = {}
        for name in ("vision", "vision_plugin"):
            if name not in manifest.files:
                continue
            graph = manifest.file(source, name)
            target = staging / manifest.files[name].path
            model = _load_graph(graph)
            exclude = quantize.nodes_in(model, quantize.FLOAT_SUBGRAPHS) + quantize.pixel_layers(model)
            graph_ranges = ranges_file
            if name != "vision":  # same tower and projector, other tensor names: translate the ranges
                graph_ranges = cache.cache_path(cache_dir, name, cache.cache_key(cache.file_sha256(graph), vision_key, {}))
                translated = quantize.translate_ranges(cache.load_ranges(ranges_file), _load_graph(vision_graph), model)
                cache.save_ranges(translated, graph_ranges)
            if options.precision == "int8":
                quantize.quantize_int8(graph, target, graph_ranges, options.method, exclude)
                quantize.name_qdq_nodes(target)
            else:
                quantize.quantize_fp8(graph, target, cache.load_ranges(graph_ranges), exclude)
            graphs[name] = (f"{options.precision} QDQ (symmetric, per-channel weights); /vision/apet/ and the "
                            f"patch embedding ({', '.join(quantize.pixel_layers(model))}) in float")

        llm_key = None
        if "llm" in manifest.files:
            llm_graph = manifest.file(source, "llm")
            target = staging / manifest.files["llm"].path
            if options.precision == "int8":
                console.print(f"llm.onnx: weight-only int{options.llm_bits} (DequantizeLinear -> MatMul)")
                done = quantize.quantize_weights(llm_graph, target, bits=options.llm_bits)
                layout = "per output channel" if options.llm_bits == 8 else "blocks of 32 along K"
                graphs["llm"] = (f"weight-only int{options.llm_bits} DequantizeLinear -> MatMul ({layout}, symmetric; "
                                 f"{done['quantized']} weights, {len(done['float'])} MatMuls left in float)")
            else:
                console.print(f"calibrating llm.onnx on {len(dataset.images)} image + prompt prefills")
                llm_ranges, llm_key, hit = _llm_ranges(source, llm_graph, dataset, fingerprint, settings, cache_dir, keep, options)
                console.print(f"  ranges {'read from' if hit else 'saved to'} {llm_ranges}")
                exclude = [n.name for n in _load_graph(llm_graph).graph.node if "lm_head" in n.name]
                quantize.quantize_fp8(llm_graph, target, cache.load_ranges(llm_ranges), exclude)
                graphs["llm"] = "fp8 QDQ (activations per tensor, weights per channel); lm_head in float"

        if "llm_cpu" in manifest.files:  # the CPU form of the quantised llm.onnx, not the source's
            del manifest.files["llm_cpu"]
            if options.precision == "int8":  # (FP8 QDQ runs as simulated quantisation: llm.onnx as it is)
                from apet_export.export.cpu_graph import add_cpu_graph

                add_cpu_graph(staging, manifest)
                graphs["llm_cpu"] = graphs["llm"] + ", KV cache written in place"
        for name, spec in manifest.files.items():
            if name not in graphs:
                link_or_copy(source / spec.path, staging / spec.path)
        link_or_copy(source / "model", staging / "model")

        manifest.precision = options.precision
        manifest.quantization = {
            "precision": options.precision, "method": options.method, "samples": len(dataset.images),
            "skipped_images": len(dataset.skipped), "prompts": len(dataset.prompts), "budget": keep,
            "data_sha256": fingerprint, "cache": {"vision": vision_key, "llm": llm_key},
            "graphs": graphs, "float_subgraphs": list(quantize.FLOAT_SUBGRAPHS),
            "source_build": str(source), "tool": "onnxruntime.quantization",
        }
        manifest.notes = [*manifest.notes, f"quantised from {source} by apet-export calibrate"]
        manifest.write(staging)
    console.print(f"[green]calibrated[/green] {out}")
    return manifest


def _load_graph(graph: Path):
    import onnx

    return onnx.load(str(graph), load_external_data=False)


def _llm_ranges(source, llm_graph, dataset, fingerprint, settings, cache_dir, keep, options):
    from apet_export.runtime.pipeline import Pipeline

    pipeline = None

    def reader():
        nonlocal pipeline
        pipeline = Pipeline.from_dir(source, backend="onnxruntime")
        return data.llm_feeds(dataset, pipeline, keep)

    try:
        return cached_ranges(llm_graph, "llm", fingerprint, settings, cache_dir, reader, options.method, options.feeds_per_pass)
    finally:
        if pipeline is not None:
            pipeline.close()

