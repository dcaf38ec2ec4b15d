"""Rewrites of the CPU LLM graph (llm.cpu.onnx) into onnxruntime's fused CPU contrib ops. llm.onnx keeps the
standard ops TensorRT imports; these are for onnxruntime's CPU provider only, and each one computes what the
ops it replaces compute (greedy tokens stay the same: tests/runtime/test_cpu_graph.py).

Per decoder layer, before -> after (onnxruntime's own load-time optimiser does none of these on llm.onnx):

    Add(residual, x) -> RMSNormalization           SkipSimplifiedLayerNormalization(residual, x) (sum: output 3;
                                                   float graphs only: see write_cpu_graph)
    DequantizeLinear(W int4) -> MatMul             MatMulNBits(x, W as uint4 blocks)   (INT4 builds)
    MatMul q, MatMul k, MatMul v (same input x)    MatMul(x, [Wq | Wk | Wv]) -> Split   (likewise gate | up)
    q, k, v each Reshape -> Transpose to heads     one Reshape -> Transpose of q|k|v, then Split on the heads

and once: the float LM head over a large vocabulary -> vocabulary slices and a Concat (split_lm_head).

MatMulNBits is what onnxruntime turns the DequantizeLinear -> MatMul pair into when it loads the graph; written
ahead of time, the session never holds the int4 initializers and the fused copy at once (about 190 MiB of
peak RSS on the Qwen2-0.5B shape). One MatMul over the packed weights reads the same bytes as three, with one
kernel launch and one thread-pool split instead of three small ones (decode is a matrix-vector product per
weight, so small N splits badly over the threads).
"""

from __future__ import annotations

import numpy as np

MICROSOFT = "com.microsoft"
WEIGHT_BYTES = 4096  # initializers above this size are weights (shape rules never read their values)
INT4_ACCURACY_LEVEL = 4  # onnxruntime's default for the MatMulNBits it fuses DequantizeLinear -> MatMul into


def _attribute(node, name: str, default=None):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _consumers(graph) -> dict[str, list]:
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _drop_unused_initializers(graph, names) -> None:
    used = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
    unused = [t for t in graph.initializer if t.name in names and t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)


def fuse_skip_rms_norms(model) -> int:
    """Add + RMSNormalization -> com.microsoft SkipSimplifiedLayerNormalization, in place, through onnxscript's
    fusion rule (which matches onnxruntime's SimplifiedLayerNormalization, the same computation as the ONNX op:
    axis -1, float stash). Returns the number of fusions; RMSNormalization nodes not preceded by a residual Add
    stay as they are.

    The rule runs on a copy of the graph whose large weights are typed inputs instead of initializers: it reads
    only shapes, and the weights (gigabytes) are neither copied nor converted."""
    import onnx_ir as ir
    from onnx import helper
    from onnx_ir.passes.common import ShapeInferencePass
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    graph = model.graph
    large = {t.name: t for t in graph.initializer if t.data_location == 1 or len(t.raw_data) > WEIGHT_BYTES}
    light = helper.make_model(
        helper.make_graph(
            list(graph.node), graph.name,
            [*graph.input, *(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in large.values())],
            list(graph.output), [t for t in graph.initializer if t.name not in large], value_info=list(graph.value_info),
        ),
        opset_imports=list(model.opset_import), ir_version=model.ir_version,
    )
    for node in light.graph.node:
        if (node.op_type == "RMSNormalization" and node.domain in ("", "ai.onnx") and _attribute(node, "axis", -1) == -1
                and _attribute(node, "stash_type", 1) == 1):
            node.op_type = "SimplifiedLayerNormalization"  # (onnxruntime registers it in the ONNX domain)
    ir_model = ir.serde.deserialize_model(light)
    ShapeInferencePass()(ir_model)  # the rule checks that residual and input are both [B, S, D]
    count = fuse_skip_rms_normalization(ir_model)
    fused = ir.serde.serialize_model(ir_model).graph
    for node in fused.node:
        if node.op_type == "SimplifiedLayerNormalization" and node.domain in ("", "ai.onnx"):
            node.op_type = "RMSNormalization"  # the ones left: back to the standard op
    small = [t for t in fused.initializer if t.name not in large]  # (the weights stay where they are)
    del graph.node[:], graph.value_info[:]
    graph.node.extend(fused.node)
    graph.value_info.extend(fused.value_info)
    for tensor in [t for t in graph.initializer if t.name not in large]:
        graph.initializer.remove(tensor)
    graph.initializer.extend(small)
    if count and not any(o.domain == MICROSOFT for o in model.opset_import):
        model.opset_import.append(_microsoft_opset())
    return count


