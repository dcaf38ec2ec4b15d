"""Approximation error of every token against the basis, in a form that exports to ONNX / TensorRT.

The released ApET code solves the ridge system  C = solve(S S^T + lambda I, S X^T)^T  and scores each
token by ||x - C S||_2. torch.linalg.solve has no ONNX equivalent, so we compute the same residual by
projection:

    ridge least squares  min_c ||x - S^T c||^2 + lambda ||c||^2
  = least squares of [x; 0] on the rows of  A = [S | sqrt(lambda) I_M]      (augmented basis, [M, D+M])

Orthonormalising the M rows of A (classical Gram-Schmidt with one re-orthogonalisation pass, "twice is
enough") gives Q [M, D+M]; the projection of [x; 0] is sum_i (x . q_i[:D]) q_i, whose first D entries
are S^T c*. So  residual = x - (x Qd^T) Qd  with Qd = Q[:, :D]. The sqrt(lambda) block keeps every row
independent (near-duplicate basis tokens included), and the Gram matrix, whose condition number is the
square of A's, is never formed -- which is why this is *more* accurate in fp32 than the solve.
"""

from __future__ import annotations

import math

import torch


def orthonormal_rows(a: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt with re-orthogonalisation on the rows of a [B, M, K] -> q [B, M, K], q q^T = I.

    Unrolled over M at trace time (static), two matmuls per pass per row.
    """
    rows: list[torch.Tensor] = []
    for i in range(a.shape[1]):
        v = a[:, i : i + 1]  # [B, 1, K]
        if rows:
            q = torch.cat(rows, dim=1)  # [B, i, K]
            for _ in range(2):
                v = v - (v @ q.transpose(1, 2)) @ q
        rows.append(v / v.norm(dim=-1, keepdim=True))
    return torch.cat(rows, dim=1)


def approximation_error(x: torch.Tensor, basis: torch.Tensor, ridge: float) -> torch.Tensor:
    """||x_n - C_n S||_2 for every token: x [B, N, D], basis S [B, M, D] (fp32) -> scores [B, N] fp32."""
    batch, num_basis, _ = basis.shape
    eye = torch.eye(num_basis, dtype=basis.dtype, device=basis.device).expand(batch, -1, -1)
    augmented = torch.cat([basis, math.sqrt(ridge) * eye], dim=-1)  # [B, M, D+M]
    q = orthonormal_rows(augmented)[..., : basis.shape[-1]]  # [B, M, D]
    residual = x - (x @ q.transpose(1, 2)) @ q  # [B, N, D]
    return residual.norm(dim=-1)
