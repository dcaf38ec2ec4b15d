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
    """vision.onnx, vision.plugin.onnx (with the ApetScore plugin registered) and llm.onnx parse whole."""
    from apet_export.compat import import_tensorrt
    from apet_export.plugins.trt_plugin import ensure_plugin_registered

    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is in the dev extras")
    ensure_plugin_registered(import_tensorrt())
    for name in ("vision.onnx", "vision.plugin.onnx", "llm.onnx"):
        parsed, errors, layers = parse_with_tensorrt(build_dir / name)
        print(f"{name}: {layers} layers, {len(errors)} parser errors")
        assert parsed and not errors and layers > 100, (name, errors)
