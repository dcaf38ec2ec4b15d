"""llm.onnx -> llm.cpu.onnx: the decoder in the form onnxruntime's CPU provider runs, with the KV cache written
in place instead of copied every step.

llm.onnx (the form TensorRT wants: Attention with the KV concat outside) appends each step's keys and values
with Concat, so every step copies the whole cache into new present_* tensors (about 2 ms a step at 600 tokens
for Qwen2-0.5B's 48 cache tensors, growing with the context):

    past_key_i [B, Hkv, P, Dh] ─┐
    key (new)  [B, Hkv, S, Dh] ─┴─ Concat(axis 2) ─► present_key_i [B, Hkv, P+S, Dh] ─► Attention(mask [B, 1, S, P+S])

llm.cpu.onnx takes a preallocated buffer of capacity C >= P+S instead and writes the new entries at position P
(opset 24 TensorScatter; onnxruntime's CPU kernel skips its copy when present and past are the same buffer,
which the runtime arranges with IO binding: runtime/backends/onnxrt.py):

    past_key_i [B, Hkv, C, Dh] ──┐
    key (new)  [B, Hkv, S, Dh] ──┼─ TensorScatter(axis 2) ─► present_key_i [B, Hkv, C, Dh] ─► Attention
    write_indices [B] = P ───────┘                           mask padded with the masked value to [B, 1, S, C]

P is not a new input: P = attention_mask length - S. Keys at positions >= P+S are masked, so the attention
output equals llm.onnx's (the masked scores are exactly 0 after the softmax).

Then (write_cpu_graph, simplify=True): no Add of an all-zero bias, and onnxruntime's fused CPU ops
(export/cpu_fusions.py: residual Add + RMSNorm fused, q/k/v and gate/up MatMuls packed, INT4 weights as
MatMulNBits, and each layer's TensorScatter + Attention block as one GroupQueryAttention on the same buffer
where the rotation is a RotaryEmbedding node). The graph's inputs and outputs keep their names; node names are
llm.onnx's where a node stays.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from apet_export.artifacts import load_onnx
from apet_export.config import ArtifactSpec, TensorSpec, masked_value
from apet_export.errors import ExportError

CPU_GRAPH = "llm.cpu.onnx"
CPU_OPSET = 24  # TensorScatter
CAPACITY = "capacity"  # the cache buffers' sequence axis
PREFIX = "/llm/cache"


def _shape_slice(name: str, tensor: str, start: int, end: int):
    from onnx import helper

    return helper.make_node("Shape", [tensor], [f"{PREFIX}/{name}"], name=f"{PREFIX}/{name}", start=start, end=end)


def _reads_leading_axes(node) -> bool:
    """A Shape node that reads only axes 0-1 ([B, Hkv]) of its input, which the CPU form leaves as they are."""
    if node.op_type != "Shape":
        return False
    attributes = {a.name: a.i for a in node.attribute}
    return attributes.get("end", 4) <= 2 and attributes.get("end", 4) > 0


def rewrite_cache_in_place(model) -> None:
    """Turn a loaded llm.onnx ModelProto into the CPU form, in place (see the module docstring)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    past = [v.name for v in graph.input if v.name.startswith("past_")]
    if not past:
        raise ExportError("the LLM graph has no past_* cache inputs: it is not an llm.onnx apet-export wrote")
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    # Shared: write position P (per row) and the padded mask, computed once for every layer.
    #   batch, sequence = inputs_embeds.shape[:2]; total = attention_mask.shape[1]
    #   write_indices [B] = total - sequence;  pads [8] = (0,0,0,0, 0,0,0, capacity - total)
    zeros = numpy_helper.from_array(np.zeros(7, np.int64), f"{PREFIX}/zeros7")
    shared = [
        _shape_slice("batch", "inputs_embeds", 0, 1),
        _shape_slice("sequence", "inputs_embeds", 1, 2),
        _shape_slice("total", "attention_mask", 1, 2),
        _shape_slice("capacity", past[0], 2, 3),
        helper.make_node("Sub", [f"{PREFIX}/total", f"{PREFIX}/sequence"], [f"{PREFIX}/past_length"],
                         name=f"{PREFIX}/past_length"),
        helper.make_node("Expand", [f"{PREFIX}/past_length", f"{PREFIX}/batch"], [f"{PREFIX}/write_indices"],
                         name=f"{PREFIX}/write_indices"),
        helper.make_node("Sub", [f"{PREFIX}/capacity", f"{PREFIX}/total"], [f"{PREFIX}/pad_length"],
                         name=f"{PREFIX}/pad_length"),
        helper.make_node("Concat", [zeros.name, f"{PREFIX}/pad_length"], [f"{PREFIX}/pads"], name=f"{PREFIX}/pads",
                         axis=0),
    ]
    graph.initializer.append(zeros)

    replaced = set()
    for name in past:
        users = consumers.get(name, [])
        # Shape nodes reading the batch or head axes stay valid (the exporter takes B from a cache input).
        others = [u for u in users if not _reads_leading_axes(u)]
        concat = others[0] if len(others) == 1 else None
        axis = next((a.i for a in concat.attribute if a.name == "axis"), None) if concat is not None else None
        if concat is None or concat.op_type != "Concat" or list(concat.input)[:1] != [name] or axis not in (2, -2):
            found = ", ".join(f"{u.op_type} {u.name}" for u in users) or "nothing"
            raise ExportError(f"{name} feeds {found}, not one Concat on the sequence axis: cannot write the cache in place")
        scatter = helper.make_node(
            "TensorScatter", [name, concat.input[1], f"{PREFIX}/write_indices"], list(concat.output),
            name=f"{concat.name}/TensorScatter", axis=2, mode="linear",
        )
        concat.CopyFrom(scatter)
        replaced.update(concat.output)

    # The attention masks [B, 1, S, P+S] padded to [B, 1, S, C]: once per distinct mask tensor.
    padded: dict[str, str] = {}
    attentions = [n for n in graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    if not attentions or any(len(n.input) < 4 or not n.input[3] for n in attentions):
        raise ExportError("the LLM graph's Attention nodes take no attn_mask: cannot pad it to the cache capacity")
    dtype = next(v.type.tensor_type.elem_type for v in graph.input if v.name == "inputs_embeds")
    fp16 = dtype == TensorProto.FLOAT16
    masked = np.array(masked_value(fp16), dtype=np.float16 if fp16 else np.float32)  # as export/llm.py's mask
    masked_initializer = numpy_helper.from_array(masked, f"{PREFIX}/masked")
    graph.initializer.append(masked_initializer)
    pads = []
    for node in attentions:
        mask = node.input[3]
        if mask not in padded:
            padded[mask] = f"{PREFIX}/mask_{len(padded)}"
            pads.append(helper.make_node("Pad", [mask, f"{PREFIX}/pads", masked_initializer.name], [padded[mask]],
                                         name=padded[mask], mode="constant"))
        node.input[3] = padded[mask]

    # Order: the shared shape nodes first (graph inputs only), each Pad right after its mask's producer.
    nodes = shared + list(graph.node)
    for pad in pads:
        producer = next((i for i, n in enumerate(nodes) if pad.input[0] in n.output), len(shared) - 1)
        nodes.insert(producer + 1, pad)
    del graph.node[:]
    graph.node.extend(nodes)

    # Cache I/O: the sequence axis is now the buffer capacity; drop stale intermediate shapes.
    for value in (*graph.input, *graph.output):
        if value.name.startswith(("past_", "present_")):
            value.type.tensor_type.shape.dim[2].dim_param = CAPACITY
    kept = [v for v in graph.value_info if v.name not in replaced]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, CPU_OPSET)


