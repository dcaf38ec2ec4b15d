"""The Triton ApetScore kernel against the reference (`reference_apet_score`), on the CPU through Triton's
interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before triton is imported; the interpreter is slow: shapes stay small).

Tolerance: identical basis_index; |score - reference| <= 1e-5 * max_n ||x_n|| (fp32 rounding of a residual
computed from tokens of that norm; measured values are printed)."""

from __future__ import annotations

import pytest
import torch

from apet_export.compression.approximation import approximation_error
from apet_export.errors import InvalidInputError
from apet_export.plugins.apet_score import reference_apet_score

pytest.importorskip("triton", reason="Triton is the `triton` extra (pip install -e '.[triton]')")


@pytest.fixture(scope="module")
def kernel():
    from triton.runtime.interpreter import InterpretedFunction

    from apet_export.plugins import triton_apet

    if not isinstance(triton_apet.apet_score_kernel, InterpretedFunction):
        pytest.fail("triton was imported without TRITON_INTERPRET=1 (tests/conftest.py sets it first)")
    return triton_apet.apet_score_triton


def check_against_reference(kernel, x, num_basis, fps_start=-1, ridge=1e-5):
    scores, basis_index = kernel(x, num_basis, ridge, fps_start)
    ref_scores, ref_basis = reference_apet_score(x, num_basis, ridge, fps_start)
    tolerance = 1e-5 * x.float().norm(dim=-1).max().item()
    diff = (scores - ref_scores).abs().max().item()
    print(f"\n{tuple(x.shape)} {x.dtype} M={num_basis} start={fps_start}: max |score diff| {diff:.2e} "
          f"(tolerance {tolerance:.2e})")
    assert scores.dtype == torch.float32 and basis_index.dtype == torch.int64
    assert torch.equal(basis_index, ref_basis)
    assert diff <= tolerance
    return diff


@pytest.mark.parametrize(
    "batch, num_tokens, dim, num_basis, fps_start, dtype",
    [
        (1, 37, 24, 5, -1, torch.float32),  # N, D not powers of two, N not a multiple of the tile
        (2, 50, 40, 10, -1, torch.float32),  # batch 2, the default M
        (2, 70, 33, 1, 3, torch.float32),  # M = 1, fixed start
        (1, 40, 36, 32, -1, torch.float32),  # M = 32, the kernel's maximum
        (2, 45, 30, 8, -1, torch.float16),  # fp16 input
        (1, 20, 130, 4, 7, torch.float16),  # D over two tiles
    ],
)
def test_kernel_matches_reference(kernel, batch, num_tokens, dim, num_basis, fps_start, dtype):
    torch.manual_seed(num_tokens * 31 + dim)
    x = torch.randn(batch, num_tokens, dim).to(dtype)
    check_against_reference(kernel, x, num_basis, fps_start)


def test_ties_take_the_first_index(kernel):
    """Duplicate tokens (flat image regions) tie in norm and in FPS distance: first index wins, as in the reference."""
    torch.manual_seed(0)
    x = torch.randn(1, 24, 20).repeat(1, 2, 1)  # token n + 24 == token n
    check_against_reference(kernel, x, 6)
    assert (kernel(x, 6, 1e-5, -1)[1] < 24).all()


def test_correlated_tokens_stay_far_more_accurate_than_the_released_solve(kernel):
    """Tokens sharing a large common component (as vision features do) make the basis ill-conditioned: the
    kernel's CholeskyQR2 on shifted rows stays near Gram-Schmidt and far below the normal-equation solve."""
    torch.manual_seed(1)
    dim, num_basis = 64, 10
    mean = torch.randn(1, 1, dim) * 10.0
    x = mean + 0.1 * torch.randn(1, 60, dim)  # |x| ~ 80, scores ~ 1
    scores, basis_index = kernel(x, num_basis, 1e-5, -1)
    basis = torch.gather(x, 1, basis_index[..., None].expand(-1, -1, dim))
    truth = approximation_error(x.double(), basis.double(), 1e-5)
    gram = basis[0] @ basis[0].T + 1e-5 * torch.eye(num_basis)
    coefficients = torch.linalg.solve(gram, basis[0] @ x[0].T).T
    solve_error = ((x[0] - coefficients @ basis[0]).norm(dim=-1).double() - truth[0]).abs().max().item()
    kernel_error = (scores.double() - truth).abs().max().item()
    print(f"\nvs fp64: kernel {kernel_error:.2e}, released solve {solve_error:.2e}, max score {truth.max():.2f}")
    assert kernel_error < 1e-3 * truth.max().item()
    assert kernel_error < solve_error / 5


def test_bad_arguments_are_typed_errors(kernel):
    x = torch.randn(1, 20, 16)
    with pytest.raises(InvalidInputError, match="num_basis=33"):
        kernel(torch.randn(1, 40, 40), 33, 1e-5, -1)
    with pytest.raises(InvalidInputError, match="exceeds the token dimension"):
        kernel(x, 17, 1e-5, -1)
    with pytest.raises(InvalidInputError, match="fps_start=20"):
        kernel(x, 4, 1e-5, 20)
    with pytest.raises(InvalidInputError, match="float32 or float16"):
        kernel(x.double(), 4, 1e-5, -1)


@pytest.mark.parametrize("num_tokens, dim, num_basis, fps_start", [(70, 33, 8, -1), (20, 130, 4, 7)])
def test_the_compiled_forms_tiles_match_the_reference(kernel, num_tokens, dim, num_basis, fps_start):
    """The TensorRT plugin runs the kernel compiled with one tile shape for every N and D (aot.launch_constexprs:
    64 x 64, not the shape-fitted tiles above): N over one tile, D over two, both under one."""
    from apet_export.plugins import aot, triton_apet

    torch.manual_seed(num_tokens + dim)
    x = torch.randn(2, num_tokens, dim)
    scores = torch.empty(2, num_tokens)
    basis_index = torch.empty(2, num_basis, dtype=torch.int64)
    triton_apet.apet_score_kernel[(2,)](x, num_tokens, dim, fps_start, scores, basis_index,
                                        **aot.launch_constexprs(num_basis, 1e-5), num_warps=aot.AOT_NUM_WARPS)
    ref_scores, ref_basis = reference_apet_score(x, num_basis, 1e-5, fps_start)
    diff = (scores - ref_scores).abs().max().item()
    print(f"\nAOT tiles {tuple(x.shape)} M={num_basis}: max |score diff| {diff:.2e}")
    assert torch.equal(basis_index, ref_basis)
    assert diff <= 1e-5 * x.norm(dim=-1).max().item()
