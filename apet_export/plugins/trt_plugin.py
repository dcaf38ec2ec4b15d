"""The ApetScore TensorRT plugin (IPluginV3, Python): shape/type inference, formats, and an enqueue that
launches the Triton kernel compiled to PTX for the GPU (aot.compile_ptx) through the CUDA driver
(cuda_launch.py): no torch in the process that runs the engine.

    x [B, N, D] fp32|fp16 ──ApetScore(num_basis, ridge, fps_start)──► scores [B, N] fp32
                                                                       basis_index [B, M] int64

TensorRT's ONNX parser finds the node `ApetScore` (attributes plugin_namespace="apet", plugin_version="1")
in the plugin registry; `register_apet_score_plugin(trt)` puts the creator there. `trt` is the module
from `apet_export.compat.import_tensorrt()`: `tensorrt` or TensorRT-RTX's `tensorrt_rtx_bindings` (same
classes). Everything here but `enqueue` runs without a GPU, so engines that contain the plugin build
ahead of time on the CPU. A Python plugin is not serialised into the engine: the process that
deserialises it must call `register_apet_score_plugin` first (see `aot.py` for the Python-free form).

The classes are created per TensorRT module (they subclass that module's interfaces), so importing this
file never imports TensorRT.
"""

from __future__ import annotations

import functools

import numpy as np

from apet_export.compat import ensure_tensorrt_rtx_plugin_import
from apet_export.errors import InvalidInputError, MissingDependencyError
from apet_export.plugins.identity import OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION

MAX_NUM_BASIS = 32  # = triton_apet.MAX_NUM_BASIS (not imported: triton is heavy); M x M tiles in registers


def plugin_attributes(fields) -> dict:
    """num_basis / ridge / fps_start from a PluginFieldCollection. The ONNX parser passes every node
    attribute, ints as INT32 or INT64 depending on the parser version: read by name, convert by value."""
    values = {field.name: np.asarray(field.data).reshape(-1) for field in fields}
    missing = {"num_basis", "ridge", "fps_start"} - values.keys()
    if missing:
        raise ValueError(f"ApetScore node lacks attributes {sorted(missing)}: re-export vision.plugin.onnx")
    return {
        "num_basis": int(values["num_basis"][0]),
        "ridge": float(values["ridge"][0]),
        "fps_start": int(values["fps_start"][0]),
    }


