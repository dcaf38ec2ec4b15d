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
    (VisionZip uses the layer's keys); defaults to the tokens. num_contextual (at least 1) defaults to
    VisionZip's split (10 of 64, 20 of 128, 30 of 192).
    """
    validate_tokens(x)
    validate_budget(keep, 1, x.shape[1])  # at least one dominant and one contextual token
    if cls_attention is None or tuple(cls_attention.shape) != tuple(x.shape[:2]):
        raise InvalidInputError(
            "visionzip needs cls_attention of shape [B, N] (the CLS attention row of the vision feature "
            "layer): compute it with cls_attention_from_qk(query, key) or attention_received(query, key)"
        )
    tokens, index = visionzip_select(x.float(), cls_attention.float(), keep, keys, num_contextual)
    return CompressionOutput(tokens.to(x.dtype), index, cls_attention.float(), _no_basis(x))


def visionzip_select(
    x: torch.Tensor, attention: torch.Tensor, keep, keys: torch.Tensor | None = None, num_contextual=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exportable core of VisionZip: x [B, N, D] fp32, attention [B, N] -> (tokens [B, T, D], index [B, T]).

    `keep` may be a traced symbolic int. Contextual targets are every step-th remaining token in position
    order (VisionZip's uniform split), found by sorting instead of boolean indexing so shapes stay static.
    """
    num_tokens = x.shape[1]
    if num_contextual is None:  # round(keep * 10 / 64)
        num_contextual = (5 * keep + 16) // 32
    # At least one contextual target, so no tensor is empty (at keep = N it just merges nothing).
    num_contextual = torch.sym_min(torch.sym_max(num_contextual, 1), keep - 1)
    num_dominant = keep - num_contextual
    metric = keys.float() if keys is not None else x

    order = sort_descending_stable(attention)
    dominant = order[:, :num_dominant]  # [B, Kd]
    remaining = torch.sort(order[:, num_dominant:], dim=-1).values  # [B, N-Kd], ascending position
    step = torch.sym_max((num_tokens - num_dominant) // num_contextual, 1)
    rank = torch.arange(remaining.shape[1], device=x.device)
    step = rank.new_full((), step)  # a tensor: the exporter cannot take a symbolic int in remainder
    is_target = (rank % step == 0) & (rank < step * num_contextual)  # [N-Kd]
    split = sort_descending_stable(is_target.float().expand(remaining.shape[0], -1))  # targets first
    targets = torch.gather(remaining, 1, split[:, :num_contextual])  # [B, Kc]
    sources = torch.gather(remaining, 1, split[:, num_contextual:])  # [B, N-Kd-Kc]
    contextual = merge_into_targets(
        gather_tokens(x, targets), gather_tokens(x, sources),
        gather_tokens(metric, targets), gather_tokens(metric, sources),
    )
    tokens = torch.cat([gather_tokens(x, dominant), contextual], 1)
    return sort_by_position(tokens, torch.cat([dominant, targets], 1))


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
