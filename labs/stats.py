"""The labs' one rule for what a difference means (STYLE.md, rule 19): a setting's mean over paired
seeds with its 95% t-interval, the paired difference to the lab's baseline with its interval, and
the verdict computed from them, never typed by hand:

    same direction as the paper, resolved      the difference's interval excludes 0, on the
    opposite to the paper, resolved            paper's side or the other;
    not resolved: ... would need N seeds       the interval holds 0; N from the paired spread;
    one seed: no interval                      a single seed has no spread to measure.

Seed s of every setting shares its batch order, augmentations and, where the shapes agree, its
initial weights (train_pretrain.py --seed), so the difference of two settings at the same seed
cancels what the seed alone does: the paired sd is smaller than the sd of either setting.
Numbers in percentage points; stdlib only (no scipy: the t table is below).
"""
import math
import statistics

# Two-sided 95% quantiles of Student's t, t_{0.975, df}, for df = 1..30 (any statistics table).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
       17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064,
       25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}
# Beyond df 30 the normal quantile: at most 4% narrower than t (t_40 = 2.021, t_60 = 2.000).
Z95 = 1.960


def t95(df):
    """The 95% two-sided t quantile for df >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f'a t quantile needs df >= 1, not {df}')
    return T95.get(df, Z95)


def interval(values):
    """values (one per seed) -> (mean, half-width of its 95% t-interval, sample sd): the interval
    is mean +- half. One value: (value, None, None), no spread to measure."""
    values = list(values)
    if not values:
        raise ValueError('no values')
    mean = statistics.fmean(values)
    if len(values) == 1:
        return mean, None, None
    sd = statistics.stdev(values)
    return mean, t95(len(values) - 1) * sd / math.sqrt(len(values)), sd


def paired(setting, baseline):
    """{seed: value} of a setting and of the baseline -> [setting - baseline] for each seed both
    have, in seed order: the differences that the pairing makes comparable."""
    return [setting[s] - baseline[s] for s in sorted(setting) if s in baseline]


def seeds_needed(sd, gap):
    """The smallest n >= 2 with t_{n-1} x sd / sqrt(n) < |gap|: how many paired seeds resolve a
    true difference of |gap| points at the paired spread sd (the interval of the mean difference
    is then narrower than the gap). None for a gap of 0: no number of seeds resolves it."""
    gap = abs(gap)
    if gap == 0:
        return None
    for n in range(2, 32):                              # the t table's range (df 1..30)
        if t95(n - 1) * sd / math.sqrt(n) < gap:
            return n
    # beyond it the normal quantile: Z95 sd / sqrt(n) < gap  <=>  n > (Z95 sd / gap)^2
    return max(32, math.floor((Z95 * sd / gap) ** 2) + 1)


def sign(x):
    return (x > 0) - (x < 0)


def verdict(diffs, paper):
    """The paired differences (setting - baseline, one per seed) and the paper's claim for the same
    comparison -> (kind, sentence). paper: the paper's gap in points (setting - baseline, signed);
    '+' or '-' where the paper gives a direction and no number; None where it says nothing.
    kind: 'same', 'opposite', 'resolved' (no paper direction), 'unresolved', 'one seed', 'none'."""
    gap = paper if isinstance(paper, (int, float)) else None
    direction = sign(gap) if gap is not None else {'+': 1, '-': -1}.get(paper, 0)
    if not diffs:
        return 'none', 'no paired runs'
    if len(diffs) == 1:
        return 'one seed', 'one seed: no interval'
    mean, half, sd = interval(diffs)
    if abs(mean) > half:                                # the interval excludes 0
        if direction == 0:
            side = 'higher' if mean > 0 else 'lower'
            return 'resolved', f'resolved: {side} (the paper gives no direction)'
        if sign(mean) == direction:
            return 'same', 'same direction as the paper, resolved'
        return 'opposite', 'opposite to the paper, resolved'
    if gap is None or gap == 0:
        return 'unresolved', ('not resolved (the paper gives no gap to size the seeds it '
                              'would take)')
    n = seeds_needed(sd, gap)
    if n <= len(diffs):                 # a gap as large as the paper's would have shown
        return 'unresolved', (f"not resolved: smaller than the paper's gap ({gap:+.1f} points), "
                              f'which {n} seeds would resolve at the measured spread '
                              f'(paired sd {sd:.1f})')
    return 'unresolved', (f"not resolved: the paper's gap ({gap:+.1f} points) would need {n} "
                          f'seeds at the measured spread (paired sd {sd:.1f})')


def binomial_se(p, n):
    """The standard error (points) of an accuracy of p percent measured on n images: the noise of
    the measurement alone, before any seed varies (50% on 1,000 images: 1.6; on 4,000: 0.8)."""
    return 100 * math.sqrt(p / 100 * (1 - p / 100) / n)


def fmt_interval(values, signed=False):
    """'51.8 ± 1.2' (the mean and its 95% half-width, one decimal), or '51.8' for one value;
    signed: '+9.3 ± 2.1', for a difference."""
    mean, half, _ = interval(values)
    text = f'{mean:+.1f}' if signed else f'{mean:.1f}'
    return text if half is None else f'{text} ± {half:.1f}'
