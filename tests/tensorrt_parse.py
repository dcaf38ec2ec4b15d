"""TensorRT-RTX parse check shared by the family tests (parse only: no engine is built)."""

from pathlib import Path

import pytest


def parse_with_tensorrt(path: Path) -> tuple[bool, list[str], int]:
    """(parsed, parser errors, layers in the network) of TensorRT's ONNX parser on one graph."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is in the dev extras")
    from apet_export.compat import import_tensorrt

    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(path))
    return parsed, [str(parser.get_error(i)) for i in range(parser.num_errors)], network.num_layers


def check_build_parses(build_dir: Path) -> None:
    """vision.onnx and llm.onnx parse whole; vision.plugin.onnx parses up to its ApetScore node, which needs the
    plugin library registered (the only error allowed)."""
    for name in ("vision.onnx", "llm.onnx"):
        parsed, errors, layers = parse_with_tensorrt(build_dir / name)
        assert parsed and not errors and layers > 100, (name, errors)
    parsed, errors, _ = parse_with_tensorrt(build_dir / "vision.plugin.onnx")
    assert not parsed and len(errors) == 1 and "ApetScore" in errors[0] and "Plugin not found" in errors[0], errors
