"""The ApetScore op, defined once: FPS basis selection + ridge approximation error as one graph node.

    x [B, N, D] float32 ──ApetScore(num_basis, ridge, fps_start)──► scores [B, N] float32
                                                                    basis_index [B, M] int64 (selection order)

Used three ways:
- torch: `torch.ops.apet.score` (a custom op whose eager kernel is the library's apet_scores), so the
  vision stage can be traced with one opaque node;
- ONNX: the exporter translates it to a node `ai.onnx.contrib::ApetScore` carrying the TensorRT plugin
  attributes `plugin_namespace` / `plugin_version`. TensorRT's ONNX parser dispatches on op_type alone
  (built-in op, then a local function of that name, then the plugin registry), so the graph must carry no
  local function named ApetScore;
- onnxruntime: the reference implementation below, registered through onnxruntime-extensions (whose Python
  ops live in the domain ai.onnx.contrib, hence the node's domain).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from apet_export.compression.apet import apet_scores
from apet_export.config import ApetConfig
from apet_export.plugins.identity import (  # noqa: F401 (the op's names, imported from here by its users)
    DOMAIN,
    FPS_START_NORM,
    OP_TYPE,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
)


def fps_start_attribute(config: ApetConfig) -> int:
    return FPS_START_NORM if config.fps_start == "norm" else int(config.fps_start)


def config_from_attributes(num_basis: int, ridge: float, fps_start: int) -> ApetConfig:
    return ApetConfig(
        num_basis=int(num_basis), selection="fps", ridge=float(ridge),
        fps_start="norm" if fps_start == FPS_START_NORM else int(fps_start),
    )


def reference_apet_score(x: torch.Tensor, num_basis: int, ridge: float, fps_start: int):
    """The op's semantics: (scores [B, N] fp32, basis_index [B, M] int64) of x [B, N, D]."""
    scores, basis_index, _ = apet_scores(x.float(), config_from_attributes(num_basis, ridge, fps_start))
    return scores, basis_index


# ---- torch ---------------------------------------------------------------------------------------

@torch.library.custom_op("apet::score", mutates_args=())
def apet_score(x: torch.Tensor, num_basis: int, ridge: float, fps_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores, basis_index = reference_apet_score(x, num_basis, ridge, fps_start)
    return scores.clone(), basis_index.clone()


@apet_score.register_fake
def _(x, num_basis, ridge, fps_start):
    torch._check(x.shape[1] >= num_basis)
    return x.new_empty(x.shape[:2], dtype=torch.float32), x.new_empty((x.shape[0], num_basis), dtype=torch.int64)


# ---- ONNX ----------------------------------------------------------------------------------------

@functools.cache
def register_onnx_schema() -> None:
    """Declare the op to onnx (shape inference, checker) and to onnxscript (which needs a schema to emit it)."""
    from onnx import defs

    attr = defs.OpSchema.Attribute
    attr_type = defs.OpSchema.AttrType
    schema = defs.OpSchema(
        OP_TYPE, DOMAIN, 1,
        doc="ApET scoring: farthest point sampling of num_basis tokens + ridge least-squares residual norm.",
        inputs=[defs.OpSchema.FormalParameter("x", "tensor(float)", "tokens [B, N, D]")],
        outputs=[
            defs.OpSchema.FormalParameter("scores", "tensor(float)", "approximation errors [B, N]"),
            defs.OpSchema.FormalParameter("basis_index", "tensor(int64)", "basis tokens [B, M], selection order"),
        ],
        attributes=[
            attr("num_basis", attr_type.INT, "M"),
            attr("ridge", attr_type.FLOAT, "ridge lambda"),
            attr("fps_start", attr_type.INT, "first FPS token; -1 = largest L2 norm"),
            attr("plugin_namespace", attr_type.STRING, "TensorRT plugin namespace"),
            attr("plugin_version", attr_type.STRING, "TensorRT plugin version"),
        ],
    )
    if not defs.has(OP_TYPE, DOMAIN):
        defs.register_schema(schema)


def onnx_translation(x, num_basis: int, ridge: float, fps_start: int):
    """torch.onnx custom translation of apet::score -> one ApetScore node (a plain function: it is
    inlined as a node, where an @onnxscript.script function would become a local function)."""
    import onnxscript

    register_onnx_schema()
    opset = onnxscript.values.Opset(DOMAIN, 1)
    return opset.ApetScore(
        x, num_basis=num_basis, ridge=ridge, fps_start=fps_start,
        plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
    )


# ---- onnxruntime ---------------------------------------------------------------------------------

@functools.cache
def register_onnxruntime_reference() -> str:
    """Register the reference kernel with onnxruntime-extensions (once per process); returns the
    library path to pass to SessionOptions.register_custom_ops_library."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    @onnx_op(
        op_type=OP_TYPE,
        inputs=[PyCustomOpDef.dt_float],
        outputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64],
        attrs={
            "num_basis": PyCustomOpDef.dt_int64, "ridge": PyCustomOpDef.dt_float,
            "fps_start": PyCustomOpDef.dt_int64, "plugin_namespace": PyCustomOpDef.dt_string,
            "plugin_version": PyCustomOpDef.dt_string,
        },
    )
    def apet_score_reference(x, **attrs):
        scores, basis_index = reference_apet_score(
            torch.from_numpy(np.ascontiguousarray(x)), attrs["num_basis"], attrs["ridge"], attrs["fps_start"]
        )
        return scores.numpy(), basis_index.numpy()

    return get_library_path()
