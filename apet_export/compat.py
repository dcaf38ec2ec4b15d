"""Version-dependent quirks of the libraries we drive, kept in one place."""

from __future__ import annotations

import contextlib
import logging
import warnings


def quiet_libraries() -> None:
    """Silence progress bars and warnings that say nothing about the user's build."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # torch.onnx warns once per missing torchvision op (nms, roi_align, ...): irrelevant here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet_export():
    """torch 2.13's exporter: FutureWarnings about pytree LeafSpec and export progress lines."""
    quiet_libraries()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        with contextlib.redirect_stdout(None):
            yield


def quiet_polygraphy() -> None:
    """Polygraphy logs every runner step and prints a hint about the optional 'colored' module."""
    from polygraphy.logger import G_LOGGER, logger

    logger.COLORED_MODULE_PRESENT = False
    G_LOGGER.module_severity = G_LOGGER.ERROR


# What `pip install apet-export` leaves out: running a build needs none of it (onnxruntime, tokenizers, numpy);
# building, calibrating, checking parity against eager PyTorch and the torch backend need all of it.
EXPORT_EXTRA = ("torch", "transformers", "onnxscript", "onnx_ir")


def require_export_extra(what: str) -> None:
    """MissingDependencyError naming the `export` extra when one of its libraries does not import, before a
    command that needs them starts (one line, not an ImportError traceback from deep inside)."""
    import importlib

    from apet_export.errors import MissingDependencyError

    for name in EXPORT_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise MissingDependencyError(
                f"{what} needs the export extra (torch, transformers, onnxscript, onnx-ir) and {name} does not "
                f"import ({error}): pip install 'apet-export[export]', torch==2.13.0 first as the README says "
                f"(running a build on onnxruntime needs none of them)"
            ) from None


# TensorRT's Python API ships under two module names with the same classes: `tensorrt` (the full
# library: Jetson, data-centre GPUs) and `tensorrt_rtx_bindings` (TensorRT-RTX, which installs from the
# package index on CPU machines and builds engines ahead of time for a named compute capability).
TENSORRT_MODULES = ("tensorrt", "tensorrt_rtx_bindings")


def import_tensorrt(prefer: str | None = None):
    """The first importable TensorRT module (or exactly `prefer`); MissingDependencyError naming the fix."""
    import importlib

    from apet_export.errors import MissingDependencyError

    names = (prefer,) if prefer else TENSORRT_MODULES
    failures = []
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError as error:  # also raised when the module's shared libraries are missing
            failures.append(f"{name}: {error}")
    raise MissingDependencyError(
        f"TensorRT is not installed ({'; '.join(failures)}): on a GPU machine install TensorRT >= 10.14 "
        f"(pip install -e '.[trt]'); on a CPU machine, for ahead-of-time builds, "
        f"pip install tensorrt-rtx-cu12-bindings==1.7.1.116 tensorrt-rtx-cu12-libs==1.7.1.116"
    )


def is_tensorrt_rtx(trt) -> bool:
    return trt.__name__.startswith("tensorrt_rtx")


def ensure_tensorrt_rtx_plugin_import(trt) -> None:
    """TensorRT-RTX 1.7's ONNX parser dlopen()s the unversioned `libtensorrt_rtx.so` the first time it imports
    a plugin node, but the wheel ships only `libtensorrt_rtx.so.1`: the failed load aborts the whole process
    (std::terminate, no Python exception). The parser searches its own directory first (RPATH $ORIGIN), so a
    symlink there to the library already loaded fixes it. Created once (atomically); where the directory is
    read-only, MissingDependencyError with the command. A no-op for `tensorrt` and off Linux."""
    import os
    import sys

    from apet_export.errors import MissingDependencyError

    if not is_tensorrt_rtx(trt) or not sys.platform.startswith("linux"):
        return
    library_dir = _loaded_library_dir("libtensorrt_onnxparser_rtx.so")
    if library_dir is None or os.path.exists(os.path.join(library_dir, "libtensorrt_rtx.so")):
        return
    versioned = sorted(name for name in os.listdir(library_dir) if name.startswith("libtensorrt_rtx.so."))
    if not versioned:
        return
    link = os.path.join(library_dir, "libtensorrt_rtx.so")
    temporary = f"{link}.{os.getpid()}.tmp"
    try:
        os.symlink(versioned[0], temporary)
        os.replace(temporary, link)
    except OSError as error:
        raise MissingDependencyError(
            f"TensorRT-RTX's ONNX parser needs {link} to import plugin nodes and it cannot be created "
            f"({error}): run `ln -s {versioned[0]} {link}` once"
        ) from error


def _loaded_library_dir(name: str) -> str | None:
    """Directory of a shared library mapped into this process (from /proc/self/maps), or None."""
    import os

    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith(name):
                    return os.path.dirname(path)
    except OSError:
        return None
    return None


@contextlib.contextmanager
def quiet_quantization():
    """onnxruntime.quantization 1.31 logs a pre-processing hint on the root logger at every call and prints
    histogram progress to stdout: neither says anything about the user's calibration."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(None):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
