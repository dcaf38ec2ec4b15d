"""Property tests: invariants that must hold for any input, not just the hand-picked ones."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apet_export.compression import ApetConfig, apet_compress


@st.composite
def compress_case(draw, duplicates=True):
    batch = draw(st.integers(1, 3))
    num = draw(st.integers(4, 80))
    num_basis = draw(st.integers(1, min(num - 1, 12)))
    # With M >= D the basis spans the whole space and every error is rounding noise (real models: D >> M).
    dim = draw(st.integers(num_basis + 2, 32))
    keep = draw(st.integers(num_basis + 1, num))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    selection = draw(st.sampled_from(["fps", "dpc", "random"]))
    x = torch.randn(batch, num, dim, generator=torch.Generator().manual_seed(seed)) * scale
    if duplicates and draw(st.booleans()):  # duplicate tokens: ties in scores and similarities
        x[:, num // 2 :] = x[:, : num - num // 2].clone()
    return x, keep, ApetConfig(num_basis=num_basis, selection=selection)


@settings(max_examples=60, deadline=None)
@given(compress_case())
def test_output_shapes_and_sorted_unique_indices(case):
    x, keep, config = case
    out = apet_compress(x, keep, config)
    batch, num, dim = x.shape
    assert out.tokens.shape == (batch, keep, dim) and out.tokens.dtype == x.dtype
    assert out.index.shape == (batch, keep) and out.index.dtype == torch.int64
    assert out.scores.shape == (batch, num) and out.scores.dtype == torch.float32
    assert out.basis_index.shape == (batch, config.num_basis)
    assert (out.index[:, 1:] > out.index[:, :-1]).all(), "indices must be strictly ascending (sorted, unique)"
    assert ((out.index >= 0) & (out.index < num)).all()
    assert torch.isfinite(out.tokens).all()


@settings(max_examples=40, deadline=None)
@given(compress_case())
def test_keep_equal_n_is_identity(case):
    x, _, config = case
    out = apet_compress(x, x.shape[1], config)
    assert torch.equal(out.tokens, x)
    assert torch.equal(out.index, torch.arange(x.shape[1]).expand(x.shape[0], -1))


@settings(max_examples=40, deadline=None)
@given(compress_case(duplicates=False))  # exact ties are broken by rounding, which batched BLAS changes
def test_batch_elements_are_independent(case):
    x, keep, config = case
    together = apet_compress(x, keep, config)
    for b in range(x.shape[0]):
        alone = apet_compress(x[b : b + 1], keep, config)
        if config.selection == "random":  # one generator draws per element in order: compare element 0 only
            if b > 0:
                continue
        assert torch.equal(alone.index, together.index[b : b + 1])
        torch.testing.assert_close(alone.tokens, together.tokens[b : b + 1], atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(compress_case())
def test_fps_basis_tokens_have_near_zero_error(case):
    x, keep, config = case
    out = apet_compress(x, keep, ApetConfig(num_basis=config.num_basis, selection="fps"))
    basis_scores = torch.gather(out.scores, 1, out.basis_index)
    # c = e_i gives the ridge objective ||b_i - b_i||^2 + ridge = ridge, so a basis token's residual is at
    # most sqrt(ridge), whatever the feature scale (plus fp32 rounding relative to the largest norm).
    bound = config.ridge**0.5 + 1e-5 * x.norm(dim=-1).amax(dim=1, keepdim=True)
    assert (basis_scores <= bound).all()


@settings(max_examples=30, deadline=None)
@given(compress_case())
def test_fp16_input_gives_fp16_tokens_from_the_same_ranking(case):
    x, keep, config = case
    x = x.clamp(-100, 100)
    half = apet_compress(x.half(), keep, config)
    reference = apet_compress(x.half().float(), keep, config)
    assert half.tokens.dtype == torch.float16
    assert torch.equal(half.index, reference.index)
    torch.testing.assert_close(half.tokens, reference.tokens.half())


@settings(max_examples=30, deadline=None)
@given(compress_case())
def test_deterministic(case):
    x, keep, config = case
    first, second = apet_compress(x, keep, config), apet_compress(x, keep, config)
    assert torch.equal(first.index, second.index) and torch.equal(first.tokens, second.tokens)
