"""TensorRT-RTX parse check shared by the family tests (parse only: no engine is built)."""

from pathlib import Path

import pytest


def tensorrt_network(path: Path):
    """(network, parser) of the product's TensorRT parse of one graph (export/trt_network.parse_onnx: strongly
    typed, as `apet-export engine` parses it); EngineBuildError names the parser's errors. Keep the parser
    while the network is used: it owns the weights."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is in the dev extras")
    from apet_export.compat import import_tensorrt
    from apet_export.export.trt_network import parse_onnx

    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    return parse_onnx(trt, trt.Builder(logger), logger, path)


def network_inputs(network) -> dict[str, tuple[int, ...]]:
    return {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}


def network_outputs(network) -> list[str]:
    return [network.get_output(i).name for i in range(network.num_outputs)]


def parse_with_tensorrt(path: Path) -> tuple[bool, list[str], int]:
    """(parsed, parser errors, layers in the network) of the product's TensorRT parse of one graph."""
    from apet_export.errors import EngineBuildError

    try:
        network, _parser = tensorrt_network(path)
    except EngineBuildError as error:
        return False, [str(error)], 0
    return True, [], network.num_layers


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
