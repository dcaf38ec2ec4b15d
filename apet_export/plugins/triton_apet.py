"""The ApetScore GPU kernel in Triton: FPS basis selection + ridge residual scores, one program per image.

    x [B, N, D] fp32|fp16 ──► scores [B, N] fp32, basis_index [B, M] (selection order), M <= 32

Same semantics as `reference_apet_score` (apet_export/compression/{selection,approximation}.py):

1. FPS: start = largest-norm token (fps_start < 0) or fps_start; squared Euclidean distance in the
   expanded form |x|^2 - 2 x.p + |p|^2 (as the reference computes it), running minimum in fp32, argmax
   with the first index on ties. The running minimum lives in the `scores` output, so the kernel needs
   no workspace (the TensorRT plugin and its AOT form have none).
2. Scores: ||x - Qd^T (Qd x)||, Qd = the first D columns of an orthonormal basis of the rows of
   A = [S | sqrt(ridge) I] (S = the basis tokens). The reference orthonormalises A by Gram-Schmidt, which
   needs Q [M, D+M] in memory. Here Q = W T A with W [M, M] from CholeskyQR2 (Cholesky of (T A)(T A)^T,
   then once more on the explicitly formed W1 T A, which restores the orthogonality the first pass
   loses), and T the row operation s_i -> s_i - s_0 (i >= 1): the same row space, so exactly the same
   projection, but tokens sharing a large common component (real vision features do) give a far better
   conditioned system. Only M x M tiles live in registers; Qd = W T S is formed tile by tile from the
   basis rows of x. fp32 error grows with cond(T S) where Gram-Schmidt's does not; it stays far below
   the released code's normal-equation solve (measured in tests/plugins/test_triton_apet.py).

All tiles are padded to BLOCK_M >= 16 rows (tl.dot's minimum): padded basis rows are zero and get a
unit diagonal, so the M x M factorisations stay non-singular and the padding contributes nothing.
Kernel arguments are ordered inputs, int32 scalars, outputs: the form TensorRT's AOT plugins launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_NUM_BASIS = 32
MIN_DOT_BLOCK = 16  # tl.dot needs every dimension >= 16


@triton.jit
def _column(a, offs, j):
    """a[:, j] of a square register tile, as a vector over rows."""
    return tl.sum(tl.where(offs[None, :] == j, a, 0.0), axis=1)


@triton.jit
def _cholesky_inverse(a, offs, FLOOR: tl.constexpr, BLOCK_M: tl.constexpr):
    """W = L^-1 for a = L L^T (a [BM, BM] symmetric positive definite), so W a W^T = I.

    Pivots are floored at FLOOR: with more basis tokens than dimensions (M > D) only the ridge keeps a
    positive definite, and fp32 rounding of a's large entries can push a pivot below zero."""
    lower = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for j in range(BLOCK_M):  # right-looking Cholesky: column j, then a rank-1 update of the rest
        col = _column(a, offs, j)
        pivot = tl.sum(tl.where(offs == j, col, 0.0), axis=0)
        l_col = tl.where(offs >= j, col / tl.sqrt(tl.maximum(pivot, FLOOR)), 0.0)
        lower = tl.where(offs[None, :] == j, l_col[:, None], lower)
        a = a - l_col[:, None] * l_col[None, :]
    inverse = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for i in range(BLOCK_M):  # forward substitution, row by row: W[i] = (e_i - L[i, :i] W[:i]) / L[i, i]
        row = tl.sum(tl.where(offs[:, None] == i, lower, 0.0), axis=0)  # L[i, :]
        diag = tl.sum(tl.where(offs == i, row, 0.0), axis=0)
        acc = tl.sum(row[:, None] * inverse, axis=0)  # rows >= i of W are still zero
        new_row = (tl.where(offs == i, 1.0, 0.0) - acc) / diag
        inverse = tl.where(offs[:, None] == i, new_row[None, :], inverse)
    return inverse


