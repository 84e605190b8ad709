"""Seed statistics for grid tables: mean, sample std, t-based 95% interval, and a paired t-test against a baseline.

Why paired: every method of a grid sees the same split and, per seed, the same k-shot sample, so the difference
per seed removes the variation the seeds share; scipy's `ttest_rel` does the test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
TIE = 1e-9  # accuracy differences closer than this are equal (0.7 - 0.6 != 0.8 - 0.7 in floating point)


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); nan for fewer than 2 values
    ci_low: float  # t-based interval for the mean; nan for fewer than 2 values
    ci_high: float


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean +- std over seeds with the Student-t interval of the mean (nan where n is too small)."""
    data = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(data)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(data.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(data.std(ddof=1))
    if std == 0:
        return Summary(n, mean, 0.0, mean, mean)
    low, high = stats.t.interval(confidence, df=n - 1, loc=mean, scale=std / math.sqrt(n))
    return Summary(n, mean, std, float(low), float(high))


@dataclass(frozen=True)
class PairedTest:
    n: int  # seeds present for both
    mean_difference: float  # method - baseline
    t: float
    p: float
    verdict: str


def paired_test(method: dict[int, float], baseline: dict[int, float], alpha: float = ALPHA) -> PairedTest:
    """Paired t-test over the seeds both have ({seed: score}); the verdict says whether the gap beats seed noise."""
    seeds = sorted(set(method) & set(baseline))
    differences = np.asarray([method[s] - baseline[s] for s in seeds], dtype=float)
    n = len(seeds)
    mean = float(differences.mean()) if n else math.nan
    if n < 2:
        return PairedTest(n, mean, math.nan, math.nan,
                          f"no test: needs >= 2 seeds shared with the baseline, has {n}")
    if np.ptp(differences) <= TIE:  # the same gap on every seed (up to float noise): t is undefined
        if abs(mean) <= TIE:
            return PairedTest(n, 0.0, math.nan, 1.0, f"identical to the baseline on all {n} seeds")
        return PairedTest(n, mean, math.nan, math.nan,
                          f"no test: the difference is {mean:+.4f} on every seed (no seed noise to compare with)")
    t, p = stats.ttest_rel([method[s] for s in seeds], [baseline[s] for s in seeds])
    t, p = float(t), float(p)
    if p < alpha:
        verdict = f"distinguishable from seed noise (p={p:.3g} < {alpha})"
    else:
        verdict = f"not distinguishable from seed noise (p={p:.3g})"
    return PairedTest(n, mean, t, p, verdict)
