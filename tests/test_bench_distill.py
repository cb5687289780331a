"""The distillation benchmark's arithmetic: seed summaries and the share of the gap a strategy closes."""

import pytest

from bench.distill import gap_recovered, summarize


def test_summarize_gives_mean_and_half_range():
    assert summarize([0.10, 0.14]) == pytest.approx((0.12, 0.02))
    assert summarize([0.2]) == (0.2, 0.0)


def test_gap_recovered_is_the_share_of_teacher_minus_plain():
    teacher, plain = {"map": 0.135}, {"map": 0.079}
    assert gap_recovered({"map": 0.107}, plain, teacher) == pytest.approx(0.5)
    assert gap_recovered({"map": 0.072}, plain, teacher) == pytest.approx(-0.125)
    assert gap_recovered(plain, plain, teacher) is None  # the plain row itself
    assert gap_recovered({"map": 0.1}, None, teacher) is None
    assert gap_recovered({"map": 0.1}, {"map": 0.2}, teacher) is None  # no gap to recover