def _microsoft_opset():
    from onnx import helper

    return helper.make_opsetid(MICROSOFT, 1)


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def weight_only_to_matmulnbits(model) -> int:
    """DequantizeLinear(W int4 [K, N], scale [K/b, N], axis 0, block_size b, no zero point) -> MatMul(x, ·)
    becomes MatMulNBits(x, B uint8 [N, K/b, b/2], scales [N, K/b]), K, N, bits 4, block_size b:

        B[n, j, i // 2] holds W[j*b + i, n] + 8 (the default zero point 8 makes the stored uint4 the same
        signed value): low nibble for even i, high nibble for odd i.

    The same weights and scales, so the same numbers as onnxruntime's load-time fusion of the pair. Returns
    the number of MatMuls rewritten; weights that do not fit (other bit widths, zero points, block sizes
    MatMulNBits does not take) keep their DequantizeLinear."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    converted: dict[str, tuple[str, str, int, int, int]] = {}  # DQ output -> (B, scales, K, N, block)
    replaced, dropped = 0, set()
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        dequantize = producers.get(node.input[1])
        if dequantize is None or dequantize.op_type != "DequantizeLinear" or len(dequantize.input) != 2:
            continue
        weight, scale = (initializers.get(name) for name in dequantize.input)
        block = _attribute(dequantize, "block_size", 0)
        if (weight is None or scale is None or weight.data_type != TensorProto.INT4 or len(weight.dims) != 2
                or _attribute(dequantize, "axis", 1) != 0 or not _is_power_of_two(block) or block < 16
                or weight.dims[0] % block):
            continue
        if dequantize.output[0] not in converted:
            values = numpy_helper.to_array(weight).astype(np.int8)  # [K, N] in [-8, 7]
            k, n = values.shape
            stored = (values.T + 8).astype(np.uint8).reshape(n, k // block, block)  # [N, K/b, b]
            packed = stored[..., 0::2] | (stored[..., 1::2] << 4)  # [N, K/b, b/2]
            scales = numpy_helper.to_array(scale).T.copy()  # [N, K/b], the activations' float type
            b_name, s_name = f"{weight.name}_nbits", f"{scale.name}_nbits"
            graph.initializer.extend([numpy_helper.from_array(packed, b_name), numpy_helper.from_array(scales, s_name)])
            converted[dequantize.output[0]] = (b_name, s_name, k, n, block)
            dropped.update(dequantize.input)
        b_name, s_name, k, n, block = converted[dequantize.output[0]]
        graph.node[index].CopyFrom(helper.make_node(
            "MatMulNBits", [node.input[0], b_name, s_name], list(node.output), name=node.name, domain=MICROSOFT,
            K=k, N=n, bits=4, block_size=block, accuracy_level=INT4_ACCURACY_LEVEL,
        ))
        replaced += 1
    if replaced:
        used = {name for node in graph.node for name in node.input}
        for node in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] in converted]:
            if node.output[0] not in used:
                graph.node.remove(node)
        _drop_unused_initializers(graph, dropped)
        if not any(o.domain == MICROSOFT for o in model.opset_import):
            model.opset_import.append(_microsoft_opset())
    return replaced


def _packing_key(node, initializers):
    """What MatMuls must share to be packed along N: their input and the weight's layout (None: not packable)."""
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        weight = initializers.get(node.input[1])
        if weight is None or len(weight.dims) != 2:
            return None
        return ("MatMul", node.input[0], weight.dims[0], weight.data_type)
    if node.op_type == "MatMulNBits" and node.domain == MICROSOFT and len(node.input) == 3:
        weight, scales = (initializers.get(name) for name in node.input[1:])
        if weight is None or scales is None or len(scales.dims) != 2:
            return None
        return ("MatMulNBits", node.input[0], *(_attribute(node, a) for a in ("K", "bits", "block_size", "accuracy_level")))
    return None


