import math

import pytest
import torch

from apet_export.compression import METHODS, attention_received, cls_attention_from_qk, get_method
from apet_export.errors import InvalidInputError, UnknownNameError


def qk(batch=2, heads=4, seq=50, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, seq, dim, generator=g), torch.randn(batch, heads, seq, dim, generator=g)


def test_cls_attention_equals_row_of_full_attention():
    q, k = qk()
    full = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)  # [B, H, S, S]
    torch.testing.assert_close(cls_attention_from_qk(q, k), full[:, :, 0, 1:].sum(1))


def test_attention_received_equals_full_attention_mean():
    q, k = qk(seq=70)
    full = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    torch.testing.assert_close(attention_received(q, k, chunk=16), full.sum(1).mean(1))


def test_visionzip_keeps_top_attention_tokens_and_merges_the_rest():
    x = torch.randn(2, 49, 16)
    attention = torch.rand(2, 49)
    out = get_method("visionzip")(x, 12, cls_attention=attention, num_contextual=2)
    assert out.tokens.shape == (2, 12, 16)
    assert (out.index[:, 1:] > out.index[:, :-1]).all()
    for b in range(2):
        dominant = set(attention[b].topk(10).indices.tolist())
        assert dominant <= set(out.index[b].tolist())
        kept_dominant = [i for i, pos in enumerate(out.index[b].tolist()) if pos in dominant]
        torch.testing.assert_close(out.tokens[b, kept_dominant], x[b, sorted(dominant)])
    # contextual tokens are averages: the total mass of non-dominant tokens is spread over 2 targets
    assert not torch.allclose(out.tokens, x.gather(1, out.index[..., None].expand(-1, -1, 16)))


def test_visionzip_without_attention_is_a_clear_error():
    with pytest.raises(InvalidInputError, match="cls_attention"):
        get_method("visionzip")(torch.randn(1, 10, 4), 5)


def test_random_is_seeded_and_pool_averages_bins():
    x = torch.randn(1, 12, 4)
    first, second = get_method("random")(x, 5), get_method("random")(x, 5)
    assert torch.equal(first.index, second.index)
    pooled = get_method("pool")(x, 4)
    torch.testing.assert_close(pooled.tokens, x.view(1, 4, 3, 4).mean(2))
    assert pooled.index.tolist() == [[1, 4, 7, 10]]


def test_none_keeps_everything():
    x = torch.randn(2, 7, 3)
    assert torch.equal(get_method("none")(x, 3).tokens, x)


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"none"}))  # 'none' ignores the budget by definition
def test_every_method_rejects_a_bad_budget(name):
    with pytest.raises(InvalidInputError):
        get_method(name)(torch.randn(1, 10, 4), 11, cls_attention=torch.rand(1, 10))


def test_unknown_method():
    with pytest.raises(UnknownNameError, match="choose one of apet, none, pool, random, visionzip"):
        get_method("fastv")