def _zero_constants(graph) -> dict[str, int]:
    """Names of the 1-D all-zero initializers -> their length."""
    from onnx import numpy_helper

    zeros = {}
    for tensor in graph.initializer:
        if len(tensor.dims) == 1 and tensor.data_location != 1:  # (external data: not read here)
            if not numpy_helper.to_array(tensor).any():
                zeros[tensor.name] = tensor.dims[0]
    return zeros


def remove_zero_bias_adds(model) -> int:
    """Add(MatMul(x, W), b) with b an all-zero [N] constant: the MatMul output itself (exact; the adds are
    onnxruntime kernel launches for nothing, e.g. the q/k/v biases of a freshly initialised model).
    Only where the bias cannot broadcast the shape: b has as many entries as the MatMul has output columns."""
    graph = model.graph
    zeros = _zero_constants(graph)
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    outputs = {v.name for v in graph.output}
    replace, removed = {}, []
    for node in graph.node:
        if node.op_type != "Add" or node.output[0] in outputs:
            continue
        left, right = node.input
        for data, bias in ((left, right), (right, left)):
            producer = producers.get(data)
            if bias not in zeros or producer is None:
                continue
            if producer.op_type == "MatMul" and len(shapes.get(producer.input[1], ())) == 2:
                columns = shapes[producer.input[1]][1]  # W [K, N]
            elif producer.op_type == "MatMulNBits":
                columns = next(a.i for a in producer.attribute if a.name == "N")
            else:
                continue
            if columns == zeros[bias]:
                replace[node.output[0]] = data
                removed.append(node)
                break
    for node in removed:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name in zeros and t.name not in used]
    for tensor in unused:  # (onnxruntime would warn about each one at every load)
        graph.initializer.remove(tensor)
    return len(removed)


