"""Quantising the graphs: calibrated INT8 / FP8 QDQ (vision, and the LLM for FP8) and weight-only INT8 / INT4
(the LLM on onnxruntime CPU).

    vision.onnx ─ranges─► INT8: QuantizeLinear/DequantizeLinear pairs on every MatMul / Conv / Gemm input,
                           symmetric int8 (zero point 0), weights per output channel   (onnxruntime.quantization)
                        ─► FP8:  the same places, float8 e4m3fn, scale = amax / 448      (written here, see below)
    /vision/apet/...       stays float: its nodes are excluded by name, so scoring, FPS, TopK and merging
                           see float features and rank exactly as the fp32 build would for those features
    patch embedding        stays float: the compute node(s) reading the pixels (pixel_layers), the layer whose
                           int8 error moved ApET's ranking most (see pixel_layers)
    llm.onnx           ─► INT8/INT4 weight-only: int8 / int4 weights ─DequantizeLinear─► MatMul (int8 per
                           output channel, int4 per block of 32 along K; symmetric): runs on onnxruntime CPU
                           and parses and builds in TensorRT (com.microsoft MatMulNBits does not)
                        ─► FP8 (TensorRT): QDQ like the vision graph, the lm_head left in float

Why onnxruntime.quantization and not NVIDIA ModelOpt's ONNX quantisation: it is already installed with
onnxruntime 1.31 and runs its calibration on the CPU provider; its QDQ output (symmetric int8, zero point
0, per-channel weights) is the explicit-quantisation form TensorRT consumes, and onnxruntime CPU fuses it
into integer kernels. The weight-only LLM form (DequantizeLinear on integer weights) is written here: its
MatMul4BitsQuantizer writes QDQ for 4 bits only and MatMulNBits otherwise, which TensorRT cannot parse.
ModelOpt's ONNX path (`nvidia-modelopt[onnx]` 0.47.0) would, per `pip install --dry-run`, downgrade onnx to 1.21.0 and pull
onnxruntime-gpu 1.24.4 and cupy-cuda12x: it cannot share this environment (pinned onnx 1.23.2 /
onnxruntime 1.31.1).

FP8 is written here rather than by onnxruntime because onnxruntime derives float8 scales from the
standard deviation of a "Distribution" calibration (activations and weights), while TensorRT / ModelOpt
use scale = amax / 448 (e4m3's largest finite value), so no calibrated value saturates. Writing the QDQ
pairs directly keeps that convention and lets --method (minmax / entropy / percentile) choose the amax.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from apet_export.artifacts import load_onnx
from apet_export.compat import quiet_quantization
from apet_export.errors import InvalidInputError

PRECISIONS = ("int8", "fp8")
METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OP_TYPES = ("MatMul", "Conv", "Gemm")
FLOAT_SUBGRAPHS = ("/vision/apet/",)  # node-name prefixes that must stay in float
FP8_E4M3_MAX = 448.0
PROTOBUF_LIMIT = 2**31 - 1


def calibration_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise InvalidInputError(f"calibration method {method!r} is unknown: choose one of {', '.join(METHODS)}")
    return methods[method]


def is_large(path: Path) -> bool:
    """Graphs whose weights live in external data (> 2 GB) must be written the same way."""
    return Path(f"{path}.data").is_file() or Path(path).stat().st_size > PROTOBUF_LIMIT


def nodes_in(model, prefixes: tuple[str, ...]) -> list[str]:
    return [node.name for node in model.graph.node if node.name.startswith(prefixes)]


def pixel_layers(model) -> list[str]:
    """The compute nodes (MatMul / Conv / Gemm) that read the graph's first input (the pixels) directly or
    through data-moving ops (Reshape, Cast, ...; not through Shape): the patch embedding of every tower.

    Why they stay in float (as deployers keep a network's first layer in higher precision): ApET's basis is
    chosen by farthest point sampling, a chain of argmax decisions over the features; a feature error that
    flips one near-tied choice changes the basis and with it every token's score. Measured on tiny-llava
    (int8, 12 pictures, budget 64), leaving one group of layers in float at a time: nothing in float, the basis
    changed in 7 of 12 pictures (kept-index overlap 78.5% mean); the patch embedding in float: 3 of 12
    (93.4%); tower layer 0: 4 (88.2%); tower layer 1: 7 (77.7%); the projector: 7 (78.5%). The patch
    embedding is one Conv of the tower (CLIP-L/14 at 336 px: about 0.2% of its multiply-adds)."""
    pixels = model.graph.input[0].name
    readers: dict[str, list] = {}
    for node in model.graph.node:
        if node.input:
            readers.setdefault(node.input[0], []).append(node)
    found, frontier, seen = [], [pixels], set()
    while frontier:
        for node in readers.get(frontier.pop(), []):
            if node.name in seen or node.op_type in ("Shape", "Size"):
                continue
            seen.add(node.name)
            if node.op_type in QUANTIZED_OP_TYPES:
                found.append(node.name)
            else:
                frontier.extend(node.output)
    return found


def collect_ranges(graph: Path, reader, method: str, feeds_per_pass: int = 1):
    """Run the graph over the reader's feeds and return onnxruntime's TensorsData (ranges of the inputs
    and outputs of every MatMul / Conv / Gemm). The reader is consumed `feeds_per_pass` feeds at a time,
    so intermediate outputs of at most that many feeds are held in memory."""
    from onnxruntime.quantization.calibrate import create_calibrator

    reader.limit = max(1, feeds_per_pass)
    with tempfile.TemporaryDirectory(prefix="apet-calibrate.") as scratch, quiet_quantization():
        calibrator = create_calibrator(
            Path(graph), list(QUANTIZED_OP_TYPES), augmented_model_path=str(Path(scratch) / "augmented.onnx"),
            calibrate_method=calibration_method(method), use_external_data_format=is_large(graph),
            providers=["CPUExecutionProvider"], extra_options={"symmetric": True},
        )
        for _ in range(reader.passes):
            calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
        del calibrator  # its session holds the augmented graph (and its memory)
    return ranges


def quantize_int8(graph: Path, out: Path, ranges_file: Path, method: str, exclude: list[str]) -> None:
    """INT8 QDQ through onnxruntime, reading the cached ranges (no calibration pass happens here)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with quiet_quantization():
        quantize_static(
            str(graph), str(out), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
            # reduce_range: 7-bit weights. onnxruntime's x86 int8 kernels multiply u8 activations by s8
            # weights with VPMADDUBSW, which saturates a pair's int16 sum on AVX2 / AVX-512 without VNNI
            # (255*127*2 > 32767), while VNNI accumulates exactly: the same graph gave different accuracy per
            # CPU (tiny-llava first-step logit diff 0.27 on AVX2 vs 0.02 with exact kernels). With 7-bit
            # weights no pair can saturate (255*64*2 < 32767), so every x86-64 computes the same integers.
            op_types_to_quantize=list(QUANTIZED_OP_TYPES), per_channel=True, reduce_range=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
            use_external_data_format=is_large(graph), calibrate_method=calibration_method(method),
            calibration_cache_path=str(ranges_file),
            extra_options={
                "ActivationSymmetric": True, "WeightSymmetric": True,
                # Q/DQ on the inputs of MatMul / Conv / Gemm only (TensorRT's placement); quantised outputs
                # would put Q/DQ on reshapes and adds, and onnxruntime 1.31 mis-types their propagation.
                "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OP_TYPES),
            },
        )


def amax(ranges, tensor: str) -> float:
    low, high = ranges[tensor].range_value
    return float(max(abs(float(np.max(low))), abs(float(np.max(high)))))


def fp8_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """weight -> (float8 e4m3 values, scale per channel along axis): scale = amax / 448 per channel."""
    import ml_dtypes

    reduce = tuple(a for a in range(weight.ndim) if a != axis)
    scale = np.abs(weight).max(axis=reduce) / FP8_E4M3_MAX  # [C]
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    values = np.clip(weight / scale.reshape(shape), -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return values, scale


def weight_axis(node, initializers: dict) -> int:
    """Output-channel axis of a node's weight: MatMul W [K, N] -> 1, Conv W [O, I, kh, kw] -> 0,
    Gemm -> 0 with transB else 1."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return len(initializers[node.input[1]].dims) - 1


def quantize_fp8(graph: Path, out: Path, ranges, exclude: list[str]) -> None:
    """FP8 e4m3 QDQ on the activation and weight inputs of every MatMul / Conv / Gemm not excluded.

        x ─Q(s_x = amax_x / 448)─DQ─┐
        W_fp8 [.., C] ─DQ(s_w [C])──┴─► MatMul / Conv / Gemm      (biases and outputs stay float)
    """
    from onnx import TensorProto, helper, numpy_helper

    model = load_onnx(graph)
    initializers = {init.name: init for init in model.graph.initializer}
    excluded = set(exclude)
    new_nodes, new_inits = [], []
    quantized_activations: dict[str, str] = {}  # tensor -> its dequantised name (shared by every consumer)
    zero = numpy_helper.from_array(np.zeros((), np.float32).astype("float8_e4m3fn"), "fp8_zero_point")
    new_inits.append(zero)
    quantized_weights: dict[str, str] = {}  # weight -> its dequantised name (tied weights are quantised once)
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OP_TYPES or node.name in excluded or node.input[1] not in initializers:
            continue
        activation, weight_name = node.input[0], node.input[1]
        if activation in ranges.data and activation not in initializers:
            if activation not in quantized_activations:
                value = np.array(max(amax(ranges, activation), 1e-12) / FP8_E4M3_MAX, np.float32)
                scale = numpy_helper.from_array(value, f"{activation}_fp8_scale")
                new_inits.append(scale)
                q_out, dq_out = f"{activation}_fp8", f"{activation}_fp8_dequantized"
                new_nodes += [
                    helper.make_node("QuantizeLinear", [activation, scale.name, zero.name], [q_out],
                                     name=f"{node.name}/input_QuantizeLinear"),
                    helper.make_node("DequantizeLinear", [q_out, scale.name, zero.name], [dq_out],
                                     name=f"{node.name}/input_DequantizeLinear"),
                ]
                quantized_activations[activation] = dq_out
            node.input[0] = quantized_activations[activation]
        if weight_name not in quantized_weights:
            axis = weight_axis(node, initializers)
            values, scale = fp8_weight(numpy_helper.to_array(initializers[weight_name]).astype(np.float32), axis)
            q_weight = numpy_helper.from_array(values, f"{weight_name}_fp8")
            q_weight.data_type = TensorProto.FLOAT8E4M3FN
            w_scale = numpy_helper.from_array(scale, f"{weight_name}_fp8_scale")
            w_zero = numpy_helper.from_array(np.zeros(scale.shape, np.float32).astype("float8_e4m3fn"),
                                             f"{weight_name}_fp8_zero_point")
            new_inits += [q_weight, w_scale, w_zero]
            new_nodes.append(helper.make_node(
                "DequantizeLinear", [q_weight.name, w_scale.name, w_zero.name], [f"{weight_name}_dequantized"],
                name=f"{node.name}/weight_DequantizeLinear", axis=axis,
            ))
            quantized_weights[weight_name] = f"{weight_name}_dequantized"
        node.input[1] = quantized_weights[weight_name]
    add_nodes_and_drop_unused(model, new_nodes, new_inits)
    save(model, out, large=is_large(graph))


def add_nodes_and_drop_unused(model, new_nodes, new_inits) -> None:
    """Appends the new (de)quantisation nodes and their initializers, drops the initializers nothing reads any
    more (the float weights they replace), and sorts the graph so that each new node precedes its consumer."""
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(new_inits)
    used = {name for node in model.graph.node for name in node.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    sort_topologically(model)


def sort_topologically(model) -> None:
    """Reorder graph.node so every node comes after the producers of its inputs (Kahn's algorithm)."""
    nodes = list(model.graph.node)
    available = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    producers = {out: index for index, node in enumerate(nodes) for out in node.output}
    ordered, placed = [], set()
    pending = list(range(len(nodes)))
    while pending:
        progress, remaining = False, []
        for index in pending:
            if all(name in available or name not in producers for name in nodes[index].input):
                ordered.append(nodes[index])
                placed.add(index)
                available.update(nodes[index].output)
                progress = True
            else:
                remaining.append(index)
        if not progress:  # a cycle: cannot happen for graphs the exporter wrote
            raise InvalidInputError("the quantised graph has a cycle: this is a bug in apet-export")
        pending = remaining
    del model.graph.node[:]
    model.graph.node.extend(ordered)


WEIGHT_ONLY_BITS = {8: 127, 4: 7}  # bits -> largest magnitude of the symmetric integer range
BLOCK_DQ_OPSET = 21  # DequantizeLinear's block_size attribute and the int4 type


def weight_only_weight(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] float -> (int8 / int4 values [K, N], scale) with W ≈ values * scale, symmetric (zero point 0):
    int8: one scale per output channel, scale [N] (DequantizeLinear axis 1);
    int4: one scale per block of `block_size` rows of each column, scale [K / block, N] (axis 0, block_size)."""
    import ml_dtypes

    largest = WEIGHT_ONLY_BITS[bits]
    rows, cols = weight.shape
    if bits == 8:
        scale = np.abs(weight).max(axis=0) / largest  # [N]
        expanded = scale
    else:
        blocks = np.abs(weight).reshape(rows // block_size, block_size, cols).max(axis=1)  # [K / block, N]
        scale = blocks / largest
        expanded = np.repeat(scale, block_size, axis=0)  # [K, N]
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    expanded = np.where(expanded > 0, expanded, 1.0)
    values = np.clip(np.round(weight / expanded), -largest, largest).astype(np.int8 if bits == 8 else ml_dtypes.int4)
    return values, scale


def quantize_weights(graph: Path, out: Path, bits: int = 8, block_size: int = 32) -> dict:
    """Weight-only INT8 / INT4 of llm.onnx: the constant weight of every MatMul (and of every Gemm, rewritten as a
    MatMul first) becomes integers read through a DequantizeLinear, the form both onnxruntime and TensorRT consume:

        W int8 [K, N] ─DequantizeLinear(scale [N], axis=1)──────────────────┐
        W int4 [K, N] ─DequantizeLinear(scale [K/32, N], axis=0, block_size=32)┴─► MatMul(x [B, S, K]) -> [B, S, N]

    Activations stay in the graph's float type (the scales have that type, so a DequantizeLinear yields
    what the MatMul expects in a strongly typed TensorRT network); onnxruntime CPU fuses the pair into its
    integer-weight kernels, TensorRT into a weight-only GEMM. Symmetric (no zero point: TensorRT's
    dequantisation requires zero points of 0). Int4 needs K divisible by the block size; a MatMul whose K
    is not is left in float and counted. Returns {"quantized": n, "float": [names left in float]}."""
    from onnx import helper, numpy_helper

    if bits not in WEIGHT_ONLY_BITS:
        raise InvalidInputError(f"weight-only quantisation supports 4 or 8 bits, got {bits}")
    model = load_onnx(graph)
    gemms_as_matmuls(model)  # the LM head: the exporter writes a Linear on 2-D rows as Gemm
    initializers = {init.name: init for init in model.graph.initializer}
    dequantized: dict[str, str] = {}  # weight -> its DequantizeLinear output (tied weights are quantised once)
    new_nodes, new_inits, left_float = [], [], []
    for node in model.graph.node:
        weight_name = node.input[1] if node.op_type == "MatMul" else None
        if weight_name not in initializers or len(initializers[weight_name].dims) != 2:
            continue
        if weight_name not in dequantized:
            weight = numpy_helper.to_array(initializers[weight_name])  # [K, N], float32 or float16
            if bits == 4 and weight.shape[0] % block_size:
                left_float.append(node.name)
                continue
            values, scale = weight_only_weight(weight.astype(np.float32), bits, block_size)
            q_weight = numpy_helper.from_array(values, f"{weight_name}_int{bits}")
            w_scale = numpy_helper.from_array(scale.astype(weight.dtype), f"{weight_name}_int{bits}_scale")
            new_inits += [q_weight, w_scale]
            attributes = {"axis": 1} if bits == 8 else {"axis": 0, "block_size": block_size}
            new_nodes.append(helper.make_node(
                "DequantizeLinear", [q_weight.name, w_scale.name], [f"{weight_name}_dequantized"],
                name=f"{node.name}/weight_DequantizeLinear", **attributes,
            ))
            dequantized[weight_name] = f"{weight_name}_dequantized"
        node.input[1] = dequantized[weight_name]
    _require_opset(model, BLOCK_DQ_OPSET)
    add_nodes_and_drop_unused(model, new_nodes, new_inits)
    save(model, out, large=is_large(graph))
    return {"quantized": len(set(dequantized)), "float": left_float}


def gemms_as_matmuls(model) -> int:
    """Gemm(x [M, K], W, C) with a constant W, alpha 1 and x not transposed -> MatMul(x, W as [K, N]) (+ Add(C)
    where there is a bias, beta 1), in place; returns how many. The exporter writes a Linear on 2-D rows as a
    Gemm with W [N, K] transposed (the LM head, which reads the last position's row only): left as it is, the
    largest weight of the decoder at a real vocabulary (Qwen2: 151936 x 896) would stay in float."""
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    count = 0
    for node in model.graph.node:
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or node.input[1] not in initializers:
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if attributes.get("alpha", 1.0) != 1.0 or attributes.get("transA", 0) or (bias and attributes.get("beta", 1.0) != 1.0):
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if weight.ndim != 2:
            continue
        if attributes.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)  # [N, K] -> [K, N]
        kn_weight = numpy_helper.from_array(weight, f"{node.input[1]}_kn")
        model.graph.initializer.append(kn_weight)
        output = node.output[0]
        matmul_output = f"{output}/matmul" if bias else output
        node.CopyFrom(helper.make_node("MatMul", [node.input[0], kn_weight.name], [matmul_output], name=node.name))
        if bias:
            model.graph.node.append(helper.make_node("Add", [matmul_output, bias], [output], name=f"{node.name}/bias"))
        count += 1
    return count


def _require_opset(model, version: int) -> None:
    """Raise the default-domain opset to `version` where it is lower (the graphs the exporter writes are
    opset 23, for Attention: nothing changes for them)."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < version:
            opset.version = version


def save(model, out: Path, large: bool) -> None:
    from apet_export.export.onnx_graph import save_model

    save_model(model, out, external_data_above=0 if large else PROTOBUF_LIMIT)


def name_qdq_nodes(path: Path) -> None:
    """onnxruntime names Q/DQ nodes after tensors (x_QuantizeLinear); rename them to the path of the node
    they serve (/vision/.../linear_4/QuantizeLinear), so profiles and TensorRT layer names stay paths."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def anchor(node, depth=0):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or depth > 3:
            return node.name
        readers = consumers.get(node.output[0], [])
        return anchor(readers[0], depth + 1) if readers else node.name

    seen = {n.name for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and not node.name.startswith("/"):
            base = f"{anchor(node)}/{node.op_type}"
            name, suffix = base, 0
            while name in seen:
                suffix += 1
                name = f"{base}_{suffix}"
            seen.add(name)
            node.name = name
    onnx.save_model(model, str(path))  # external data (if any) stays where it is: only node names changed


def quantized_nodes(model) -> list[str]:
    """Names of the compute nodes (MatMul / Conv / Gemm / MatMulNBits) that run on quantised values: a
    DequantizeLinear feeds one of their inputs, or they are MatMulNBits."""
    produced_by_dq = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return [
        node.name for node in model.graph.node
        if node.op_type == "MatMulNBits"
        or (node.op_type in QUANTIZED_OP_TYPES and any(name in produced_by_dq for name in node.input))
    ]


def translate_ranges(ranges, source_model, target_model):
    """Ranges measured on one graph, renamed for another export of the same module (vision.onnx ->
    vision.plugin.onnx): nodes are matched by their path name and op type, tensors by position.
    The plugin graph cannot be calibrated itself (its ApetScore node needs a custom-op library that
    onnxruntime's calibrator does not load), and its tower and projector are the same computation."""
    from onnxruntime.quantization.calibrate import TensorsData

    by_name = {node.name: node for node in source_model.graph.node}
    renamed = {}
    for node in target_model.graph.node:
        twin = by_name.get(node.name)
        if twin is None or twin.op_type != node.op_type:
            continue
        for ours, theirs in (*zip(node.input, twin.input, strict=False), *zip(node.output, twin.output, strict=False)):
            if theirs in ranges.data:
                renamed[ours] = ranges.data[theirs]
    for name in ("pixel_values",):  # graph inputs keep their names
        if name in ranges.data:
            renamed[name] = ranges.data[name]
    return TensorsData(ranges.calibration_method, renamed)
