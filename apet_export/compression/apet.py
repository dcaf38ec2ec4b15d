"""ApET: approximation-error guided token compression (arXiv 2602.19870), batched and exportable.

    x [B, N, D] ──select_basis──► basis S [B, M, D]
         │                           │
         └──approximation_error(x, S)┴──► scores [B, N]
                                           │ sort, largest first
               order[:, :T-M] = R (kept, receive merges)  order[:, T-M:T] = basis slots  order[:, T:] = dropped
                                           │
          merged R ∪ basis features in the slots, in ascending original position ──► tokens [B, T, D], index [B, T]

Where the basis features go differs between the authors' released code paths (one slot rule each):

    position_slots  slot i of the M lowest-error kept slots, counted in ascending position, gets basis[i]
                    (their LLaVA vision stage: `features[mask] = seeds`)
    topk_slots      slot keep[T-M+i] (top-k, descending error order) gets basis[i]
                    (their LLM stage: `image_embeds[errors_indices[-k:]] = seed_features`)
    blend_slots     as position_slots, but the slot gets 0.5 * basis[i] + 0.5 * its own token
                    (their Qwen2.5-VL code)
    append_basis    rows = the T-M highest-error tokens in top-k order, each merged with all N-(T-M) others,
                    then the M basis features in selection order (their Video-LLaVA `encode_videos`);
                    index is then the position each row stands for, not ascending

A variant (ApetConfig.variant) names the rule of each stage: VARIANT_RULES.
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

SLOT_RULES: tuple[str, ...] = ("position_slots", "topk_slots", "blend_slots", "append_basis")
# variant -> (stage-1 rule, stage-2 rule or None where the released code has no LLM stage for it)
VARIANT_RULES: dict[str, tuple[str, str | None]] = {
    "uniform": ("position_slots", "position_slots"),  # one rule everywhere (the LLaVA vision stage's)
    "llava": ("position_slots", "topk_slots"),  # LLaVA / LLaVA-NeXT: vision stage + LLM stage (layer_prune)
    "qwen2_5_vl": ("blend_slots", None),  # qwen2_5_vl_custom.py; its LLM stage is commented out
    "video_llava": ("append_basis", None),  # llava_arch.py encode_videos; single stage
}


def stage_rule(variant: str, stage: int) -> str:
    """The slot rule of ApET stage 1 (vision) or 2 (LLM) in this variant."""
    if stage not in (1, 2):
        raise InvalidInputError(f"ApET stage must be 1 (vision) or 2 (LLM hidden states), got {stage!r}")
    rule = VARIANT_RULES[variant][stage - 1]
    if rule is None:
        raise InvalidInputError(
            f"the ApET variant {variant!r} has no LLM stage (the released code runs one stage for it): "
            f"use stage 1 only, or the variant 'uniform'"
        )
    return rule


def rank_and_merge(
    x: torch.Tensor, scores: torch.Tensor, basis: torch.Tensor, keep, rule: str = "position_slots",
    basis_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `keep` tokens of largest error; x [B, N, D] fp32 -> (tokens [B, T, D], index [B, T]).

    `keep` may be a Python int or a traced symbolic int (the exported graph's runtime budget). `rule` places
    the basis features (module docstring); basis_index [B, M] is needed by append_basis only. Every dropped
    token is averaged into its most similar high-error kept token (similarity to the unmerged tokens);
    basis slots receive no merges.
    """
    if rule not in SLOT_RULES:
        raise InvalidInputError(f"ApET slot rule must be one of {', '.join(SLOT_RULES)}, got {rule!r}")
    num_basis = basis.shape[1]
    order = sort_descending_stable(scores)  # [B, N]
    # keep == N is no compression: every row keeps its own token (tokens == x, as apet_compress returns;
    # the released code is never run at N). Where on a scalar, so the exported graph needs no branch.
    no_compression = torch.full((), keep, device=x.device) == scores.shape[1]
    if rule == "append_basis":
        return append_basis(x, order, basis, basis_index, keep, no_compression)
    high = order[:, : keep - num_basis]  # [B, T-M]
    slots = order[:, keep - num_basis : keep]  # [B, M] top-k (descending error) order
    if rule != "topk_slots":
        slots = torch.sort(slots, dim=-1).values  # [B, M] ascending position
    dropped = order[:, keep:]  # [B, N-T]

    high_tokens = gather_tokens(x, high)
    dropped_tokens = gather_tokens(x, dropped)
    merged = merge_into_targets(high_tokens, dropped_tokens, high_tokens, dropped_tokens)

    own = gather_tokens(x, slots)  # [B, M, D]
    placed = 0.5 * basis + 0.5 * own if rule == "blend_slots" else basis
    slot_tokens = torch.where(no_compression, own, placed)  # [B, M, D]
    tokens = torch.cat([merged, slot_tokens], dim=1)  # [B, T, D]: slots[:, i] holds basis[:, i]
    index = torch.cat([high, slots], dim=1)  # [B, T]
    return sort_by_position(tokens, index)


def append_basis(x, order, basis, basis_index, keep, no_compression) -> tuple[torch.Tensor, torch.Tensor]:
    """The append_basis rule: (tokens [B, T, D], index [B, T]) = [T-M merged high-error tokens in top-k
    order ‖ the M basis features in selection order]; index holds each row's position (the basis rows:
    basis_index). At keep == N every token once, in ascending position (the identity, as apet_compress)."""
    if basis_index is None:
        raise InvalidInputError("the append_basis rule needs basis_index (the positions of the basis rows)")
    num_basis = basis.shape[1]
    high = order[:, : keep - num_basis]  # [B, T-M]
    others = order[:, keep - num_basis :]  # [B, N-(T-M)]: the next M by error included
    high_tokens = gather_tokens(x, high)
    other_tokens = gather_tokens(x, others)
    merged = merge_into_targets(high_tokens, other_tokens, high_tokens, other_tokens)  # [B, T-M, D]
    merged = torch.where(no_compression, high_tokens, merged)
    lowest = order[:, keep - num_basis : keep]  # [B, M]: at keep == N the rest of the tokens
    tail = torch.where(no_compression, gather_tokens(x, lowest), basis)  # [B, M, D]
    tail_index = torch.where(no_compression, lowest, basis_index)
    tokens = torch.cat([merged, tail], dim=1)  # [B, T, D]
    index = torch.cat([high, tail_index], dim=1)  # [B, T]
    rows = torch.arange(index.shape[1], device=x.device).expand_as(index)  # [B, T]
    rows = torch.where(no_compression, torch.argsort(index, dim=-1), rows)
    return gather_tokens(tokens, rows), torch.gather(index, 1, rows)


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


def apet_compress(x: torch.Tensor, keep: int, config: ApetConfig | None = None, stage: int = 1) -> CompressionOutput:
    """Compress x [B, N, D] to `keep` tokens with ApET. See the module docstring for the data flow.
    stage: 1 (vision) or 2 (LLM hidden states): which of the variant's slot rules applies."""
    config = config or ApetConfig()
    rule = stage_rule(config.variant, stage)
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
    tokens, index = rank_and_merge(xf, scores, basis, keep, rule, basis_index)
    return CompressionOutput(tokens.to(x.dtype), index, scores, basis_index)
