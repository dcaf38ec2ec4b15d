"""Small batched tensor helpers shared by the compression methods. All export to plain ONNX ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], index [B, K] int64 -> x[b, index[b, k]] as [B, K, D]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def sort_descending_stable(scores: torch.Tensor) -> torch.Tensor:
    """Indices [B, N] of scores [B, N], largest first; ties keep the lower index first.

    The tie rule matches ONNX TopK (lower index first), so eager and exported rankings agree
    even on tokens with equal scores (duplicate patches).
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def merge_into_targets(
    targets: torch.Tensor, sources: torch.Tensor, targets_metric: torch.Tensor, sources_metric: torch.Tensor
) -> torch.Tensor:
    """Average every source token into its most similar target token (cosine similarity of the metrics).

    targets [B, R, D], sources [B, S, D], metrics [B, R, Dm] / [B, S, Dm] -> merged targets [B, R, D]:
    target r becomes (x_r + sum of its sources) / (1 + number of its sources). Similarities are taken
    against the unmerged targets, so the order of sources does not matter.

    One zero source of weight 0 is prepended so that no tensor is ever empty when S = 0 (keep = N):
    onnxruntime 1.31's CPU reductions return unreduced shapes on empty inputs.
    """
    batch = sources.shape[0]
    sources = torch.cat([sources.new_zeros(batch, 1, sources.shape[2]), sources], dim=1)  # [B, 1+S, D]
    sources_metric = torch.cat([sources_metric.new_zeros(batch, 1, sources_metric.shape[2]), sources_metric], dim=1)
    weight = torch.cat([sources.new_zeros(batch, 1), sources.new_ones(batch, sources.shape[1] - 1)], dim=1)

    similarity = F.normalize(sources_metric, dim=-1) @ F.normalize(targets_metric, dim=-1).transpose(1, 2)
    assign = similarity.argmax(dim=-1)  # [B, 1+S] index into R
    membership = one_hot_rows(assign, targets.shape[1], sources.dtype) * weight[..., None]  # [B, 1+S, R]
    sums = targets + membership.transpose(1, 2) @ sources  # [B, R, D]
    counts = 1 + membership.sum(dim=1)  # [B, R]
    return sums / counts.unsqueeze(-1)


def one_hot_rows(index: torch.Tensor, width, dtype: torch.dtype) -> torch.Tensor:
    """index [B, S] int64 in [0, width) -> one-hot [B, S, width] of `dtype`.

    Grouped sums are written as one-hot matmuls rather than scatter_add: TensorRT's ONNX parser does not
    import ScatterElements with a reduction, and a matmul is one fused kernel on every backend.
    """
    columns = torch.arange(width, device=index.device)  # [width]
    return (index.unsqueeze(-1) == columns).to(dtype)


def sort_by_position(tokens: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder tokens [B, T, D] and their original positions index [B, T] to ascending position."""
    order = torch.argsort(index, dim=-1)
    return gather_tokens(tokens, order), torch.gather(index, 1, order)
