"""The budget policy: one object's range, defaults, splits and messages (no model needed)."""

import pytest

from apet_export.compression.budget import BudgetPolicy, split_budget
from apet_export.errors import BudgetError, InvalidInputError

IMAGE = BudgetPolicy(num_basis=10, max=576, default=64)
CROPS = BudgetPolicy(num_basis=10, max=576, default=160, unit="crops", max_units=5, extra_rows=48)
FRAMES = BudgetPolicy(num_basis=10, max=256, default=64, unit="frames")
SHARE = BudgetPolicy(num_basis=10, max=64, default=None, ratio=0.3)


def test_one_request_per_unit():
    assert IMAGE.resolve() == (64, None) and IMAGE.resolve(100) == (100, None)
    assert IMAGE.request_range() == (11, 576) and CROPS.request_range() == (11, 2880)
    with pytest.raises(BudgetError):
        IMAGE.resolve(577)
    assert CROPS.resolve(2000) == (2000, None)  # a whole-image budget may exceed one crop's N
    with pytest.raises(InvalidInputError, match=r"outside \[11, 2880\].*at most 5"):
        CROPS.check(3000)
    assert SHARE.resolve() == (None, None)  # each image keeps its share of its own tokens
    assert BudgetPolicy(num_basis=10, max=576, default=64, method="none").resolve(20) == (576, None)


def test_splits():
    assert CROPS.per_crop(160, 3) == 53 and CROPS.per_crop(None, 5) == 32 and CROPS.per_crop(5000, 2) == 576
    with pytest.raises(InvalidInputError, match="pass at least 33"):
        CROPS.per_crop(30, 3)
    assert FRAMES.per_frame(259, 8) == [33] * 3 + [32] * 5 and FRAMES.per_frame(None, 2) == [64, 64]
    with pytest.raises(InvalidInputError, match="between 88 and 2048"):
        FRAMES.per_frame(80, 8)
    assert SHARE.per_image(None, 54) == 16 and SHARE.per_image(None, 20) == 11 and SHARE.per_image(40, 30) == 30
    assert IMAGE.calls_budget(None) == 64 and CROPS.calls_budget(None) == 32 and SHARE.calls_budget(None) == 19
    assert CROPS.rows_bound(160) == 160 + 48 and CROPS.rows_bound(None) == 2880 + 48 and IMAGE.rows_bound(None) == 576
    assert CROPS.scaled((16, 64)) == [80, 320] and IMAGE.scaled((16, 64)) == [16, 64]
    assert CROPS.within((5, 80, 3000)) == [80]


def test_two_stages():
    two = BudgetPolicy(num_basis=10, max=576, default=64, two_stage=True)
    assert two.resolve() == (96, 32) and two.resolve(192) == (288, 96) and split_budget(192, 256) == (256, 128)
    assert two.resolve(budget1=100) == (100, 100) and two.resolve(budget1=100, budget2=40) == (100, 40)
    with pytest.raises(InvalidInputError, match="above the stage-1 budget"):
        two.resolve(budget1=64, budget2=65)
    with pytest.raises(BudgetError, match="keep=10"):
        two.resolve(budget1=64, budget2=10)
    with pytest.raises(InvalidInputError, match="no ApET stage 2"):
        IMAGE.resolve(budget1=96, budget2=32)
    with pytest.raises(InvalidInputError, match="must be an int"):
        IMAGE.resolve("64")
