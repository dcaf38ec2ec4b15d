"""onnxruntime sessions for build artifacts: one place that knows about the ApetScore reference op."""

from __future__ import annotations

from pathlib import Path

from apet_export.errors import MissingDependencyError


def onnxruntime_session(
    path: Path, spin: bool = True, apet_score: bool = False, fuse_qdq: bool = True, threads: int | None = None,
    arena: bool = True,
):
    """An InferenceSession on the CPU provider.

    apet_score=True registers the ApetScore reference kernel, which the plugin graph needs (the
    manifest says which graph that is: `vision_plugin`).

    spin=False: the intra-op threads sleep as soon as a run ends. Use it for a session that runs once
    per request (the vision graph): spinning threads would keep the cores from the LLM session that runs
    next (measured: prefill at budget 64 took 372 instead of 327 ms on 2 cores).

    fuse_qdq=False keeps QuantizeLinear/DequantizeLinear as separate ops (simulated quantisation): FP8 QDQ
    graphs need it, since the CPU provider has no float8 QLinear kernels to fuse them into.

    threads: intra-op threads (None: onnxruntime's default, one per physical core).

    arena=False: tensors are allocated and freed one by one instead of from onnxruntime's CPU arena, which keeps
    every block it grew to for the session's life (its blocks grow in powers of two).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = arena
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not fuse_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if apet_score:
        try:  # imported here only: the reference op's module imports torch
            from apet_export.plugins.apet_score import register_onnxruntime_reference

            options.register_custom_ops_library(register_onnxruntime_reference())
        except ImportError as error:
            raise MissingDependencyError(
                f"{path.name} contains the ApetScore op, whose onnxruntime reference needs "
                f"onnxruntime-extensions and torch: pip install 'apet-export[plugin-reference]' ({error})"
            ) from error
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
