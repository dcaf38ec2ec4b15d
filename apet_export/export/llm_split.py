"""torch -> llm_a.onnx + stage2.onnx + llm_b.onnx: the decoder split at layer K with ApET stage 2 between.

    inputs_embeds [B, L1, H] ─► llm_a.onnx: layers [0, K) ─► hidden_states [B, L1, H]     (+ KV of layers < K)
        │                                                        │
        │   stage2.onnx (prefill only, once per image span):    ▼
        │   hidden_states, image_start, image_length, keep ─► compressed_states [B, L2, H]
        │       prefix [0, start) │ ApET(span [start, start+length)) → keep rows │ suffix [start+length, L1)
        ▼                                                        ▼
    llm_b.onnx: layers [K, L), norm, head ─► logits [B, V]                             (+ KV of layers >= K)

L2 = L1 - length + keep. Positions (as in the released code): llm_a sees 0..L1-1 in prefill, llm_b the
contiguous 0..L2-1; decode step j feeds position L1+j to llm_a and L2+j to llm_b, each part with an
attention mask as long as its own cache (runtime/two_stage.py does that bookkeeping).

Why ApET stage 2 is a graph of its own rather than the head of llm_b: llm_b runs every decode step, where
there is no image span (S = 1), so ApET inside it would need an `If` on the step kind (TensorRT builds
each branch and keeps no fused kernels across it) or would run on a dummy span at every token. As a
separate graph it runs once per image span at prefill, llm_a/llm_b keep exactly the form of llm.onnx
(same exporter, fused attention, KV I/O and TensorRT profile conventions), several images are one call
per span, and the stage is compressed with the same rank_and_merge / apet_scores as vision.onnx (with the
variant's LLM-stage slot rule: the released code puts the basis into the top-k list's last M slots).

The parts come from llm.py's one decoder exporter (layers [0, K) and [K, L); llm.onnx is [0, L)), so they
follow llm_io's naming: past_key_i / present_key_i with i the global layer index, M-RoPE position_ids where
the family has them, and the axes batch, sequence, past_sequence, total_sequence (each part's own lengths).
The stage-2 graph names its axes batch, sequence, keep, image_sequence (the span length) and
compressed_sequence (L2).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from apet_export.compat import quiet_export
from apet_export.compression.apet import apet_scores, rank_and_merge, stage_rule
from apet_export.config import ApetConfig, ArtifactSpec, TensorSpec
from apet_export.errors import ExportError, InvalidInputError
from apet_export.export.llm import export_decoder_range, export_llm_artifacts
from apet_export.export.onnx_graph import finish_and_save
from apet_export.export.vision import sort_stable_translation

PART_FILES = {"llm_a": "llm_a.onnx", "stage2": "stage2.onnx", "llm_b": "llm_b.onnx"}


def check_stage2_layer(layer: int, num_layers: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= num_layers - 1:
        raise InvalidInputError(
            f"--stage2-layer {layer!r} is outside [1, {num_layers - 1}]: the decoder has {num_layers} layers and "
            f"both parts need at least one (the paper uses the middle layer, {num_layers // 2})"
        )
    return layer


class Stage2Graph(nn.Module):
    """The traced module of stage2.onnx: ApET on one image span of the hidden states (module docstring)."""

    def __init__(self, config: ApetConfig):
        super().__init__()
        self.config = config

    def forward(self, hidden_states, image_start, image_length, keep):
        start, length, budget = image_start.item(), image_length.item(), keep.item()
        num_basis = self.config.num_basis
        torch._check(start >= 0)
        torch._check(length > num_basis)
        torch._check(start + length <= hidden_states.shape[1])
        torch._check(budget > num_basis)
        torch._check(budget <= length)
        span = hidden_states[:, start : start + length].float()  # [B, N, H], ApET in fp32 as in vision.onnx
        scores, basis_index, basis = apet_scores(span, self.config)  # [B, N]
        # the variant's LLM-stage rule (released LLaVA code: basis into the top-k list's last M slots)
        rule = stage_rule(self.config.variant, 2)
        tokens, index = rank_and_merge(span, scores, basis, budget, rule, basis_index)  # [B, T, H], [B, T] (span-relative)
        compressed = torch.cat(
            [hidden_states[:, :start], tokens.to(hidden_states.dtype), hidden_states[:, start + length :]], dim=1
        )  # [B, L1 - N + T, H]
        return compressed, index, scores


def stage2_io(hidden: int, dtype: str):
    inputs = [
        TensorSpec("hidden_states", dtype, ("batch", "sequence", hidden)),
        TensorSpec("image_start", "int64", ()),
        TensorSpec("image_length", "int64", ()),
        TensorSpec("keep", "int64", ()),
    ]
    outputs = [
        TensorSpec("compressed_states", dtype, ("batch", "compressed_sequence", hidden)),
        TensorSpec("keep_index", "int64", ("batch", "keep")),
        TensorSpec("scores", "float32", ("batch", "image_sequence")),
    ]
    return inputs, outputs


def export_stage2(config: ApetConfig, hidden: int, path: Path, dtype: torch.dtype, opset: int):
    if config.selection == "random":
        raise InvalidInputError("selection 'random' cannot be exported (its generator runs in Python at trace time): use fps or dpc")
    inputs, outputs = stage2_io(hidden, "float16" if dtype == torch.float16 else "float32")
    length = 3 * config.num_basis + 4  # any span in range: start, length and keep are graph inputs
    example = (
        torch.randn(2, length + 7, hidden, dtype=dtype), torch.tensor(3), torch.tensor(length),
        torch.tensor(config.num_basis + 2),
    )
    dynamic = {"hidden_states": {0: torch.export.Dim("batch", max=1024), 1: torch.export.Dim("sequence", max=65536)},
               "image_start": None, "image_length": None, "keep": None}
    try:
        with torch.no_grad(), quiet_export():
            program = torch.onnx.export(
                Stage2Graph(config).eval(), example, dynamo=True, opset_version=opset,
                input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
                dynamic_shapes=dynamic, custom_translation_table={torch.ops.aten.sort.stable: sort_stable_translation},
            )
    except Exception as error:
        raise ExportError(f"exporting the ApET stage-2 graph failed: {error}") from error
    finish_and_save(program.model_proto, path, "/stage2", inputs, outputs)
    return inputs, outputs


def export_split_llm_artifacts(model, family, out_dir: Path, manifest, precision: str, layer: int) -> None:
    """Write llm_a.onnx, stage2.onnx and llm_b.onnx (split at `layer`) and record them in the manifest,
    with the embedding table and the LLM dims exactly as the one-graph build writes them."""
    export_llm_artifacts(model, family, out_dir, manifest, precision, write_graph=False)
    language_model = family.language_model(model)
    config = language_model.config
    num_layers = len(language_model.layers)
    check_stage2_layer(layer, num_layers)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    for name, layers in (("llm_a", range(0, layer)), ("llm_b", range(layer, num_layers))):
        export_decoder_range(model, family, layers, out_dir, name, manifest, precision)
    inputs, outputs = export_stage2(manifest.compression, config.hidden_size, out_dir / PART_FILES["stage2"], dtype, manifest.opset)
    manifest.files["stage2"] = ArtifactSpec(PART_FILES["stage2"], tuple(inputs), tuple(outputs))
    # the runtime reads "layer"; the rest documents the build (budgets: compression/budget.py)
    manifest.stage2 = {"layer": layer, "num_layers": num_layers, "budget_split": "3:1", "files": ["llm_a", "stage2", "llm_b"]}

