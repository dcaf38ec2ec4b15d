"""torch -> vision.onnx: vision tower + ApET stage 1 + projector in one graph, budget as a runtime input.

    pixel_values [B, 3, S, S] ─tower─► features [B, N, Dv] ─apet─► tokens [B, T, Dv], keep_index [B, T]
                                                                 └► scores [B, N]
    tokens ─projector─► image_embeds [B, T, H]          (T = keep, an int64 scalar input, M < T <= N)

Precision fp16 (`build --precision fp16`, what fp16 TensorRT engines need: TensorRT networks are strongly
typed, so the precision lives in the graph): the tower and projector run in fp16, ApET stays fp32 inside
(FPS distances, the ridge system and the scores need its range), and the graph's I/O stay fp32
(pixel_values in, image_embeds out), so runtimes feed and read every build the same way.

Two variants: ApET in standard ONNX ops (vision.onnx), and with FPS + scoring as one ApetScore plugin
node (vision.plugin.onnx). A build traces only the plugin variant and derives vision.onnx from it
(plain_scoring.py); method none / visionzip and dpc selection have no plugin variant and trace vision.onnx
here. The projector is per-token, so projecting the T kept tokens equals project-then-select.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from apet_export.compat import quiet_export
from apet_export.compression import ApetConfig
from apet_export.compression.apet import apet_scores, rank_and_merge, stage_rule
from apet_export.compression.baselines import visionzip_select
from apet_export.compression.tensor_ops import gather_tokens
from apet_export.errors import ExportError, InvalidInputError
from apet_export.export.onnx_graph import finish_and_save
from apet_export.models.base import ModelFamily

EXPORTABLE_METHODS = ("apet", "visionzip", "none")


def budget_floor(method: str, config: ApetConfig) -> int:
    """Budgets must exceed this: M for ApET, 1 for VisionZip (a dominant and a contextual token);
    'none' keeps every token whatever the budget."""
    return {"apet": config.num_basis, "visionzip": 1}.get(method, 0)


def sort_stable_translation(self, stable=None, dim: int = -1, descending: bool = False):
    """aten::sort.stable -> ONNX TopK over the whole axis (TopK keeps the lower index first on ties,
    which is what a stable sort does); onnxscript 0.7 only translates the default overload."""
    from onnxscript import opset23 as op

    axis = dim % len(self.shape)
    return op.TopK(self, op.Shape(self, start=axis, end=axis + 1), axis=axis, largest=int(descending), sorted=1)


class VisionTower(nn.Module):
    def __init__(self, model, family: ModelFamily, with_attention: bool):
        super().__init__()
        self.model, self.family, self.with_attention = model, family, with_attention

    def forward(self, *inputs):  # pixel_values [B, 3, S, S] (+ family inputs) -> [B, N, Dv] (, attention [B, N])
        if self.with_attention:
            return self.family.vision_features_and_attention(self.model, *inputs)
        return self.family.vision_features(self.model, *inputs), None


class ApetStage(nn.Module):
    """features [B, N, Dv], budget T -> (tokens [B, T, Dv] fp32, keep_index [B, T], scores [B, N])."""

    def __init__(self, config: ApetConfig, use_plugin: bool):
        super().__init__()
        if use_plugin and config.selection != "fps":
            raise InvalidInputError(f"the ApetScore plugin implements fps selection, not {config.selection!r}")
        self.config, self.use_plugin = config, use_plugin

    def forward(self, features, keep):
        x = features.float()
        if self.use_plugin:
            from apet_export.plugins.apet_score import apet_score, fps_start_attribute

            scores, basis_index = apet_score(x, self.config.num_basis, self.config.ridge, fps_start_attribute(self.config))
            basis = gather_tokens(x, basis_index)
        else:
            scores, basis_index, basis = apet_scores(x, self.config)
        tokens, index = rank_and_merge(x, scores, basis, keep, stage_rule(self.config.variant, 1), basis_index)
        return tokens, index, scores


class VisionGraph(nn.Module):
    """The module traced into vision.onnx (see the module docstring)."""

    def __init__(
        self, model, family: ModelFamily, method: str, config: ApetConfig, use_plugin: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.dtype = dtype  # of the tower and projector; ApET always computes in fp32
        if method not in EXPORTABLE_METHODS:
            raise InvalidInputError(f"method {method!r} cannot be exported: choose one of {', '.join(EXPORTABLE_METHODS)}")
        if method not in family.exportable_methods:
            raise InvalidInputError(
                f"method {method!r} is not available for the {family.name} family: choose one of "
                f"{', '.join(family.exportable_methods)}"
            )
        self.family, self.method, self.config = family, method, config
        self.model = model  # registered first, so the projector's node names are /vision/multi_modal_projector/...
        self.tower = VisionTower(model, family, with_attention=method == "visionzip")
        self.apet = ApetStage(config, use_plugin)

    def forward(self, *inputs):
        pixel_values, *layout, keep = inputs  # pixel_values (+ the family's layout inputs), budget
        features, attention = self.tower(pixel_values.to(self.dtype), *layout)  # [B, N, Dv], [B, N] for visionzip
        prefix, features = self.family.split_prefix(self.model, features)  # prefix [B, C, Dv] or None
        batch, num_tokens = features.shape[:2]
        budget = keep.item() if isinstance(keep, torch.Tensor) else keep
        if self.method == "none":
            tokens = features
            index = torch.arange(num_tokens, device=features.device).expand(batch, -1)
            scores = torch.zeros(batch, num_tokens, device=features.device)
        else:
            torch._check(budget > budget_floor(self.method, self.config))
            torch._check(budget <= num_tokens)
            if self.method == "apet":
                tokens, index, scores = self.apet(features, budget)
            else:
                scores = attention
                tokens, index = visionzip_select(features.float(), scores, budget)
        embeds = self.family.project(self.model, tokens.to(features.dtype))  # [B, T, H]
        if prefix is not None:  # rows kept whole in front of the compressed ones: [B, C+T, H]
            embeds = torch.cat([self.family.project(self.model, prefix), embeds], dim=1)
        return embeds.float(), index, scores.float()


def export_vision(
    model, family: ModelFamily, method: str, config: ApetConfig, path: Path, *,
    use_plugin: bool = False, opset: int = 23, precision: str = "fp32",
):
    """Trace the vision graph and write it to `path` (ONNX, external data beside it when > 2 GB).
    Returns the graph's (inputs, outputs) specs, as the manifest records them."""
    dtype = torch.float16 if precision == "fp16" else torch.float32
    graph = VisionGraph(model, family, method, config, use_plugin, dtype).eval()
    dims = family.vision_dims(model)
    inputs_spec, outputs_spec = family.vision_io(dims, model)
    example, dynamic, num_tokens = family.export_example(model)
    # any budget in range: it is a graph input, nothing is specialised to it
    keep = torch.tensor(min(num_tokens, max(config.num_basis + 2, num_tokens // 4)))
    translations = {torch.ops.aten.sort.stable: sort_stable_translation}
    if use_plugin:
        from apet_export.plugins.apet_score import apet_score, onnx_translation, register_onnx_schema

        register_onnx_schema()
        translations[apet_score._opoverload] = onnx_translation
    model.to(dtype)  # the model object is shared with the caller: restored once the graph is saved
    try:
        with torch.no_grad(), quiet_export():
            program = torch.onnx.export(
                graph, (*example, keep), dynamo=True, opset_version=opset,
                input_names=[s.name for s in inputs_spec], output_names=[s.name for s in outputs_spec],
                dynamic_shapes={"inputs": (*dynamic, None)},  # forward(*inputs)
                custom_translation_table=translations, verbose=False,
            )
        # the graph's initializers still point at the parameters: save before restoring them to fp32
        finish_and_save(program.model_proto, path, "/vision", inputs_spec, outputs_spec)
    except ExportError:
        raise
    except Exception as error:  # the exporter raises many types; keep the cause attached
        raise ExportError(f"exporting the vision graph ({method}, plugin={use_plugin}) failed: {error}") from error
    finally:
        model.to(torch.float32)
    return inputs_spec, outputs_spec
