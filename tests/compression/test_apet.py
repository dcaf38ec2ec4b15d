import pytest
import torch

from apet_export.compression import ApetConfig, apet_compress, approximation_error
from apet_export.compression.selection import farthest_point_sampling, fps_start_index
from apet_export.errors import ApetExportError, BudgetError, InvalidInputError
from tests.compression.reference import apet_reference, error_by_solve, fps_reference, video_frame_reference


def tokens(batch=2, num=96, dim=32, seed=0):
    return torch.randn(batch, num, dim, generator=torch.Generator().manual_seed(seed))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error: max |a - e| / max |e| (basis tokens have ~0 error, so not elementwise)."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


@pytest.mark.parametrize("start", ["norm", 5])
def test_fps_matches_loop_reference(start):
    x = tokens()
    got = farthest_point_sampling(x, 10, fps_start_index(x, start))
    for b in range(x.shape[0]):
        first = int(x[b].norm(dim=-1).argmax()) if start == "norm" else start
        assert got[b].tolist() == fps_reference(x[b], 10, first)


def test_fps_start_is_largest_norm_token():
    x = tokens()
    x[0, 17] *= 10
    assert apet_compress(x, 32).basis_index[0, 0] == 17


@pytest.mark.parametrize("ridge", [1e-5, 1e-2])
def test_approximation_error_matches_solve(ridge):
    x = tokens(num=200, dim=64) * 20  # CLIP-like feature norms
    basis = x[:, :10]
    got = approximation_error(x, basis, ridge)
    for b in range(x.shape[0]):
        expected = error_by_solve(x[b], basis[b], ridge)
        err = relative_error(got[b], expected)
        print(f"ridge={ridge} batch {b}: relative error vs float64 solve {err:.2e}")
        assert err <= 1e-4


def test_approximation_error_ill_conditioned_basis():
    """Near-duplicate basis tokens make S S^T nearly singular; the exported form must still match."""
    x = tokens(num=300, dim=64) * 20
    basis = x[:, :10].clone()
    basis[:, 1] = basis[:, 0] * (1 + 1e-5)  # scaled duplicate
    basis[:, 2] = basis[:, 0] + 1e-4 * torch.randn(64, generator=torch.Generator().manual_seed(3))
    basis[:, 3] = basis[:, 3]  # and an exact duplicate of a token in x:
    x[:, 50] = basis[:, 3]
    got = approximation_error(x, basis, 1e-5)
    for b in range(x.shape[0]):
        expected = error_by_solve(x[b], basis[b], 1e-5)
        fp32_solve = error_by_solve(x[b], basis[b], 1e-5, dtype=torch.float32)
        err = relative_error(got[b], expected)
        print(f"batch {b}: closed form {err:.2e}, fp32 solve {relative_error(fp32_solve, expected):.2e}")
        assert err <= 1e-4


def test_basis_tokens_have_near_zero_error():
    x = tokens() * 10
    out = apet_compress(x, 32)
    basis_scores = torch.gather(out.scores, 1, out.basis_index)
    assert basis_scores.max() <= 1e-3 * out.scores.max()


@pytest.mark.parametrize("selection", ["fps", "random", "dpc"])
@pytest.mark.parametrize("keep", [11, 40, 95])
def test_compress_matches_loop_reference(selection, keep):
    x = tokens(num=96)
    config = ApetConfig(num_basis=10, selection=selection)
    out = apet_compress(x, keep, config)
    for b in range(x.shape[0]):
        if selection == "dpc":  # the basis is cluster means: rebuild them from the reference's view
            basis = None
        else:
            basis = x[b, out.basis_index[b]]
            torch.testing.assert_close(out.scores[b], error_by_solve(x[b], basis, 1e-5).float(), atol=1e-4, rtol=1e-4)
        ref_tokens, ref_index = apet_reference(x[b], keep, out.basis_index[b].tolist(), out.scores[b])
        assert out.index[b].tolist() == ref_index.tolist()
        if basis is not None:
            diff = (out.tokens[b] - ref_tokens).abs().max()
            print(f"{selection} keep={keep} b={b}: max abs diff {diff:.2e}")
            assert diff <= 1e-5