def pack_sibling_matmuls(model) -> int:
    """MatMuls with the same input and constant weights (q/k/v; gate/up) -> one MatMul over the weights
    concatenated along N, then Split back into the original outputs (exact: every output column is the
    same dot product over K). Returns the number of MatMuls packed away."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    groups: dict[tuple, list] = {}
    for node in graph.node:
        key = _packing_key(node, initializers)
        if key is not None:
            groups.setdefault(key, []).append(node)
    removed, dropped = 0, set()
    for key, members in groups.items():
        if len(members) < 2:
            continue
        first = members[0]
        name = f"{first.name}/packed"
        if key[0] == "MatMul":
            weights = [numpy_helper.to_array(initializers[m.input[1]]) for m in members]  # [K, N_i]
            widths = [w.shape[1] for w in weights]
            graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), f"{name}_weight"))
            packed = helper.make_node("MatMul", [first.input[0], f"{name}_weight"], [name], name=name)
            dropped.update(m.input[1] for m in members)
        else:
            blobs = [numpy_helper.to_array(initializers[m.input[1]]) for m in members]  # [N_i, K/b, b/2]
            scales = [numpy_helper.to_array(initializers[m.input[2]]) for m in members]  # [N_i, K/b]
            widths = [b.shape[0] for b in blobs]
            graph.initializer.extend([numpy_helper.from_array(np.concatenate(blobs), f"{name}_weight"),
                                      numpy_helper.from_array(np.concatenate(scales), f"{name}_scales")])
            attributes = {a: _attribute(first, a) for a in ("K", "bits", "block_size", "accuracy_level")}
            packed = helper.make_node("MatMulNBits", [first.input[0], f"{name}_weight", f"{name}_scales"], [name],
                                      name=name, domain=MICROSOFT, N=sum(widths), **attributes)
            dropped.update(n for m in members for n in m.input[1:])
        sizes = numpy_helper.from_array(np.array(widths, np.int64), f"{name}_sizes")
        graph.initializer.append(sizes)
        split = helper.make_node("Split", [name, sizes.name], [m.output[0] for m in members], name=f"{name}/split",
                                 axis=-1)
        position = list(graph.node).index(first)  # every member reads the same input: it is ready here
        for node in members:
            graph.node.remove(node)
        graph.node.insert(position, split)
        graph.node.insert(position, packed)
        removed += len(members) - 1
    _drop_unused_initializers(graph, dropped)
    return removed


GQA_PREFIX = "/llm/cpu/gqa"


def _heads_chain(graph_producers, tensor: str):
    """tensor = Transpose(0, 2, 1, 3)(Reshape(x [B, S, H·Dh]) [B, S, H, Dh]) -> (x, [reshape, transpose]), else None."""
    transpose = graph_producers.get(tensor)
    if transpose is None or transpose.op_type != "Transpose" or _attribute(transpose, "perm") != [0, 2, 1, 3]:
        return None
    reshape = graph_producers.get(transpose.input[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    return reshape.input[0], [reshape, transpose]


def fuse_group_query_attention(model, total: str, batch: str) -> int:
    """After rewrite_cache_in_place and pack_sibling_matmuls: each layer's attention block -> one
    com.microsoft GroupQueryAttention over the shared cache buffer (what onnxruntime-genai's CPU models run):

        q, k, v [B, S, H·Dh] ─(each) Reshape ─► Transpose to [B, H, S, Dh] ─► RotaryEmbedding (q, k)
          ─► TensorScatter(past_k, k), TensorScatter(past_v, v) ─► Attention(q, present_k, present_v, mask padded
          to the capacity) ─► Transpose ─► Reshape [B, S, Hq·Dh]
    ->  RotaryEmbedding(q), RotaryEmbedding(k) on [B, S, H·Dh] (num_heads: the same rotation, position_ids as
        before) ─► GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k = total - 1, total, attention_bias =
        the unpadded mask [B, 1, S, total]) ─► [B, S, Hq·Dh], present_k, present_v

    GroupQueryAttention writes the new keys and values at position total - S of the buffer (the same place
    TensorScatter did; in place when past and present are one buffer, as the runtime binds them), applies the
    causal mask itself and scores the keys up to total only (Attention scores the whole buffer). The mask as
    attention_bias keeps left padding masked. Its kernel takes a prompt after cached entries (S > 1, P > 0)
    at batch 1 only: the runner runs batched prompts whole. Returns the number of layers fused; a layer
    whose attention is not this pattern (the last layer, whose attention runs for the last query only) stays
    as it is. total, batch: the graph's int64 [1] tensors of the attention mask's length and the batch size
    (rewrite_cache_in_place computes them once)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    consumers = _consumers(graph)
    outputs = {v.name for v in graph.output}
    replacements: dict[int, list] = {}  # id(Attention node) -> the nodes in its place
    removed = []
    for attention in [n for n in graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]:
        if len(attention.input) < 4 or len(attention.output) != 1 or _attribute(attention, "is_causal", 0) \
                or _attribute(attention, "softcap", 0.0) or _attribute(attention, "qk_matmul_output_mode", 0):
            continue
        query, present_key, present_value = attention.input[:3]
        rotary_q, scatter_k, scatter_v, pad = (producers.get(name) for name in attention.input[:4])
        if (rotary_q is None or rotary_q.op_type != "RotaryEmbedding" or scatter_k is None
                or scatter_k.op_type != "TensorScatter" or scatter_v is None or scatter_v.op_type != "TensorScatter"
                or pad is None or pad.op_type != "Pad" or not pad.input[0]):
            continue
        rotary_k = producers.get(scatter_k.input[1])
        if rotary_k is None or rotary_k.op_type != "RotaryEmbedding":
            continue
        chains = [_heads_chain(producers, name) for name in (rotary_q.input[0], rotary_k.input[0], scatter_v.input[1])]
        after = consumers.get(attention.output[0], [])
        back = consumers.get(after[0].output[0], []) if len(after) == 1 else []
        if (any(chain is None for chain in chains) or len(after) != 1 or after[0].op_type != "Transpose"
                or _attribute(after[0], "perm") != [0, 2, 1, 3] or len(back) != 1 or back[0].op_type != "Reshape"):
            continue
        # the whole block goes: each tensor inside it is read by the next node of the block alone
        inside = [query, scatter_k.input[1], rotary_q.input[0], rotary_k.input[0], scatter_v.input[1],
                  attention.output[0], after[0].output[0], *(chain[1][0].output[0] for chain in chains)]
        if any(name in outputs or len(consumers.get(name, [])) != 1 for name in inside) \
                or {present_key, present_value} - outputs:
            continue
        if not (_attribute(rotary_q, "num_heads") and _attribute(rotary_k, "num_heads")):
            continue  # (the same op on [B, S, H·Dh] needs num_heads)
        (q, q_nodes), (k, k_nodes), (v, v_nodes) = chains
        flat_rotary = []
        for rotary, source in ((rotary_q, q), (rotary_k, k)):
            node = helper.make_node("RotaryEmbedding", [source, *rotary.input[1:]], [f"{rotary.output[0]}/flat"],
                                    name=f"{rotary.name}/flat")
            node.attribute.extend(rotary.attribute)
            flat_rotary.append(node)
        scale = _attribute(attention, "scale")  # (absent: 1/sqrt(Dh), GroupQueryAttention's default too)
        fused = helper.make_node(
            "GroupQueryAttention",
            [flat_rotary[0].output[0], flat_rotary[1].output[0], v, scatter_k.input[0], scatter_v.input[0],
             f"{GQA_PREFIX}/seqlens_k", f"{GQA_PREFIX}/total", "", "", "", pad.input[0]],
            [back[0].output[0], present_key, present_value], name=f"{attention.name}/GroupQueryAttention",
            domain=MICROSOFT,
            num_heads=_attribute(rotary_q, "num_heads"), kv_num_heads=_attribute(rotary_k, "num_heads"),
        )
        if scale is not None:
            fused.attribute.append(helper.make_attribute("scale", scale))
        replacements[id(attention)] = [*flat_rotary, fused]
        removed += [rotary_q, rotary_k, scatter_k, scatter_v, after[0], back[0], *q_nodes, *k_nodes, *v_nodes]
    if not replacements:
        return 0
    # Shared: seqlens_k [B] int32 = total - 1 (every row: left-padded prompts fill the cache alike), total int32 []
    one = numpy_helper.from_array(np.array([1], np.int64), f"{GQA_PREFIX}/one")
    graph.initializer.append(one)
    shared = [
        helper.make_node("Sub", [total, one.name], [f"{GQA_PREFIX}/last"], name=f"{GQA_PREFIX}/last"),
        helper.make_node("Expand", [f"{GQA_PREFIX}/last", batch], [f"{GQA_PREFIX}/last_per_row"],
                         name=f"{GQA_PREFIX}/last_per_row"),
        helper.make_node("Cast", [f"{GQA_PREFIX}/last_per_row"], [f"{GQA_PREFIX}/seqlens_k"], name=f"{GQA_PREFIX}/seqlens_k",
                         to=TensorProto.INT32),
        helper.make_node("Squeeze", [total], [f"{GQA_PREFIX}/total_int64"], name=f"{GQA_PREFIX}/total_int64"),
        helper.make_node("Cast", [f"{GQA_PREFIX}/total_int64"], [f"{GQA_PREFIX}/total"], name=f"{GQA_PREFIX}/total",
                         to=TensorProto.INT32),
    ]
    removed_ids = {id(n) for n in removed}
    nodes = []
    for node in graph.node:
        if id(node) in removed_ids:
            continue
        nodes.extend(replacements.get(id(node), [node]))
    position = max(i for i, n in enumerate(nodes) for o in n.output if o in (total, batch)) + 1
    nodes[position:position] = shared
    del graph.node[:]
    graph.node.extend(nodes)
    remove_dead_nodes(graph)
    if not any(o.domain == MICROSOFT for o in model.opset_import):
        model.opset_import.append(_microsoft_opset())
    return len(replacements)


