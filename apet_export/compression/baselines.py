"""Baselines behind the ApET interface, for comparison only: visionzip, random, pool, none.

Every method is called as  fn(x [B, N, D], keep, config, **aux) -> CompressionOutput.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from apet_export.compression.apet import validate_budget, validate_tokens
from apet_export.compression.tensor_ops import (
    gather_tokens,
    merge_into_targets,
    sort_by_position,
    sort_descending_stable,
)
from apet_export.compression.types import CompressionOutput
from apet_export.config import ApetConfig
from apet_export.errors import InvalidInputError


def _no_basis(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[0], 0, dtype=torch.long, device=x.device)


def cls_attention_from_qk(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Attention the CLS token (position 0) pays to each patch, summed over heads, as VisionZip uses it.

    query, key [B, H, S, Dh] of the selected vision layer (S = 1 + N) -> [B, N]. Only the CLS row of
    the attention is computed: O(S) memory instead of O(S^2).
    """
    logits = query[:, :, :1] @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])  # [B, H, 1, S]
    return logits.softmax(dim=-1)[:, :, 0, 1:].sum(dim=1)


def attention_received(query: torch.Tensor, key: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Mean attention each token receives, for towers without CLS (SigLIP): [B, H, S, Dh] -> [B, S].

    Computed over query chunks so that at most [B, H, chunk, S] is materialised.
    """
    received = torch.zeros(query.shape[0], key.shape[2], dtype=torch.float32, device=query.device)
    scale = 1.0 / math.sqrt(query.shape[-1])
    for start in range(0, query.shape[2], chunk):
        probs = (query[:, :, start : start + chunk].float() @ key.float().transpose(-1, -2) * scale).softmax(-1)
        received += probs.sum(dim=(1, 2))
    return received / query.shape[2]


def visionzip_compress(
    x: torch.Tensor,
    keep: int,
    config: ApetConfig | None = None,
    *,
    cls_attention: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    num_contextual: int | None = None,
) -> CompressionOutput:
    """VisionZip (training-free): dominant tokens by attention + contextual tokens by merging.

    cls_attention [B, N]: the CLS row of the selected layer (cls_attention_from_qk) or, without CLS, the
    mean received attention (attention_received). keys [B, N, Dk]: similarity metric of the merge
    (VisionZip uses the layer's keys); defaults to the tokens. num_contextual defaults to VisionZip's
    split (10 of 64, 20 of 128, 30 of 192).
    """
    validate_tokens(x)
    num_tokens = x.shape[1]
    validate_budget(keep, 0, num_tokens)
    if cls_attention is None or tuple(cls_attention.shape) != tuple(x.shape[:2]):
        raise InvalidInputError(
            "visionzip needs cls_attention of shape [B, N] (the CLS attention row of the vision feature "
            "layer): compute it with cls_attention_from_qk(query, key) or attention_received(query, key)"
        )
    if num_contextual is None:
        num_contextual = max(1, round(keep * 10 / 64)) if keep < num_tokens else 0
    num_contextual = min(num_contextual, keep - 1, num_tokens - keep)
    num_dominant = keep - num_contextual
    xf = x.float()
    metric = (keys if keys is not None else x).float()

    order = sort_descending_stable(cls_attention.float())
    dominant = order[:, :num_dominant]  # [B, Kd]
    remaining = torch.sort(order[:, num_dominant:], dim=-1).values  # [B, N-Kd], ascending position
    tokens, index = gather_tokens(xf, dominant), dominant
    if num_contextual > 0:
        step = max(1, remaining.shape[1] // num_contextual)
        is_target = torch.zeros(remaining.shape[1], dtype=torch.bool)
        is_target[torch.arange(0, step * num_contextual, step)] = True
        targets, sources = remaining[:, is_target], remaining[:, ~is_target]
        contextual = merge_into_targets(
            gather_tokens(xf, targets), gather_tokens(xf, sources),
            gather_tokens(metric, targets), gather_tokens(metric, sources),
        )
        tokens, index = torch.cat([tokens, contextual], 1), torch.cat([index, targets], 1)
    tokens, index = sort_by_position(tokens, index)
    return CompressionOutput(tokens.to(x.dtype), index, cls_attention.float(), _no_basis(x))


def random_compress(x: torch.Tensor, keep: int, config: ApetConfig | None = None, **_) -> CompressionOutput:
    """Keep `keep` random tokens (seeded by config.seed), no merging."""
    validate_tokens(x)
    validate_budget(keep, 0, x.shape[1])
    generator = torch.Generator(device="cpu").manual_seed((config or ApetConfig()).seed)
    scores = torch.rand(x.shape[:2], generator=generator).to(x.device)
    index = torch.sort(sort_descending_stable(scores)[:, :keep], dim=-1).values
    return CompressionOutput(gather_tokens(x, index), index, scores, _no_basis(x))


def pool_compress(x: torch.Tensor, keep: int, config: ApetConfig | None = None, **_) -> CompressionOutput:
    """Uniform average pooling along the token sequence into `keep` bins; index = each bin's centre."""
    validate_tokens(x)
    num_tokens = x.shape[1]
    validate_budget(keep, 0, num_tokens)
    tokens = F.adaptive_avg_pool1d(x.float().transpose(1, 2), keep).transpose(1, 2)
    bins = torch.arange(keep)
    start, end = (bins * num_tokens) // keep, -((-(bins + 1) * num_tokens) // keep)  # adaptive pool bins
    index = ((start + end - 1) // 2).expand(x.shape[0], -1).to(x.device)
    scores = torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device)
    return CompressionOutput(tokens.to(x.dtype), index, scores, _no_basis(x))


def no_compress(x: torch.Tensor, keep: int | None = None, config: ApetConfig | None = None, **_) -> CompressionOutput:
    """Keep every token (the uncompressed reference); `keep` is ignored."""
    validate_tokens(x)
    index = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    return CompressionOutput(x, index, torch.zeros(x.shape[:2], device=x.device), _no_basis(x))
