"""ApET: approximation-error guided token compression (arXiv 2602.19870), batched and exportable.

    x [B, N, D] ──select_basis──► basis S [B, M, D]
         │                           │
         └──approximation_error(x, S)┴──► scores [B, N]
                                           │ sort, largest first
               order[:, :T-M] = R (kept, receive merges)  order[:, T-M:T] = basis slots  order[:, T:] = dropped
                                           │
          merged R ∪ basis features in the slots, in ascending original position ──► tokens [B, T, D], index [B, T]
"""

from __future__ import annotations

import torch

from apet_export.compression.approximation import approximation_error
from apet_export.compression.selection import select_basis
from apet_export.compression.tensor_ops import (
    gather_tokens,
    merge_into_targets,
    sort_by_position,
    sort_descending_stable,
)
from apet_export.compression.types import CompressionOutput
from apet_export.config import ApetConfig
from apet_export.errors import BudgetError, InvalidInputError


def rank_and_merge(x: torch.Tensor, scores: torch.Tensor, basis: torch.Tensor, keep) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `keep` tokens of largest error; x [B, N, D] fp32 -> (tokens [B, T, D], index [B, T]).

    `keep` may be a Python int or a traced symbolic int (the exported graph's runtime budget).
    The M lowest-error kept slots receive the basis features as the released code assigns them
    (`features[mask] = seeds`): slot i in ascending position order gets basis[i] in selection order. Every
    dropped token is averaged into its most similar high-error kept token (similarity to the unmerged
    tokens); basis slots receive no merges.
    """
    num_basis = basis.shape[1]
    order = sort_descending_stable(scores)  # [B, N]
    high = order[:, : keep - num_basis]  # [B, T-M]
    slots = torch.sort(order[:, keep - num_basis : keep], dim=-1).values  # [B, M] ascending position
    dropped = order[:, keep:]  # [B, N-T]

    high_tokens = gather_tokens(x, high)
    dropped_tokens = gather_tokens(x, dropped)
    merged = merge_into_targets(high_tokens, dropped_tokens, high_tokens, dropped_tokens)

    # keep == N is no compression: every slot keeps its own token (tokens == x, as apet_compress returns;
    # the released code is never run at N). Where on a scalar, so the exported graph needs no branch.
    no_compression = torch.full((), keep, device=x.device) == scores.shape[1]
    slot_tokens = torch.where(no_compression, gather_tokens(x, slots), basis)  # [B, M, D]
    tokens = torch.cat([merged, slot_tokens], dim=1)  # [B, T, D]: slots[:, i] holds basis[:, i]
    index = torch.cat([high, slots], dim=1)  # [B, T]
    return sort_by_position(tokens, index)


def apet_scores(x: torch.Tensor, config: ApetConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Basis selection + approximation error on fp32 x [B, N, D] -> (scores [B, N], basis_index, basis)."""
    basis_index, basis = select_basis(x, config.num_basis, config.selection, config.fps_start, config.seed)
    return approximation_error(x, basis, config.ridge), basis_index, basis


def validate_tokens(x: torch.Tensor) -> None:
    """Reject what no compression method can use: wrong rank, empty or integer input."""
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"tokens must be a torch.Tensor [B, N, D], got {type(x).__name__}")
    if x.dim() != 3:
        raise InvalidInputError(f"tokens must have shape [B, N, D] (rank 3), got rank {x.dim()} {tuple(x.shape)}")
    if x.numel() == 0:
        raise InvalidInputError(f"tokens are empty (shape {tuple(x.shape)}): need B, N, D >= 1")
    if not x.is_floating_point():
        raise InvalidInputError(f"tokens must be floating point, got {x.dtype}")


def check_finite(values: torch.Tensor) -> None:
    if not torch.isfinite(values).all():
        raise InvalidInputError("tokens contain NaN or Inf: check the upstream model output (fp16 overflow?)")


def validate_budget(keep, num_basis: int, num_tokens: int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise InvalidInputError(f"keep must be an int, got {keep!r}")
    if not num_basis < keep <= num_tokens:
        raise BudgetError(keep, num_basis, num_tokens)
    return keep


def apet_compress(x: torch.Tensor, keep: int, config: ApetConfig | None = None) -> CompressionOutput:
    """Compress x [B, N, D] to `keep` tokens with ApET. See the module docstring for the data flow."""
    config = config or ApetConfig()
    validate_tokens(x)
    num_tokens = x.shape[1]
    if config.num_basis > num_tokens:
        raise InvalidInputError(
            f"num_basis={config.num_basis} exceeds the {num_tokens} input tokens: lower num_basis"
        )
    if isinstance(config.fps_start, int) and config.fps_start >= num_tokens:
        raise InvalidInputError(f"fps_start={config.fps_start} is not a token index (N={num_tokens})")
    validate_budget(keep, config.num_basis, num_tokens)

    xf = x.float()
    scores, basis_index, basis = apet_scores(xf, config)
    check_finite(scores)  # a NaN/Inf anywhere in token n reaches score n: cheaper than scanning x
    if keep == num_tokens:
        index = torch.arange(num_tokens, device=x.device).expand(x.shape[0], -1)
        return CompressionOutput(x, index, scores, basis_index)
    tokens, index = rank_and_merge(xf, scores, basis, keep)
    return CompressionOutput(tokens.to(x.dtype), index, scores, basis_index)