HEAD_MAJOR_OPS = {"RotaryEmbedding", "TensorScatter", "Attention"}  # ops that read [B, H, S, Dh]


def split_heads_once(model) -> int:
    """After pack_sibling_matmuls: the packed q|k|v projection is split into heads once, not per tensor.

        qkv [B, S, (Hq+2Hkv)·Dh] ─Split─► q, k, v ─(each) Reshape [B, S, H, Dh] ─► Transpose(0, 2, 1, 3)
    ->  qkv ─Reshape [B, S, Hq+2Hkv, Dh] ─► Transpose(0, 2, 1, 3) ─► Split(axis 1: Hq, Hkv, Hkv)

    (the same values, moved once: 3 nodes a layer instead of 7). Dh is the cache inputs' last axis. Returns the
    number of Splits rewritten; a Split whose outputs do not each go Reshape -> Transpose -> an op reading
    [B, H, S, Dh] stays as it is."""
    from onnx import helper, numpy_helper

    graph = model.graph
    cache = next((v for v in graph.input if v.name.startswith("past_")), None)
    if cache is None or not cache.type.tensor_type.shape.dim[3].HasField("dim_value"):
        return 0
    head_dim = cache.type.tensor_type.shape.dim[3].dim_value
    consumers = _consumers(graph)
    outputs = {v.name for v in graph.output}
    initializers = {t.name: t for t in graph.initializer}
    shape = numpy_helper.from_array(np.array([0, 0, -1, head_dim], np.int64), "/llm/cpu/heads_shape")
    rewritten = 0
    for split in [n for n in graph.node if n.op_type == "Split" and n.name.endswith("/packed/split")]:
        chains = []
        for output in split.output:
            reshape = consumers.get(output, [])
            transpose = consumers.get(reshape[0].output[0], []) if len(reshape) == 1 else []
            if (len(reshape) != 1 or reshape[0].op_type != "Reshape" or len(transpose) != 1
                    or transpose[0].op_type != "Transpose" or _attribute(transpose[0], "perm") != [0, 2, 1, 3]
                    or output in outputs or reshape[0].output[0] in outputs
                    or not all(c.op_type in HEAD_MAJOR_OPS for c in consumers.get(transpose[0].output[0], []))):
                break
            chains.append((reshape[0], transpose[0]))
        widths = numpy_helper.to_array(initializers[split.input[1]]) if split.input[1] in initializers else None
        if len(chains) != len(split.output) or widths is None or any(w % head_dim for w in widths):
            continue
        name = split.name.removesuffix("/split")
        heads = numpy_helper.from_array(widths // head_dim, f"{name}/heads")
        graph.initializer.append(heads)
        replacement = [
            helper.make_node("Reshape", [split.input[0], shape.name], [f"{name}/heads_4d"], name=f"{name}/heads_4d"),
            helper.make_node("Transpose", [f"{name}/heads_4d"], [f"{name}/heads_first"], name=f"{name}/heads_first",
                             perm=[0, 2, 1, 3]),
            helper.make_node("Split", [f"{name}/heads_first", heads.name], [t.output[0] for _, t in chains],
                             name=f"{name}/split_heads", axis=1),
        ]
        position = list(graph.node).index(split)
        for node in [split, *(n for chain in chains for n in chain)]:
            graph.node.remove(node)
        for node in reversed(replacement):
            graph.node.insert(position, node)
        rewritten += 1
    if rewritten:
        graph.initializer.append(shape)
        remove_dead_nodes(graph)
    return rewritten


def remove_dead_nodes(graph) -> None:
    """Drop nodes none of whose outputs is read (the shape computations of removed Reshapes), repeatedly."""
    outputs = {v.name for v in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    _drop_unused_initializers(graph, {t.name for t in graph.initializer})


LM_HEAD_PART_BYTES = 64 * 1024 * 1024  # the largest slice of the LM head's weight loaded in one piece


def split_lm_head(model, part_bytes: int = LM_HEAD_PART_BYTES) -> int:
    """The float LM head (Gemm or MatMul writing `logits`, a constant weight) -> one node per vocabulary slice of
    at most part_bytes of weight, and a Concat of their logits on the last axis; returns the number of slices
    (0: left as it is). Why: onnxruntime prepacks each constant MatMul weight at load, holding the file's copy
    and the packed copy of that weight at once, so the session's peak memory is its steady size plus the
    largest single weight. At Qwen2's vocabulary that weight is the LM head (151936 x 896 fp32 = 519 MiB: peak
    2461 MiB against 1942 steady); in slices of 64 MiB the peak is the steady size. The slices read the same
    bytes and give the same logits (each column of a product depends on its own weight column only)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    head = next((n for n in graph.node if "logits" in n.output), None)
    if head is None or head.op_type not in ("Gemm", "MatMul") or head.input[1] not in initializers:
        return 0
    if len(head.input) > 2 and head.input[2]:
        return 0  # a bias would be sliced too; no LM head we export has one
    weight_proto = initializers[head.input[1]]
    weight = numpy_helper.to_array(weight_proto)
    vocab_axis = 0 if head.op_type == "Gemm" and _attribute(head, "transB", 0) else 1  # [N, K] or [K, N]
    parts = -(-weight.nbytes // part_bytes)
    if weight.ndim != 2 or parts < 2:
        return 0
    bounds = np.linspace(0, weight.shape[vocab_axis], parts + 1).astype(int)
    part_outputs, new_nodes = [], []
    for index, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        piece = weight[begin:end] if vocab_axis == 0 else weight[:, begin:end]
        name = f"{head.input[1]}/part_{index}"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(piece), name))
        part_outputs.append(f"{head.output[0]}/part_{index}")
        part = helper.make_node(head.op_type, [head.input[0], name], [part_outputs[-1]], name=f"{head.name}/part_{index}")
        part.attribute.extend(head.attribute)
        new_nodes.append(part)
    new_nodes.append(helper.make_node("Concat", part_outputs, list(head.output), name=f"{head.name}/concat", axis=-1))
    position = list(graph.node).index(head)
    graph.node.remove(head)
    for offset, node in enumerate(new_nodes):
        graph.node.insert(position + offset, node)
    graph.initializer.remove(weight_proto)
    return parts
