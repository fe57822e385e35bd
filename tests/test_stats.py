"""labs/stats.py, the labs' one rule for intervals and verdicts, on hand-made numbers: the t table
against the t distribution integrated here, each interval and seed count computed by hand, and
every verdict the rule can give."""
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'labs'))
import stats  # noqa: E402


def t_cdf_above_zero(t, df, n=4000):
    """P(0 < T < t) for Student's t with df degrees of freedom: Simpson's rule on its density."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    h = t / n
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
    return h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


@pytest.mark.parametrize('df', range(1, 31))
def test_t_table_is_the_975_quantile(df):
    # the table's 3 decimals: the probability below the value is 0.975 to within 1e-4
    assert 0.5 + t_cdf_above_zero(stats.t95(df), df) == pytest.approx(0.975, abs=1e-4)


def test_t_beyond_the_table_is_the_normal_quantile():
    assert stats.t95(31) == stats.t95(1000) == 1.960
    assert [stats.t95(df) for df in range(1, 32)] == sorted(
        [stats.t95(df) for df in range(1, 32)], reverse=True)
    with pytest.raises(ValueError):
        stats.t95(0)


def test_interval():
    mean, half, sd = stats.interval([1.0, 2.0, 3.0])          # sd 1, t_2 = 4.303
    assert (mean, sd) == (2.0, 1.0) and half == pytest.approx(4.303 / math.sqrt(3))
    assert stats.interval([5.0]) == (5.0, None, None)        # one seed: no spread
    assert stats.fmt_interval([1.0, 2.0, 3.0]) == '2.0 ± 2.5'
    assert stats.fmt_interval([1.0, 2.0, 3.0], signed=True) == '+2.0 ± 2.5'
    assert stats.fmt_interval([-0.25]) == '-0.2' and stats.fmt_interval([5.0]) == '5.0'


def test_paired_differences_use_the_seeds_both_have():
    setting = {2: 11.0, 0: 10.0, 1: 12.0}
    baseline = {0: 9.0, 1: 10.0, 2: 12.0, 3: 4.0}             # seed 3 has no partner
    assert stats.paired(setting, baseline) == [1.0, 2.0, -1.0]


def test_seeds_needed():
    # sd 1, gap 2: n = 3 gives 4.303 / sqrt(3) = 2.48, n = 4 gives 3.182 / 2 = 1.59 < 2
    assert stats.seeds_needed(1.0, 2.0) == 4
    assert stats.seeds_needed(1.0, -2.0) == 4                 # the size of the gap counts
    # sd 3.4, gap 1: beyond the table, n > (1.96 x 3.4)^2 = 44.4
    assert stats.seeds_needed(3.4, 1.0) == 45
    assert stats.seeds_needed(0.0, 1.0) == 2 and stats.seeds_needed(1.0, 0.0) is None
    for sd, gap in ((1.0, 2.0), (3.4, 1.0), (0.9, 0.4)):     # the smallest n that does
        n = stats.seeds_needed(sd, gap)
        assert stats.t95(n - 1) * sd / math.sqrt(n) < gap
        assert n == 2 or stats.t95(n - 2) * sd / math.sqrt(n - 1) >= gap


CLEAR = [2.0, 2.2, 1.8]                                        # mean 2, half 4.303 x 0.2 / 1.73


@pytest.mark.parametrize('paper, kind, words', [
    (1.0, 'same', 'same direction as the paper, resolved'),
    (-1.0, 'opposite', 'opposite to the paper, resolved'),
    ('+', 'same', 'same direction as the paper, resolved'),
    ('-', 'opposite', 'opposite to the paper, resolved'),
    (None, 'resolved', 'resolved: higher (the paper gives no direction)'),
])
def test_verdict_resolved(paper, kind, words):
    assert stats.verdict(CLEAR, paper) == (kind, words)
    assert stats.verdict([-d for d in CLEAR], None)[1].startswith('resolved: lower')


def test_verdict_not_resolved_says_the_seeds_the_papers_gap_needs():
    diffs = [1.0, -1.0, 0.5, -0.5]                            # mean 0, sd sqrt(2.5 / 3) = 0.913
    kind, words = stats.verdict(diffs, -1.0)
    # n = 5: 2.776 x 0.913 / 2.236 = 1.13; n = 6: 2.571 x 0.913 / 2.449 = 0.96 < 1
    assert kind == 'unresolved'
    assert words == ("not resolved: the paper's gap (-1.0 points) would need 6 seeds at the "
                     "measured spread (paired sd 0.9)")
    # a gap the seeds at hand would have resolved: the effect here is smaller than the paper's
    kind, words = stats.verdict([0.1, -0.1, 0.1, -0.1, 0.05, -0.05], 2.0)
    assert kind == 'unresolved' and words.startswith("not resolved: smaller than the paper's gap")
    assert 'which 2 seeds would resolve' in words
    assert stats.verdict(diffs, '+')[1].startswith('not resolved (the paper gives no gap')
    assert stats.verdict(diffs, None)[0] == 'unresolved'


def test_verdict_of_one_seed_and_of_none():
    assert stats.verdict([3.0], -1.0) == ('one seed', 'one seed: no interval')
    assert stats.verdict([], -1.0) == ('none', 'no paired runs')


def test_verdict_at_the_edge():
    # the interval just excludes 0, just holds it: mean 1, sd 1, n = 5, half = 2.776 / sqrt(5)
    base = [1 + x for x in (-1.0, -1.0, 0.0, 1.0, 1.0)]       # sd = 1
    assert stats.interval(base)[2] == pytest.approx(1.0)
    assert stats.verdict(base, 1.0)[0] == 'unresolved'        # half 1.24 > mean 1
    assert stats.verdict([x + 0.3 for x in base], 1.0)[0] == 'same'   # 1.3 > 1.24


def test_binomial_se():
    assert stats.binomial_se(50, 1000) == pytest.approx(1.581, abs=1e-3)
    assert stats.binomial_se(50, 4000) == pytest.approx(0.791, abs=1e-3)
    assert stats.binomial_se(50, 3906) > 0.8 >= stats.binomial_se(50, 3907)
