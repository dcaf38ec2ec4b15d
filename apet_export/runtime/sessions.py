"""onnxruntime sessions for build artifacts: one place that knows about the ApetScore reference op."""

from __future__ import annotations

from pathlib import Path

from apet_export.errors import MissingDependencyError


def uses_custom_domain(path: Path, domain: str) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(op.domain == domain for op in model.opset_import)


def onnxruntime_session(path: Path, threads: int | None = None, spin: bool = True):
    """An InferenceSession on the CPU provider; graphs with the ApetScore node get its reference kernel.

    spin=False: the intra-op threads sleep as soon as a run ends. Use it for a session that runs once
    per request (the vision graph): spinning threads would keep the cores from the LLM session that runs
    next (measured: +12% prefill time at budget 64 on 2 cores).
    """
    import onnxruntime as ort

    from apet_export.plugins.apet_score import DOMAIN, register_onnxruntime_reference

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if uses_custom_domain(path, DOMAIN):
        try:
            options.register_custom_ops_library(register_onnxruntime_reference())
        except ImportError as error:
            raise MissingDependencyError(
                f"{path.name} contains the ApetScore op, whose onnxruntime reference needs "
                f"onnxruntime-extensions: pip install onnxruntime-extensions==0.15.2 ({error})"
            ) from error
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
