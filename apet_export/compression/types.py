"""The result every compression method returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompressionOutput:
    tokens: torch.Tensor  # [B, T, D], dtype of the input
    index: torch.Tensor  # [B, T] int64, the original position of each row: ascending, except
    # where the variant orders rows otherwise (append_basis: top-k order, then the basis rows)
    scores: torch.Tensor  # [B, N] float32: ApET approximation errors, or the method's ranking score
    basis_index: torch.Tensor  # [B, M] int64 in selection order ([B, 0] for methods without a basis)
