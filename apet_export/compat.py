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