@triton.jit
def _load_tile(base, rows, row_mask, cols, col_mask, dim):
    """fp32 tile base[rows, cols] of a row-major [*, dim] matrix; masked entries read as 0."""
    pointers = base + rows.to(tl.int64)[:, None] * dim + cols[None, :]
    return tl.load(pointers, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _shifted_basis(x_base, chosen, basis_mask, offs_m, cols, dim):
    """Columns `cols` of T S: basis row 0 as is, rows i >= 1 minus row 0; padded rows zero. [BM, BD]"""
    basis = _load_tile(x_base, chosen, basis_mask, cols, cols < dim, dim)
    first = tl.sum(tl.where(offs_m[:, None] == 0, basis, 0.0), axis=0)  # [BD]
    return basis - tl.where(basis_mask[:, None] & (offs_m[:, None] > 0), first[None, :], 0.0)


@triton.jit
def apet_score_kernel(
    x_ptr,  # [B, N, D] fp32|fp16, contiguous
    num_tokens,  # N
    dim,  # D
    fps_start,  # first FPS token; < 0: the largest-norm token
    scores_ptr,  # [B, N] fp32 out (FPS running minimum first)
    basis_ptr,  # [B, M] int64|int32 out
    NUM_BASIS: tl.constexpr,
    RIDGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    x_base = x_ptr + batch * num_tokens * dim
    scores_base = scores_ptr + batch * num_tokens
    basis_base = basis_ptr + batch * NUM_BASIS
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)

    # ---- FPS start: argmax of |x_n|^2, first index on ties ---------------------------------------
    best_value = -float("inf")
    best_index = 0
    for n0 in range(0, num_tokens, BLOCK_N):
        rows = n0 + offs_n
        row_mask = rows < num_tokens
        sq_norm = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            cols = d0 + offs_d
            tile = _load_tile(x_base, rows, row_mask, cols, cols < dim, dim)  # [BN, BD]
            sq_norm += tl.sum(tile * tile, axis=1)
        sq_norm = tl.where(row_mask, sq_norm, -float("inf"))
        block_max = tl.max(sq_norm, axis=0)
        block_arg = tl.argmax(sq_norm, axis=0, tie_break_left=True)
        best_index = tl.where(block_max > best_value, n0 + block_arg, best_index)
        best_value = tl.maximum(block_max, best_value)
    current = tl.where(fps_start < 0, best_index, fps_start)

    # ---- FPS: M steps; the running minimum distance lives in scores ---------------------------------
    chosen = tl.zeros([BLOCK_M], dtype=tl.int32)  # basis token of slot m, selection order
    for step in range(NUM_BASIS):
        chosen = tl.where(offs_m == step, current, chosen)
        tl.store(basis_base + step, current)
        point = x_base + current.to(tl.int64) * dim
        point_sq = 0.0
        for d0 in range(0, dim, BLOCK_D):
            cols = d0 + offs_d
            p = tl.load(point + cols, mask=cols < dim, other=0.0).to(tl.float32)
            point_sq += tl.sum(p * p, axis=0)
        best_value = -float("inf")
        best_index = 0
        for n0 in range(0, num_tokens, BLOCK_N):
            rows = n0 + offs_n
            row_mask = rows < num_tokens
            dot = tl.zeros([BLOCK_N], dtype=tl.float32)
            sq_norm = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                cols = d0 + offs_d
                tile = _load_tile(x_base, rows, row_mask, cols, cols < dim, dim)  # [BN, BD]
                p = tl.load(point + cols, mask=cols < dim, other=0.0).to(tl.float32)  # [BD]
                dot += tl.sum(tile * p[None, :], axis=1)
                sq_norm += tl.sum(tile * tile, axis=1)
            distance = sq_norm - 2.0 * dot + point_sq  # [BN]
            previous = tl.load(scores_base + rows, mask=row_mask & (step > 0), other=float("inf"))
            nearest = tl.minimum(previous, distance)
            tl.store(scores_base + rows, nearest, mask=row_mask)
            nearest = tl.where(row_mask, nearest, -float("inf"))
            block_max = tl.max(nearest, axis=0)
            block_arg = tl.argmax(nearest, axis=0, tie_break_left=True)
            best_index = tl.where(block_max > best_value, n0 + block_arg, best_index)
            best_value = tl.maximum(block_max, best_value)
        current = best_index
        tl.debug_barrier()  # the next step reads running minima other threads stored

    # ---- W with W (T A)(T A)^T W^T = I, A = [S | sqrt(ridge) I]: CholeskyQR2 on M x M tiles ----------
    # T subtracts the first basis row from the others (rows of T A: s_0, s_i - s_0): same row space, but
    # tokens that share a large common component give a far better conditioned basis.
    basis_mask = offs_m < NUM_BASIS
    real = basis_mask[:, None] & basis_mask[None, :]
    eye = offs_m[:, None] == offs_m[None, :]
    pad_diagonal = tl.where(eye & (offs_m[:, None] >= NUM_BASIS), 1.0, 0.0)
    row0 = offs_m[:, None] == 0
    col0 = offs_m[None, :] == 0
    t_tt = (  # T T^T
        tl.where(eye, 1.0, 0.0)
        + tl.where(real & ~row0 & ~col0, 1.0, 0.0)
        - tl.where(real & (row0 ^ col0), 1.0, 0.0)
    )
    gram = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        basis = _shifted_basis(x_base, chosen, basis_mask, offs_m, d0 + offs_d, dim)  # [BM, BD]
        gram += tl.dot(basis, tl.trans(basis), input_precision="ieee")
    gram += RIDGE * t_tt + pad_diagonal
    w1 = _cholesky_inverse(gram, offs_m, RIDGE * 1e-2 + 1e-30, BLOCK_M)
    # Second pass on Q1 = W1 T A, formed explicitly: the S part tile by tile, the identity part analytically.
    gram = RIDGE * tl.dot(tl.dot(w1, t_tt, input_precision="ieee"), tl.trans(w1), input_precision="ieee")
    for d0 in range(0, dim, BLOCK_D):
        basis = _shifted_basis(x_base, chosen, basis_mask, offs_m, d0 + offs_d, dim)
        q1 = tl.dot(w1, basis, input_precision="ieee")  # [BM, BD]
        gram += tl.dot(q1, tl.trans(q1), input_precision="ieee")
    gram += pad_diagonal
    w = tl.dot(_cholesky_inverse(gram, offs_m, 1e-6, BLOCK_M), w1, input_precision="ieee")  # [BM, BM]

    # ---- scores: ||x - (x Qd^T) Qd||, Qd = W S formed per D tile ------------------------------------
    for n0 in range(0, num_tokens, BLOCK_N):
        rows = n0 + offs_n
        row_mask = rows < num_tokens
        coeffs = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # x Qd^T
        for d0 in range(0, dim, BLOCK_D):
            cols = d0 + offs_d
            col_mask = cols < dim
            tile = _load_tile(x_base, rows, row_mask, cols, col_mask, dim)
            q = tl.dot(w, _shifted_basis(x_base, chosen, basis_mask, offs_m, cols, dim), input_precision="ieee")
            coeffs += tl.dot(tile, tl.trans(q), input_precision="ieee")
        residual_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            cols = d0 + offs_d
            col_mask = cols < dim
            tile = _load_tile(x_base, rows, row_mask, cols, col_mask, dim)
            q = tl.dot(w, _shifted_basis(x_base, chosen, basis_mask, offs_m, cols, dim), input_precision="ieee")
            residual = tile - tl.dot(coeffs, q, input_precision="ieee")  # [BN, BD]
            residual_sq += tl.sum(residual * residual, axis=1)
        tl.store(scores_base + rows, tl.sqrt(residual_sq), mask=row_mask)


def block_sizes(num_tokens: int, dim: int, num_basis: int) -> dict:
    """Tile sizes: BLOCK_M holds the basis (>= 16 for tl.dot); N and D tiles capped at 64."""
    return {
        "BLOCK_N": max(MIN_DOT_BLOCK, min(64, triton.next_power_of_2(num_tokens))),
        "BLOCK_D": max(MIN_DOT_BLOCK, min(64, triton.next_power_of_2(dim))),
        "BLOCK_M": max(MIN_DOT_BLOCK, triton.next_power_of_2(num_basis)),
    }


def check_arguments(x, num_basis: int, fps_start: int) -> None:
    import torch

    from apet_export.errors import InvalidInputError

    if x.dim() != 3 or x.dtype not in (torch.float32, torch.float16):
        raise InvalidInputError(f"ApetScore kernel needs x [B, N, D] float32 or float16, got {x.dtype} {tuple(x.shape)}")
    if not 1 <= num_basis <= min(MAX_NUM_BASIS, x.shape[1]):
        raise InvalidInputError(
            f"num_basis={num_basis} is outside [1, min({MAX_NUM_BASIS}, N={x.shape[1]})]: the kernel holds "
            f"the basis in registers; lower num_basis"
        )
    if num_basis > x.shape[2]:
        raise InvalidInputError(
            f"num_basis={num_basis} exceeds the token dimension D={x.shape[2]}: the basis then spans every "
            f"token (all scores ~0) and the kernel's fp32 M x M factorisation is singular; lower num_basis"
        )
    if fps_start >= x.shape[1]:
        raise InvalidInputError(f"fps_start={fps_start} is not a token index (N={x.shape[1]})")


def apet_score_triton(x, num_basis: int, ridge: float, fps_start: int, out=None, num_warps: int = 4):
    """(scores [B, N] fp32, basis_index [B, M] int64) of x [B, N, D]; `out` = preallocated outputs
    (the TensorRT plugin passes its buffers). Runs on CUDA tensors, or on CPU with TRITON_INTERPRET=1."""
    import torch

    check_arguments(x, num_basis, fps_start)
    x = x.contiguous()
    batch, num_tokens, dim = x.shape
    if out is None:
        out = (
            torch.empty((batch, num_tokens), dtype=torch.float32, device=x.device),
            torch.empty((batch, num_basis), dtype=torch.int64, device=x.device),
        )
    scores, basis_index = out
    apet_score_kernel[(batch,)](
        x, num_tokens, dim, fps_start, scores, basis_index,
        NUM_BASIS=num_basis, RIDGE=float(ridge), **block_sizes(num_tokens, dim, num_basis), num_warps=num_warps,
    )
    return scores, basis_index