def test_dpc_basis_features_are_cluster_means():
    x = torch.cat([torch.randn(1, 30, 8) + 10 * i for i in range(3)], dim=1)  # 3 well separated clusters
    out = apet_compress(x, 20, ApetConfig(num_basis=3, selection="dpc"))
    cluster_of_peak = sorted(int(i) // 30 for i in out.basis_index[0])
    assert cluster_of_peak == [0, 1, 2]


def test_keep_equal_n_is_identity():
    x = tokens()
    out = apet_compress(x, x.shape[1])
    assert torch.equal(out.tokens, x)
    assert torch.equal(out.index, torch.arange(x.shape[1]).expand(2, -1))


def test_hand_computed_example():
    """N=6, M=1: every step of docs/design.md worked out by hand.

    basis = x0 (largest norm); errors ~ distance from the x0 axis: x1 5, x2 4, x3 3, x4 2, x5 0.1, x0 ~0.
    keep=3: R = {x1, x2}; the lowest-error kept slot x3 receives the basis features x0; dropped x4 -> x2,
    x5 -> x1, x0 -> x1 (cosine). Output positions [1, 2, 3].
    """
    x = torch.tensor(
        [[[10.0, 0.01, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 4.0], [1.0, 3.0, 0.0], [1.0, 0.0, 2.0], [2.0, 0.1, 0.0]]]
    )
    out = apet_compress(x, 3, ApetConfig(num_basis=1))
    assert out.basis_index.tolist() == [[0]]
    assert out.index.tolist() == [[1, 2, 3]]
    expected = torch.tensor([[[12.0 / 3, 5.11 / 3, 0.0], [0.5, 0.0, 3.0], [10.0, 0.01, 0.0]]])
    torch.testing.assert_close(out.tokens, expected)


def test_fp16_input_keeps_dtype_and_matches_fp32():
    x = tokens()
    half = apet_compress(x.half(), 32)
    full = apet_compress(x.half().float(), 32)
    assert half.tokens.dtype == torch.float16 and half.scores.dtype == torch.float32
    assert torch.equal(half.index, full.index)
    torch.testing.assert_close(half.tokens.float(), full.tokens, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    ("x", "keep", "config", "match"),
    [
        (tokens(), 10, ApetConfig(num_basis=10), r"outside \(10, 96\]"),
        (tokens(), 97, ApetConfig(num_basis=10), r"between 11 and 96"),
        (tokens(num=5), 5, ApetConfig(num_basis=10), "exceeds the 5 input tokens"),
        (tokens()[0], 20, ApetConfig(), "rank 3"),
        (torch.zeros(1, 0, 8), 20, ApetConfig(), "empty"),
        (torch.full((1, 20, 4), float("nan")), 12, ApetConfig(), "NaN"),
        (tokens(), 20.0, ApetConfig(), "keep must be an int"),
        (tokens(), 20, ApetConfig(fps_start=500), "not a token index"),
    ],
)
def test_bad_input_raises_typed_error(x, keep, config, match):
    with pytest.raises(InvalidInputError, match=match) as info:
        apet_compress(x, keep, config)
    assert isinstance(info.value, ApetExportError) and isinstance(info.value, ValueError)


def test_budget_error_is_typed():
    with pytest.raises(BudgetError):
        apet_compress(tokens(), 3)


@pytest.mark.parametrize(
    "kwargs", [{"num_basis": 0}, {"selection": "kmeans"}, {"ridge": 0.0}, {"fps_start": "first"}, {"fps_start": -1}]
)
def test_bad_config_raises(kwargs):
    with pytest.raises(InvalidInputError):
        ApetConfig(**kwargs)


def released_basis_placement(x: torch.Tensor, scores: torch.Tensor, basis_index: list[int], keep: int):
    """The released code's step 3, literally, for one element x [N, D]: a boolean mask over the M
    lowest-error kept positions, then `features[mask] = seeds` (masked rows in ascending position order
    receive the seeds in selection order). Returns the features at the kept positions, ascending."""
    num_basis = len(basis_index)
    order = sorted(range(x.shape[0]), key=lambda n: (-float(scores[n]), n))
    mask = torch.zeros(x.shape[0], dtype=torch.bool)
    mask[order[keep - num_basis : keep]] = True
    features = x.clone()
    features[mask] = x[basis_index]
    kept = sorted(order[:keep])
    return features[kept]


def test_basis_slots_follow_the_released_code():
    """Slot i (ascending position) holds basis[i] in FPS order, not the basis sorted by position."""
    x = tokens(num=576, dim=32, batch=1)
    keep = 64
    out = apet_compress(x, keep)
    basis_index = out.basis_index[0].tolist()
    assert basis_index != sorted(basis_index), "the check needs an FPS order that is not ascending"
    expected = released_basis_placement(x[0], out.scores[0], basis_index, keep)
    index = out.index[0].tolist()
    ranked = sorted(range(576), key=lambda n: (-float(out.scores[0, n]), n))
    slots = sorted(ranked[keep - 10 : keep])
    rows = [index.index(s) for s in slots]
    diff = (out.tokens[0, rows] - expected[[sorted(ranked[:keep]).index(s) for s in slots]]).abs().max()
    print(f"basis slots: max abs diff against the released placement {diff:.2e}")
    assert diff == 0


# -- variants: the slot rule of each released code path (reference.py renders each literally) ---------------

VARIANT_CASES = [  # (variant, stage, the rule the reference follows)
    ("uniform", 1, "position_slots"),
    ("uniform", 2, "position_slots"),
    ("llava", 1, "position_slots"),
    ("llava", 2, "topk_slots"),
    ("qwen2_5_vl", 1, "blend_slots"),
]


@pytest.mark.parametrize(("variant", "stage", "rule"), VARIANT_CASES)
@pytest.mark.parametrize("keep", [11, 40, 95])
def test_variant_matches_released_rule(variant, stage, rule, keep):
    x = tokens(num=96) * 5
    out = apet_compress(x, keep, ApetConfig(variant=variant), stage=stage)
    for b in range(x.shape[0]):
        ref_tokens, ref_index = apet_reference(x[b], keep, out.basis_index[b].tolist(), out.scores[b], rule)
        assert out.index[b].tolist() == ref_index.tolist()
        diff = float((out.tokens[b] - ref_tokens).abs().max())
        print(f"{variant} stage {stage} keep={keep} b={b}: max abs diff {diff:.2e}")
        assert diff <= 1e-5


@pytest.mark.parametrize("keep", [11, 32, 95])
def test_video_variant_appends_the_basis_after_the_topk_rows(keep):
    x = tokens(num=96) * 5
    out = apet_compress(x, keep, ApetConfig(variant="video_llava"))
    for b in range(x.shape[0]):
        ref_rows, ref_index = video_frame_reference(x[b], keep, out.basis_index[b].tolist(), out.scores[b])
        assert out.index[b].tolist() == ref_index.tolist()
        diff = float((out.tokens[b] - ref_rows).abs().max())
        print(f"video_llava keep={keep} b={b}: max abs diff {diff:.2e}")
        assert diff <= 1e-5
    assert out.index[0, -10:].tolist() == out.basis_index[0].tolist()  # the basis rows last, in FPS order


def test_llm_stage_rule_differs_from_the_vision_stage_rule():
    """The released LLM stage fills the top-k list's last M slots in top-k order: on FPS orders that are not
    the slots' position order, the same indices carry different tokens than under the vision-stage rule."""
    x = tokens(num=288, dim=32, batch=1) * 5
    llm = apet_compress(x, 96, ApetConfig(variant="llava"), stage=2)
    vision = apet_compress(x, 96, ApetConfig(variant="llava"), stage=1)
    assert torch.equal(llm.index, vision.index)
    assert (llm.tokens - vision.tokens).abs().max() > 1e-2


@pytest.mark.parametrize("variant", ["uniform", "llava", "qwen2_5_vl", "video_llava"])
def test_variant_keep_equal_n_is_identity(variant):
    from apet_export.compression import rank_and_merge
    from apet_export.compression.apet import apet_scores, stage_rule

    x = tokens()
    config = ApetConfig(variant=variant)
    scores, basis_index, basis = apet_scores(x, config)
    got, index = rank_and_merge(x, scores, basis, x.shape[1], stage_rule(variant, 1), basis_index)
    assert torch.equal(index, torch.arange(x.shape[1]).expand(2, -1))
    assert torch.equal(got, x)


@pytest.mark.parametrize("variant", ["qwen2_5_vl", "video_llava"])
def test_single_stage_variants_refuse_stage_two(variant):
    with pytest.raises(InvalidInputError, match="no LLM stage"):
        apet_compress(tokens(), 32, ApetConfig(variant=variant), stage=2)


def test_unknown_variant_is_refused():
    with pytest.raises(InvalidInputError, match="variant must be one of"):
        ApetConfig(variant="authors")
