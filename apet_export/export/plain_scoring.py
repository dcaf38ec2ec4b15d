"""vision.onnx from vision.plugin.onnx: the one ApetScore node replaced by ApET scoring in standard ONNX ops.

The two vision graphs differ only in that node (FPS basis selection + ridge approximation error), so the
vision tower, the rest of ApET and the projector are traced once, with the plugin op, and vision.onnx gets
the standard-op scoring traced on its own from a module of the scoring alone:

    vision.plugin.onnx:  ... features ─► ApetScore ─► scores [B, N], basis_index [B, M] ─► rank and merge ...
    scoring.onnx:        x [B, N, D] ─► apet_scores(x) (FPS + ridge, standard ops) ─► scores, basis_index
    vision.onnx:         ... features ─► the scoring.onnx nodes (/vision/apet/score/...) ─► rank and merge ...

Tracing the tower a second time was most of the second graph's export (650 s of a 1730 s CLIP-L build).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from apet_export.artifacts import load_onnx
from apet_export.compression import ApetConfig
from apet_export.compression.apet import apet_scores
from apet_export.errors import ExportError

SCOPE = "/vision/apet/score"  # the names of the spliced nodes: where they came from (ApET stage 1's scoring)


class ApetScoring(nn.Module):
    """What the ApetScore node computes, as the library's eager code (the plugin's reference kernel too):
    x [B, N, D] fp32 -> (scores [B, N] fp32, basis_index [B, M] int64)."""

    def __init__(self, config: ApetConfig):
        super().__init__()
        self.config = config

    def forward(self, x):
        scores, basis_index, _ = apet_scores(x, self.config)
        return scores, basis_index


def scoring_input_shape(plugin_graph, op_type: str, domain: str) -> list[int | None]:
    """The shape of the ApetScore node's input x [B, N, D] as the plugin graph records it: sizes, None for a
    dynamic axis (e.g. [None, 576, 64]: batch dynamic, N and D fixed by the model)."""
    node = apet_score_node(plugin_graph, op_type, domain)[1]
    typed = {v.name: v for v in (*plugin_graph.graph.value_info, *plugin_graph.graph.input)}.get(node.input[0])
    dims = typed.type.tensor_type.shape.dim if typed is not None else []
    if len(dims) != 3:
        raise ExportError(f"the plugin vision graph does not record the shape of {op_type}'s input [B, N, D]")
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def trace_scoring(config: ApetConfig, shape: list[int | None], opset: int, translations: dict):
    """The scoring graph (ModelProto), I/O named x, scores, basis_index, traced with x of `shape` (as
    scoring_input_shape gives it): the axes dynamic in the vision graph are dynamic here, the others fixed
    to the same sizes, so the scoring is specialised exactly as it is inside the vision graph."""
    from apet_export.compat import quiet_export

    examples = (2, 2 * config.num_basis + 3, 8)  # for a dynamic axis: any size that is not 0 or 1, N > M
    example = torch.randn(*(size or fallback for size, fallback in zip(shape, examples, strict=True)))
    dynamic = {axis: torch.export.Dim.DYNAMIC for axis, size in enumerate(shape) if size is None}
    with torch.no_grad(), quiet_export():
        program = torch.onnx.export(
            ApetScoring(config).eval(), (example,), dynamo=True, opset_version=opset,
            input_names=["x"], output_names=["scores", "basis_index"],
            dynamic_shapes={"x": dynamic}, custom_translation_table=translations, verbose=False,
        )
    return program.model_proto


def apet_score_node(graph, op_type: str, domain: str):
    """(position, node) of the graph's one `domain::op_type` node."""
    found = [(i, node) for i, node in enumerate(graph.graph.node) if node.op_type == op_type and node.domain == domain]
    if len(found) != 1:
        raise ExportError(f"the plugin vision graph has {len(found)} {domain}::{op_type} nodes, expected one")
    return found[0]


def replace_apet_score(plugin_graph, scoring, op_type: str, domain: str):
    """A copy of plugin_graph (ModelProto) whose one `domain::op_type` node is replaced by the nodes of
    `scoring` (inputs x -> the node's input, outputs scores, basis_index -> the node's outputs). The scoring
    graph's other names get a prefix, so they cannot meet the plugin graph's."""
    import onnx
    from onnx import compose

    from apet_export.export.onnx_graph import rename_nodes_by_scope

    position, node = apet_score_node(plugin_graph, op_type, domain)
    rename_nodes_by_scope(scoring, SCOPE)
    scoring = compose.add_prefix(scoring, "apet_score/", rename_nodes=False, rename_functions=False)
    outside = {"apet_score/x": node.input[0], "apet_score/scores": node.output[0],
               "apet_score/basis_index": node.output[1]}
    for inner in scoring.graph.node:
        inner.input[:] = [outside.get(name, name) for name in inner.input]
        inner.output[:] = [outside.get(name, name) for name in inner.output]
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in scoring.graph.node
           for a in n.attribute):
        raise ExportError("the traced ApET scoring graph has subgraphs: only a flat graph can be spliced")

    plain = onnx.ModelProto()
    plain.CopyFrom(plugin_graph)
    nodes = list(plain.graph.node)
    del plain.graph.node[:]
    plain.graph.node.extend(nodes[:position] + list(scoring.graph.node) + nodes[position + 1:])
    plain.graph.initializer.extend(scoring.graph.initializer)
    plain.functions.extend(scoring.functions)
    used = {n.domain for n in plain.graph.node} | {n.domain for f in plain.functions for n in f.node}
    imports = {o.domain: o.version for o in (*plain.opset_import, *scoring.opset_import) if o.domain in used or o.domain in ("", "ai.onnx")}
    del plain.opset_import[:]
    plain.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in imports.items())
    return plain


def write_plain_vision_graph(plugin_path: Path, path: Path, config: ApetConfig, opset: int) -> None:
    """Write vision.onnx (`path`) from the saved vision.plugin.onnx: its ApetScore node replaced by the scoring
    in standard ops, everything else as traced (node names, dynamic axis names, weights)."""
    from apet_export.export.onnx_graph import save_model
    from apet_export.export.vision import sort_stable_translation
    from apet_export.plugins.apet_score import DOMAIN, OP_TYPE

    plugin = load_onnx(plugin_path)
    shape = scoring_input_shape(plugin, OP_TYPE, DOMAIN)
    try:
        scoring = trace_scoring(config, shape, opset, {torch.ops.aten.sort.stable: sort_stable_translation})
    except Exception as error:  # the exporter raises many types; keep the cause attached
        raise ExportError(f"exporting the ApET scoring in standard ops failed: {error}") from error
    save_model(replace_apet_score(plugin, scoring, OP_TYPE, DOMAIN), path)
