"""`bench` on a two-stage build: the uncompressed reference, one-stage and two-stage rows in one run."""

import pytest

from apet_export.bench import run_bench


@pytest.mark.slow  # bench measures each of its four rows in a process of its own (~15 s); .ci/run runs it
def test_bench_rows_of_a_two_stage_build(llava_two_stage_build):
    rows = run_bench(llava_two_stage_build, budgets=[64], runs=1, max_new_tokens=2, pairs=[(80, 24)])
    assert [row.label for row in rows] == ["576/576", "64/64", "96/32", "80/24"]
    full, one, two = rows[0], rows[1], rows[2]
    text = full.prefill_tokens - 576
    assert one.prefill_tokens == text + 64
    assert two.prefill_tokens == text + (2 * 96 + 2 * 32) / 4  # layers [0, 2) see 96, layers [2, 4) see 32
    assert two.ideal_speedup == full.prefill_tokens / two.prefill_tokens
    assert all(row.prefill_ms > 0 and row.prefill_speedup > 0 for row in rows)