@functools.cache
def _plugin_classes(trt):
    """(ApetScorePlugin, ApetScoreCreator) subclassing `trt`'s interfaces; cached per module."""

    class ApetScorePlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, attributes: dict, phase=None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = OP_TYPE
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.num_outputs = 2
            self.attributes = dict(attributes)
            self.phase = phase
            # Of the attributes only num_basis changes the kernel's cost, and it is already in basis_index's
            # shape, which TensorRT keys timings on: instances may share timings.
            self.timing_cache_id = ""

        # ---- core / build ----------------------------------------------------------------------
        def get_capability_interface(self, capability_type):
            return self

        def clone(self):
            return ApetScorePlugin(self.attributes, self.phase)

        def get_output_data_types(self, input_types):
            return [trt.DataType.FLOAT, trt.DataType.INT64]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            x = inputs[0]  # [B, N, D]
            scores = trt.DimsExprs(2)
            scores[0], scores[1] = x[0], x[1]  # [B, N]
            basis_index = trt.DimsExprs(2)
            basis_index[0], basis_index[1] = x[0], expr_builder.constant(self.attributes["num_basis"])  # [B, M]
            return [scores, basis_index]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            allowed = (trt.DataType.FLOAT, trt.DataType.HALF), (trt.DataType.FLOAT,), (trt.DataType.INT64,)
            return desc.type in allowed[pos]

        def configure_plugin(self, inputs, outputs):
            dim = inputs[0].desc.dims[2]  # D is static in vision graphs (-1 would mean dynamic)
            if 0 < dim < self.attributes["num_basis"]:
                raise ValueError(
                    f"ApetScore: num_basis={self.attributes['num_basis']} exceeds the token dimension D={dim} "
                    f"(the kernel's M x M factorisation is singular then): rebuild with --num-basis <= {dim}"
                )

        def get_workspace_size(self, inputs, outputs):
            # The kernel keeps FPS's running minimum in the scores output and the M x M system in
            # registers: no scratch memory.
            return 0

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        # ---- runtime ---------------------------------------------------------------------------
        def get_fields_to_serialize(self):
            self._serialized = attribute_fields(trt, self.attributes)  # kept alive until the next call
            return self._serialized[0]

        def on_shape_change(self, inputs, outputs):
            pass

        def attach_to_context(self, resource_context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            launch_from_pointers(
                trt, input_desc[0], inputs[0], outputs[0], outputs[1], stream, **self.attributes
            )

    class ApetScoreCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = OP_TYPE
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self._field_names = attribute_fields(trt, {"num_basis": 10, "ridge": 1e-5, "fps_start": -1})
            self.field_names = self._field_names[0]

        def create_plugin(self, name, field_collection, phase):
            attributes = plugin_attributes(field_collection)
            if not 1 <= attributes["num_basis"] <= MAX_NUM_BASIS:
                raise ValueError(
                    f"ApetScore node {name}: num_basis={attributes['num_basis']} is outside [1, {MAX_NUM_BASIS}] "
                    f"(the TensorRT kernel's limit): rebuild with --num-basis <= {MAX_NUM_BASIS}"
                )
            return ApetScorePlugin(attributes, phase)

    return ApetScorePlugin, ApetScoreCreator


def attribute_fields(trt, attributes: dict):
    """A PluginFieldCollection of the attributes. A PluginField points at its array without owning it, so
    the arrays are attached to the collection: whoever holds the collection keeps them alive."""
    arrays = {
        "num_basis": np.array([attributes["num_basis"]], np.int32),
        "ridge": np.array([attributes["ridge"]], np.float32),
        "fps_start": np.array([attributes["fps_start"]], np.int32),
    }
    kinds = {"num_basis": trt.PluginFieldType.INT32, "ridge": trt.PluginFieldType.FLOAT32,
             "fps_start": trt.PluginFieldType.INT32}
    collection = trt.PluginFieldCollection([trt.PluginField(name, arrays[name], kinds[name]) for name in arrays])
    return collection, arrays


# The creator must outlive the registry entry (the registry holds a raw pointer): keep one per module.
_CREATORS: dict[str, object] = {}


def register_apet_score_plugin(trt) -> None:
    """Register the ApetScore creator in `trt`'s plugin registry (idempotent, once per module)."""
    if trt.__name__ in _CREATORS:
        return
    # Without this, TensorRT-RTX's parser aborts the process on the first plugin node (see compat).
    ensure_tensorrt_rtx_plugin_import(trt)
    if not is_apet_score_registered(trt):
        creator = _plugin_classes(trt)[1]()
        trt.get_plugin_registry().register_creator(creator, PLUGIN_NAMESPACE)
        _CREATORS[trt.__name__] = creator
    else:  # registered by another copy of this code (or a C++ library): leave it
        _CREATORS[trt.__name__] = None


def unregister_apet_score_plugin(trt) -> None:
    """Remove the creator this module registered (tests; a process that must parse without it)."""
    creator = _CREATORS.pop(trt.__name__, None)
    if creator is not None:
        trt.get_plugin_registry().deregister_creator(creator)


def is_apet_score_registered(trt) -> bool:
    # Scans the list: registry.get_creator logs an error for a creator it does not find.
    return any(
        (creator.name, creator.plugin_version, creator.plugin_namespace) == (OP_TYPE, PLUGIN_VERSION, PLUGIN_NAMESPACE)
        for creator in trt.get_plugin_registry().all_creators
    )


def ensure_plugin_registered(trt, register: bool = True) -> None:
    """Make sure TensorRT's ONNX parser will find ApetScore; MissingDependencyError naming the fix if not.

    Call before parsing vision.plugin.onnx. With register=False, only check (e.g. for a runtime that
    must not register Python plugins)."""
    if register:
        register_apet_score_plugin(trt)
    if not is_apet_score_registered(trt):
        raise MissingDependencyError(
            f"TensorRT plugin {PLUGIN_NAMESPACE}::{OP_TYPE} v{PLUGIN_VERSION} is not registered in "
            f"{trt.__name__}, so vision.plugin.onnx cannot be parsed or run ('Plugin not found'): call "
            f"apet_export.plugins.trt_plugin.register_apet_score_plugin(trt) before parsing or "
            f"deserialising, or use vision.onnx (standard ONNX ops)"
        )


def raise_for_missing_plugin(trt, parser) -> None:
    """After a failed parse: the parser's 'Plugin not found' on an ApetScore node becomes
    MissingDependencyError naming the fix; any other parser error is left to the caller."""
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        if error.node_operator() == OP_TYPE and "Plugin not found" in error.desc():
            ensure_plugin_registered(trt, register=False)


# ---- enqueue: TensorRT device pointers -> the compiled Triton kernel, launched through the CUDA driver ----


@functools.cache
def compiled_kernel(target_sm: int, num_basis: int, ridge: float, dtype: str):
    """The kernel compiled for this GPU and these attributes, loaded once per process (Triton compiles,
    the driver loads; neither needs torch)."""
    from apet_export.plugins.aot import compile_ptx
    from apet_export.plugins.cuda_launch import DriverKernel

    kernel = compile_ptx(target_sm, num_basis, ridge, dtype)
    return kernel, DriverKernel(kernel.ptx, kernel.name, kernel.shared_mem)


def launch_from_pointers(trt, x_desc, x_ptr, scores_ptr, basis_ptr, stream, *, num_basis, ridge, fps_start):
    """x [B, N, D] at x_ptr -> scores [B, N] fp32 at scores_ptr, basis_index [B, M] int64 at basis_ptr, on
    TensorRT's stream: one program (num_warps * 32 threads) per image."""
    from apet_export.plugins import cuda_launch
    from apet_export.plugins.aot import launch_arguments

    batch, num_tokens, dim = (int(d) for d in x_desc.dims)
    if fps_start >= num_tokens:  # the kernel would read a token past the input
        raise InvalidInputError(f"ApetScore fps_start={fps_start} is not a token index (N={num_tokens})")
    dtype = "fp16" if x_desc.type == trt.DataType.HALF else "fp32"
    kernel, loaded = compiled_kernel(cuda_launch.compute_capability(int(stream)), num_basis, float(ridge), dtype)
    arguments = launch_arguments(kernel, x_ptr=int(x_ptr), num_tokens=num_tokens, dim=dim, fps_start=fps_start,
                                 scores_ptr=int(scores_ptr), basis_ptr=int(basis_ptr))
    loaded.launch((batch, 1, 1), (kernel.num_warps * 32, 1, 1), int(stream), arguments)
