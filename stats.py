"""Effect sizes and intervals, shared by the measures of a model and the summaries across runs.

Which interval fits which sample is the point of this module, so each function says what its unit
is. Scores recorded in training mode are not independent within a batch (BatchNorm normalizes by
the batch, D's minibatch-std feature is shared by it): there the unit is the batch, and intervals
resample whole batches. Across runs the unit is the run (its seed).
"""
import math

import numpy as np

# A percentile bootstrap over fewer blocks than this covers well under its nominal level (over two
# blocks it can only ever return the range of two numbers): such an interval is flagged, not read.
MIN_BLOCKS = 10


def average_ranks(x):
    """1-based ranks of x, tied values sharing the mean of their ranks."""
    order = x.argsort(kind="stable")
    ordered = x[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]]  # where a run of equal values begins
    first = np.flatnonzero(starts)
    counts = np.diff(np.r_[first, len(x)])
    ranks = np.empty(len(x))
    ranks[order] = (first + (counts + 1) / 2)[np.cumsum(starts) - 1]
    return ranks


def auroc(a, b):
    """P(a > b) for one value drawn from a and one from b, ties counting half: Mann-Whitney's U / (n_a n_b)."""
    ranks = average_ranks(np.concatenate([a, b]))
    return float((ranks[:len(a)].sum() - len(a) * (len(a) + 1) / 2) / (len(a) * len(b)))


def spearman(x, y):
    """Spearman's rank correlation: Pearson's correlation of the average ranks (nan if either is constant)."""
    rx, ry = average_ranks(np.asarray(x, float)), average_ranks(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def within_groups_spearman(x, y, groups):
    """Spearman's rho of x and y within each group (each level of a perturbation), averaged over the
    groups where it is defined: how far x follows y beyond both moving with the group, which a rho
    pooled over the groups mixes in (nan where no group has one)."""
    x, y, groups = (np.asarray(v, dtype=np.float64) for v in (x, y, groups))
    rhos = [spearman(x[groups == g], y[groups == g]) for g in np.unique(groups)]
    rhos = [r for r in rhos if not np.isnan(r)]
    return float(np.mean(rhos)) if rhos else float("nan")


def bootstrap_interval(statistic, samples, reps, seed, batch_size=1, level=0.95, paired=False):
    """Percentile interval of statistic(*resampled) over reps resamples of each sample, resampling
    whole blocks of batch_size consecutive values (a sample's length is a multiple of it). Each
    sample is resampled on its own; with paired=True one draw of block indices serves every sample,
    for samples of one length whose values belong together block by block (the signal and the
    surprisal of the same inputs)."""
    rng = np.random.default_rng(seed)
    rows = [s.reshape(-1, batch_size) for s in samples]
    values = []
    for _ in range(reps):
        picks = [rng.integers(0, len(rows[0]), len(rows[0]))] * len(rows) if paired else \
            [rng.integers(0, len(r), len(r)) for r in rows]
        values.append(statistic(*(r[pick].ravel() for r, pick in zip(rows, picks))))
    lo, hi = np.nanquantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def mean_interval(values, level=0.95):
    """{"mean", "low", "high", "n"}: the mean of independent values with its t-interval."""
    from scipy.stats import t
    values = np.asarray(values, dtype=np.float64)
    n, mean = len(values), float(values.mean())
    half = float(t.ppf((1 + level) / 2, n - 1) * values.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def proportion_interval(flags, level=0.95):
    """{"mean", "low", "high", "n"}: the fraction of independent True flags with its Wilson score
    interval, which stays inside [0, 1] and is not empty at 0 or 1, as a t-interval would be."""
    from scipy.stats import norm
    flags = np.asarray(flags, dtype=bool)
    n, p, z = len(flags), float(flags.mean()), float(norm.ppf((1 + level) / 2))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return {"mean": p, "low": float(centre - half), "high": float(centre + half), "n": n}


def t_test(values, null=0.0):
    """Two-sided one-sample t-test of independent values against `null`: the p-value (nan below 2
    values or with no spread)."""
    from scipy.stats import t
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n < 2 or values.max() == values.min():  # (equal values can leave an sd of 1e-16, not 0)
        return float("nan")
    sd = values.std(ddof=1)
    statistic = (values.mean() - null) / (sd / np.sqrt(n))
    return float(2 * t.sf(abs(statistic), n - 1))


def holm(p_values):
    """Holm's step-down adjustment of a family of p-values (nan stays nan and is not counted):
    reject every adjusted p below alpha and the family-wise error rate is at most alpha."""
    p = np.asarray(p_values, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(p))
    adjusted = np.full(len(p), np.nan)
    order = valid[np.argsort(p[valid], kind="stable")]
    m, running = len(order), 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))  # adjusted p-values never decrease
        adjusted[j] = running
    return adjusted.tolist()


def sign_test(values, null=0.0):
    """Exact two-sided sign test of independent values against `null`: under the null a value is as
    likely above it as below, so the count above among the n values off it is Binomial(n, 1/2); p is
    twice the smaller tail, at most 1 (nan with no value off the null; ties with it are dropped).
    Its smallest p is 2 / 2^n: five runs all on one side give 0.0625, so it takes six to reach 0.05."""
    values = np.asarray(values, dtype=np.float64)
    above, below = int((values > null).sum()), int((values < null).sum())
    n = above + below
    if n == 0:
        return float("nan")
    tail = sum(math.comb(n, k) for k in range(min(above, below) + 1))
    return min(1.0, 2 * tail / 2 ** n)


EXACT_FLIPS = 16  # up to 2^16 sign patterns are enumerated; above that they are sampled


def sign_flip_test(values, null=0.0, reps=100_000, seed=0):
    """Two-sided permutation test of the mean of independent values against `null`: under the null
    each value's difference from it is symmetric about 0, so flipping its sign leaves the data as
    likely. p is the fraction of sign patterns whose |mean difference| is at least the observed one:
    all 2^n patterns for n <= EXACT_FLIPS (exact; at least 2 / 2^n), else `reps` random ones and the
    observed one counted in (nan for no values or all on the null)."""
    d = np.asarray(values, dtype=np.float64) - null
    n = len(d)
    if n == 0 or not d.any():
        return float("nan")
    if n <= EXACT_FLIPS:
        signs, extra = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1), 0
    else:
        signs, extra = np.random.default_rng(seed).choice((-1.0, 1.0), size=(reps, n)), 1
    sums = np.abs(signs @ d)
    # the same sum reached in another order of additions differs in its last bits: the observed
    # pattern and its mirror must count as at least as extreme as themselves
    reached = sums >= abs(d.sum()) - 1e-12 * np.abs(d).sum()
    return float((reached.sum() + extra) / (len(signs) + extra))
