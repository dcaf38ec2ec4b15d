"""One ONNX graph -> one serialized TensorRT engine, against the `tensorrt` Python API.

    parse (OnnxParser into a strongly typed network: precision comes from the graph)
      → mark every attention decomposable (fallback when no fused kernel fits; see below)
      → optimisation profiles (trt_profiles.py) → compute capability → build_serialized_network

`trt` is the module apet_export.compat.import_tensorrt() returned: `tensorrt` or TensorRT-RTX, which
share this API; TensorRT-RTX additionally builds ahead of time for a named compute capability.
"""

from __future__ import annotations

import threading
from pathlib import Path

from apet_export.compat import is_tensorrt_rtx
from apet_export.errors import EngineBuildError
from apet_export.export.trt_profiles import Profile

MAX_REPORTED_ERRORS = 3


def make_logger(trt, echo: bool = False):
    """A TensorRT logger that keeps the errors (for our one-line exception; echo=True also prints them,
    for runtimes) and drops the rest (the parser warns about every int64 binding, as our graphs intend)."""
    import sys

    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, message):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(message)
                if echo:
                    print(f"TensorRT: {message}", file=sys.stderr)

    return CollectingLogger()


def parse_onnx(trt, builder, logger, path: Path):
    """A strongly typed INetworkDefinition of the ONNX file (external data resolved beside it). A failed parse
    is MissingDependencyError where the ApetScore plugin is not registered, else EngineBuildError."""
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        from apet_export.plugins.trt_plugin import raise_for_missing_plugin

        raise_for_missing_plugin(trt, parser)  # an ApetScore node with no plugin registered: name the fix
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        hint = ""
        if any("Plugin not found" in e or "plugin" in e.lower() for e in errors):
            hint = " (a custom op without a registered TensorRT plugin)"
        raise EngineBuildError(
            f"TensorRT {trt.__version__} cannot parse {path.name}{hint}: {'; '.join(errors[:MAX_REPORTED_ERRORS])}"
            f" — see the support matrix in README.md for the TensorRT version each graph needs"
        )
    return network, parser  # the parser owns weights the network refers to: keep it alive until built


def mark_attention_decomposable(trt, network) -> int:
    """Let TensorRT split every IAttention into matmul + softmax + matmul where no fused kernel fits.

    The parser turns each ONNX Attention node into an IAttention; TensorRT fuses it when a dedicated
    kernel exists for its dtype, head size and mask (fp16/bf16 at common head sizes) and otherwise fails
    the build ("Attention operation was not supported by a dedicated kernel": fp32, or head_dim 16 as in
    the tiny presets). Decomposable only allows the fallback: where a fused kernel exists it is still
    used (the fp16 tiny LLM builds the same engine either way), so every attention is marked.
    ONNX has no attribute for this, hence after parsing. Returns the number of attentions marked.
    """
    output_layer = getattr(trt, "IAttentionOutputLayer", None)
    if output_layer is None:  # TensorRT < 10.14 has no IAttention: the parser did not create any
        return 0
    marked = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type == trt.LayerType.ATTENTION_OUTPUT:
            layer.__class__ = output_layer  # the Python API's way to downcast an ILayer
            layer.attention.decomposable = True
            marked += 1
    return marked


def add_profiles(trt, builder, config, network, profiles: list[Profile]) -> None:
    """One IOptimizationProfile per Profile; shape-tensor inputs (keep) get value ranges."""
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    for profile in profiles:
        optimization = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            optimization.set_shape(name, low, opt, high)
        for name, (low, opt, high) in profile.values.items():
            if name in inputs and inputs[name].is_shape_tensor:
                optimization.set_shape_input(name, [low], [opt], [high])
        if config.add_optimization_profile(optimization) < 0:
            raise EngineBuildError(f"TensorRT rejected the {profile.name!r} optimisation profile {profile.to_dict()}")


# TensorRT-RTX keeps a build's target in process-wide state: two builds for different targets at once in one
# process fail ("Myelin: Target SM 89 is not found in the accelerator list"), so builds in a process take turns.
_ONE_BUILD_AT_A_TIME = threading.Lock()


def set_target(trt, config, capability) -> None:
    """TensorRT-RTX: build for `capability` (a trt.ComputeCapability) ahead of time. Full TensorRT has no
    such setting (it builds for the GPU it runs on): capability is None there."""
    if capability is not None:
        config.num_compute_capabilities = 1
        config.set_compute_capability(capability, 0)


def has_timing_cache(trt) -> bool:
    """TensorRT-RTX builds without timing (its timing-cache calls are deprecated no-ops)."""
    return not is_tensorrt_rtx(trt)


def build_engine(
    trt, builder, logger, path: Path, profiles: list[Profile], capability, timing_cache=None,
    optimization_level: int = 3,
):
    """(serialized engine bytes, timing cache, number of attentions marked decomposable).
    timing_cache: the ITimingCache of a previous build, or the bytes of a saved one, or None (returned
    unchanged where TensorRT has no timing cache)."""
    logger.errors.clear()
    network, _parser = parse_onnx(trt, builder, logger, path)
    marked = mark_attention_decomposable(trt, network)
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if hasattr(trt.BuilderFlag, "TF32"):  # fp32 in the graph means fp32 (ApET's ridge system needs it)
        config.clear_flag(trt.BuilderFlag.TF32)
    set_target(trt, config, capability)
    add_profiles(trt, builder, config, network, profiles)
    if has_timing_cache(trt):
        if timing_cache is None or isinstance(timing_cache, bytes):
            timing_cache = config.create_timing_cache(timing_cache or b"")
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
    with _ONE_BUILD_AT_A_TIME:
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = "; ".join(e.splitlines()[0][:300] for e in logger.errors[-MAX_REPORTED_ERRORS:]) or "no message"
        raise EngineBuildError(f"TensorRT {trt.__version__} could not build {path.name}: {errors}")
    return bytes(serialized), timing_cache, marked  # the cache object we own, now holding this build's timings