def write_cpu_graph(source: Path, target: Path, simplify: bool = True) -> dict[str, int]:
    """Write the CPU form of the LLM graph `source` to `target`, beside it. Written to a temporary name, then
    renamed. Returns how many of each rewrite were made.

    simplify=True (what builds write): the cache written in place, no all-zero bias adds, and onnxruntime's
    fused CPU ops (export/cpu_fusions.py); the weights change form, so the graph gets a weight file of its own.
    simplify=False: the cache written in place only (to measure the steps apart); external weights, when the
    source has them, are shared with it."""
    import onnx

    from apet_export.export import cpu_fusions

    source, target = Path(source), Path(target)
    if source.parent.resolve() != target.parent.resolve():
        raise ExportError(f"{target} must be beside {source}: the two graphs share the weight files")
    model = load_onnx(source, load_external_data=simplify)
    rewrite_cache_in_place(model)
    counts = {"cache_in_place": sum(n.op_type == "TensorScatter" for n in model.graph.node)}
    if simplify:
        # Order matters: the skip-norm rule needs shapes, which ONNX shape inference gives through standard
        # ops only (before MatMulNBits); packing comes last, over the final weight form.
        if not any(n.op_type == "DequantizeLinear" for n in model.graph.node):
            # (weight-only INT4/INT8 MatMuls quantise their activations: the fused norm's last-bit differences
            # move those by a quantisation step, INT4 logits by ~1.2 of 56; so float graphs only)
            counts["skip_rms_norm"] = cpu_fusions.fuse_skip_rms_norms(model)
        counts["matmul_nbits"] = cpu_fusions.weight_only_to_matmulnbits(model)
        counts["zero_bias_adds"] = remove_zero_bias_adds(model)
        counts["packed_matmuls"] = cpu_fusions.pack_sibling_matmuls(model)
        counts["group_query_attention"] = cpu_fusions.fuse_group_query_attention(
            model, total=f"{PREFIX}/total", batch=f"{PREFIX}/batch")
        counts["heads_split_once"] = cpu_fusions.split_heads_once(model)
        counts["lm_head_parts"] = cpu_fusions.split_lm_head(model)
    temporary = target.with_name(f".{target.name}.tmp")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        onnx.save_model(model, str(temporary))  # the references to llm.onnx's weight file stay as they are
    else:
        # Weights go to a file of their own: onnxruntime maps external weights instead of parsing them out of
        # the protobuf, which holds its peak RSS to the weights' size (measured on the INT4 Qwen2-0.5B shape:
        # 374 MiB external against 515 MiB inline).
        data = target.with_name(f"{target.name}.data")
        data.unlink(missing_ok=True)  # onnx appends to an existing data file
        onnx.save_model(model, str(temporary), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        data.chmod(0o644)  # onnx creates it owner-only; the build's other files are world-readable
    os.replace(temporary, target)
    return counts


def cpu_graph_spec(llm: ArtifactSpec) -> ArtifactSpec:
    """llm.onnx's manifest entry with the cache axes renamed to the buffer capacity."""

    def renamed(spec: TensorSpec) -> TensorSpec:
        if not spec.name.startswith(("past_", "present_")):
            return spec
        return TensorSpec(spec.name, spec.dtype, (*spec.shape[:2], CAPACITY, *spec.shape[3:]))

    return ArtifactSpec(CPU_GRAPH, tuple(map(renamed, llm.inputs)), tuple(map(renamed, llm.outputs)))


def add_cpu_graph(directory: Path, manifest) -> None:
    """Write llm.cpu.onnx beside the build's llm.onnx and record it in the manifest as `llm_cpu`."""
    llm = manifest.files["llm"]
    write_cpu_graph(Path(directory) / llm.path, Path(directory) / CPU_GRAPH)
    manifest.files["llm_cpu"] = cpu_graph_spec(llm)
