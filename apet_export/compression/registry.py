"""Compression methods by name: `get_method("apet")(x, keep, config, **aux)`."""

from __future__ import annotations

from collections.abc import Callable

from apet_export.compression.apet import apet_compress
from apet_export.compression.baselines import no_compress, pool_compress, random_compress, visionzip_compress
from apet_export.compression.types import CompressionOutput
from apet_export.errors import UnknownNameError

CompressionMethod = Callable[..., CompressionOutput]


def _apet(x, keep, config=None, **_aux) -> CompressionOutput:
    return apet_compress(x, keep, config)


METHODS: dict[str, CompressionMethod] = {
    "apet": _apet,
    "visionzip": visionzip_compress,
    "random": random_compress,
    "pool": pool_compress,
    "none": no_compress,
}


def get_method(name: str) -> CompressionMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownNameError("compression method", name, list(METHODS)) from None
