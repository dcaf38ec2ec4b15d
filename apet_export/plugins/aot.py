"""ApetScore ahead of time: the Triton kernel compiled to PTX for a named GPU, and its TensorRT wiring.

    triton_apet.apet_score_kernel ──triton.compile(ASTSource, GPUTarget("cuda", sm, 32))──► PTX + launch shape
                                   ──tensorrt.plugin.aot_impl──► PTX embedded in the engine (no Python at run time)

`compile_ptx` runs on any machine, GPU or not (Triton ships ptxas; checked for SM89 on a CPU-only machine).
`register_apet_score_aot` needs TensorRT >= 10.6 (`tensorrt.plugin` with `aot_impl`); TensorRT-RTX has no
`tensorrt.plugin`, so there the Python plugin of trt_plugin.py is the only form. It registers the same
plugin id (apet::ApetScore, version 1) as trt_plugin.register_apet_score_plugin: use one or the other in a
process. TensorRT's ONNX parser picks the AOT implementation for a node carrying the attribute `aot=1`.

Triton must be imported without TRITON_INTERPRET=1 here (the interpreter replaces @triton.jit functions).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from apet_export.errors import InvalidInputError, MissingDependencyError
from apet_export.plugins.identity import OP_TYPE, PLUGIN_NAMESPACE

# Tiles for the compiled form: the engine serves every N and D of its profile with one PTX.
AOT_BLOCK_N = 64
AOT_BLOCK_D = 64
AOT_NUM_WARPS = 4
_POINTER_TYPES = {"fp32": "*fp32", "fp16": "*fp16"}


@dataclass(frozen=True)
class CompiledKernel:
    name: str  # the PTX entry point
    ptx: str
    target_sm: int
    num_warps: int  # block = num_warps * 32 threads, grid = batch
    shared_mem: int  # bytes of dynamic shared memory
    dtype: str = "fp32"  # of x
    # Pointers Triton appends after the kernel's own parameters (global and profile scratch since Triton 3.4),
    # passed as NULL: compile_ptx refuses a kernel that would need scratch memory.
    scratch_params: int = 0


def kernel_signature(dtype: str) -> dict:
    """Argument types in kernel order: inputs, int32 scalars, outputs (TensorRT's AOT launch order)."""
    if dtype not in _POINTER_TYPES:
        raise InvalidInputError(f"ApetScore AOT input dtype {dtype!r}: choose fp32 or fp16")
    return {
        "x_ptr": _POINTER_TYPES[dtype], "num_tokens": "i32", "dim": "i32", "fps_start": "i32",
        "scores_ptr": "*fp32", "basis_ptr": "*i64",
        "NUM_BASIS": "constexpr", "RIDGE": "constexpr",
        "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "BLOCK_M": "constexpr",
    }


def launch_constexprs(num_basis: int, ridge: float) -> dict:
    """The compile-time constants of the compiled form: one tile shape for every N and D."""
    from apet_export.plugins.triton_apet import block_sizes

    return {
        "NUM_BASIS": num_basis, "RIDGE": float(ridge),
        "BLOCK_N": AOT_BLOCK_N, "BLOCK_D": AOT_BLOCK_D, "BLOCK_M": block_sizes(1, 1, num_basis)["BLOCK_M"],
    }


def launch_arguments(kernel: CompiledKernel, **values: int) -> list[ctypes._SimpleCData]:
    """The kernel's runtime parameters in kernel_signature's order as ctypes values (a device pointer as
    c_uint64, an i32 as c_int32), then the NULL scratch pointers. values: x_ptr, num_tokens, dim, fps_start,
    scores_ptr, basis_ptr."""
    arguments = []
    for name, kind in kernel_signature(kernel.dtype).items():
        if kind != "constexpr":
            arguments.append(ctypes.c_uint64(values[name]) if kind.startswith("*") else ctypes.c_int32(values[name]))
    return arguments + [ctypes.c_uint64(0) for _ in range(kernel.scratch_params)]


def _entry_parameter_count(ptx: str, name: str) -> int:
    header = ptx[ptx.index(f".entry {name}("):]
    return header[: header.index(")")].count(".param")


def compile_ptx(target_sm: int, num_basis: int, ridge: float, dtype: str = "fp32") -> CompiledKernel:
    """PTX of the ApetScore kernel for compute capability `target_sm` (e.g. 89), for any N and D."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.interpreter import InterpretedFunction

    from apet_export.plugins.triton_apet import MAX_NUM_BASIS, apet_score_kernel

    if not 1 <= num_basis <= MAX_NUM_BASIS:
        raise InvalidInputError(f"num_basis={num_basis} is outside [1, {MAX_NUM_BASIS}]: lower num_basis")
    if isinstance(apet_score_kernel, InterpretedFunction):
        raise InvalidInputError("TRITON_INTERPRET=1 is set: unset it to compile the kernel to PTX")
    signature = kernel_signature(dtype)
    source = ASTSource(fn=apet_score_kernel, signature=signature, constexprs=launch_constexprs(num_basis, ridge))
    compiled = triton.compile(
        source, target=GPUTarget("cuda", int(target_sm), 32),
        options={"num_warps": AOT_NUM_WARPS, "enable_fp_fusion": True},
    )
    metadata, ptx = compiled.metadata, compiled.asm["ptx"]
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        if getattr(metadata, scratch, 0):
            raise InvalidInputError(
                f"this Triton compiles ApetScore with {scratch}={getattr(metadata, scratch)}: the plugin passes no "
                f"scratch memory; use the Triton version in constraints.txt"
            )
    own_parameters = sum(kind != "constexpr" for kind in signature.values())
    return CompiledKernel(
        name=metadata.name, ptx=ptx, target_sm=int(target_sm), num_warps=metadata.num_warps,
        shared_mem=metadata.shared, dtype=dtype,
        scratch_params=_entry_parameter_count(ptx, metadata.name) - own_parameters,
    )


def _tensorrt_plugin_module():
    try:
        import tensorrt.plugin as trtp
    except ImportError as error:
        raise MissingDependencyError(
            f"tensorrt.plugin is not available ({error}): the AOT ApetScore needs TensorRT >= 10.6 "
            f"(pip install -e '.[trt]' on a GPU machine); TensorRT-RTX has no tensorrt.plugin, use "
            f"trt_plugin.register_apet_score_plugin there"
        ) from error
    if not hasattr(trtp, "aot_impl"):
        raise MissingDependencyError("this TensorRT's tensorrt.plugin has no aot_impl: upgrade to TensorRT >= 10.6")
    return trtp


def register_apet_score_aot(target_sm: int | None = None) -> None:  # pragma: no cover - needs TensorRT >= 10.6
    """Register apet::ApetScore with tensorrt.plugin: shapes from `register`, PTX from `aot_impl`.

    target_sm: compute capability to compile for (default: the current CUDA device)."""
    import tensorrt as trt

    trtp = _tensorrt_plugin_module()
    plugin_id = f"{PLUGIN_NAMESPACE}::{OP_TYPE}"

    @trtp.register(plugin_id)
    def _describe(x: trtp.TensorDesc, num_basis: int, ridge: float, fps_start: int):
        scores = trtp.from_shape_expr((x.shape_expr[0], x.shape_expr[1]), dtype=trt.float32)  # [B, N]
        basis_index = trtp.from_shape_expr((x.shape_expr[0], num_basis), dtype=trt.int64)  # [B, M]
        return scores, basis_index

    @trtp.autotune(plugin_id)
    def _formats(x, num_basis: int, ridge: float, fps_start: int, outputs):
        return [trtp.AutoTuneCombination("FP32|FP16, FP32, INT64")]

    @trtp.aot_impl(plugin_id)
    def _compiled(x, num_basis: int, ridge: float, fps_start: int, outputs, tactic):
        sm = target_sm
        if sm is None:
            from apet_export.plugins.cuda_launch import compute_capability

            sm = compute_capability()  # of device 0
        kernel = compile_ptx(sm, num_basis, ridge, "fp16" if x.dtype == trt.float16 else "fp32")
        launch = trtp.KernelLaunchParams()
        launch.grid_x = x.shape_expr[0]  # one program per image
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared_mem
        scalars = trtp.SymIntExprs.from_tuple(
            [trtp.SymInt32(x.shape_expr[1]), trtp.SymInt32(x.shape_expr[2]), trtp.SymInt32(fps_start)]
        )
        return kernel.name.encode(), kernel.ptx.encode(), launch, scalars
