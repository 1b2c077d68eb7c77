"""Which differences are real: confidence intervals over test images, paired tests, multiple-comparison
correction, and rank tests across datasets.

Resampling is over test images, stratified by label (normal and anomalous images are drawn apart, so every
resample holds both classes and AUROC stays defined). Seeds are handled explicitly: a method's number is the
mean over its seeds, every seed's cell scored the same test images, and a resample draws the same images for
every seed; DeLong's test compares the seed means as a contrast of all the seeds' AUROCs, their covariance
on the shared images included (DeLong et al., Biometrics 1988; the fast algorithm of Sun & Xu, 2014).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

Statistic = Callable[[np.ndarray], float]  # indices of test images -> a number


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float
    mc_error: float = 0.0  # Monte Carlo standard error of the endpoints (the larger of the two)


def quantile_mc_error(distribution: np.ndarray, value: float) -> float:
    """Monte Carlo standard error of ``value`` read as a sample quantile of ``distribution`` (B resamples): at
    the level q it sits at, half the distance between the order statistics of ranks B q -/+ sqrt(B q (1 - q)),
    the binomial (order-statistic) method for a quantile's standard error (Conover, Practical Nonparametric
    Statistics, 3rd ed., 1999, Sec. 3.2)."""
    ordered = np.sort(np.asarray(distribution, dtype=np.float64))
    b = len(ordered)
    q = (np.searchsorted(ordered, value, "left") + np.searchsorted(ordered, value, "right")) / (2.0 * b)
    spread = np.sqrt(b * q * (1.0 - q))
    low, high = (int(np.clip(np.rint(b * q + d), 0, b - 1)) for d in (-spread, spread))
    return float(ordered[high] - ordered[low]) / 2.0


def _strata(labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """The indices of the normal and of the anomalous images; one stratum only where there is one class (a
    segmentation set: every image holds a lesion)."""
    labels = np.asarray(labels).astype(bool)
    return tuple(s for s in (np.flatnonzero(~labels), np.flatnonzero(labels)) if len(s))


def bootstrap_ci(
    statistic: Statistic,
    labels: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    method: str = "BCa",
) -> Interval:
    """``statistic`` on all test images with its ``level`` confidence interval: ``scipy.stats.bootstrap``
    over the normal and the anomalous images as two samples (a stratified bootstrap), BCa by default. Where
    BCa is undefined (every resample gives the same value, e.g. a Dice of 0 throughout) the percentile
    interval of the same resamples is given. ``mc_error``: the larger Monte Carlo standard error of the two
    endpoints, each read as a quantile of the bootstrap distribution (``quantile_mc_error``)."""
    strata = _strata(labels)

    def run(how: str):
        return stats.bootstrap(
            strata,
            lambda *parts: statistic(np.concatenate(parts)),
            n_resamples=n_resamples,
            confidence_level=level,
            method=how,
            vectorized=False,
            rng=np.random.default_rng(seed),
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # BCa's acceleration of a constant statistic: 0 / 0
        result = run(method)
        if method != "percentile" and not np.isfinite(result.confidence_interval).all():
            result = run("percentile")
    low, high = (float(x) for x in result.confidence_interval)
    error = max(quantile_mc_error(result.bootstrap_distribution, x) for x in (low, high))
    return Interval(statistic(np.arange(len(labels))), low, high, error)


@dataclass(frozen=True)
class PairedTest:
    difference: float  # a - b
    p: float
    test: str


def paired_bootstrap(
    a: Statistic, b: Statistic, labels: np.ndarray, n_resamples: int = 1000, seed: int = 0
) -> PairedTest:
    """Two-sided paired bootstrap test of ``a - b`` on the same resampled images: with ``k`` the smaller count
    of resampled differences on either side of zero, p = min(1, 2 (1 + k) / (B + 1)), never 0 (Davison &
    Hinkley 1997, Sec. 4.2.2; North et al., Am. J. Hum. Genet. 2002); identical methods give p = 1."""
    strata = _strata(labels)
    rng = np.random.default_rng(seed)
    differences = np.empty(n_resamples)
    for r in range(n_resamples):
        idx = np.concatenate([rng.choice(s, len(s)) for s in strata])
        differences[r] = a(idx) - b(idx)
    everything = np.arange(len(labels))
    k = min(np.sum(differences <= 0), np.sum(differences >= 0))
    p = min(1.0, 2.0 * (1 + k) / (n_resamples + 1))
    return PairedTest(a(everything) - b(everything), float(p), "paired bootstrap")


def _midranks(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x, axis=-1)


def delong_covariance(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of the rows of ``scores`` ``[k, N]`` (same images, ``labels`` ``[N]``) and their DeLong covariance
    ``[k, k]``, by the placement values of Sun & Xu's fast algorithm."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    labels = np.asarray(labels).astype(bool)
    pos, neg = scores[:, labels], scores[:, ~labels]
    m, n = pos.shape[1], neg.shape[1]
    tx, ty = _midranks(pos), _midranks(neg)
    tz = _midranks(np.concatenate([pos, neg], axis=1))
    aucs = (tz[:, :m].sum(1) - m * (m + 1) / 2.0) / (m * n)
    v_pos = (tz[:, :m] - tx) / n  # per anomalous image: share of normal images it outranks
    v_neg = 1.0 - (tz[:, m:] - ty) / m  # per normal image: share of anomalous images that outrank it
    cov = np.atleast_2d(np.cov(v_pos)) / m + np.atleast_2d(np.cov(v_neg)) / n
    return aucs, cov


def delong_test(a: Sequence[np.ndarray], b: Sequence[np.ndarray], labels: np.ndarray) -> PairedTest:
    """DeLong's test of mean-over-seeds AUROC of ``a`` minus that of ``b`` (each a list of per-seed score
    vectors on the same images): the contrast ``L = (1/ka, ..., -1/kb, ...)`` of all their AUROCs."""
    scores = np.vstack([*a, *b])
    weights = np.r_[np.full(len(a), 1.0 / len(a)), np.full(len(b), -1.0 / len(b))]
    aucs, cov = delong_covariance(scores, labels)
    difference = float(weights @ aucs)
    variance = float(weights @ cov @ weights)
    if variance <= 1e-18:
        return PairedTest(difference, 1.0 if abs(difference) < 1e-12 else 0.0, "DeLong")
    z = difference / np.sqrt(variance)
    return PairedTest(difference, float(2.0 * stats.norm.sf(abs(z))), "DeLong")


SMALL_CLASS = 50  # fewer test images than this in either class: AUROCs are compared by permutation, not DeLong


def permutation_auroc_test(
    a: Sequence[np.ndarray], b: Sequence[np.ndarray], labels: np.ndarray, n_permutations: int = 1000, seed: int = 0
) -> PairedTest:
    """Paired permutation test of mean-over-seeds AUROC of ``a`` minus that of ``b`` (as many per-seed score
    vectors each): every (method, seed) vector becomes its normalised ranks, so that scales match, and each
    permutation swaps the two methods' ranks on a random half of the images, all seeds of an image together
    (Venkatraman & Begg, Biometrika 1996); two-sided, p = (1 + #{|D*| >= |D|}) / (B + 1)."""
    labels = np.asarray(labels).astype(bool)
    ra, rb = (np.stack([stats.rankdata(s) for s in side]) / len(labels) for side in (a, b))  # [k, N]
    m, n = int(labels.sum()), int((~labels).sum())

    def mean_auroc(r: np.ndarray) -> np.ndarray:  # Mann-Whitney over the last axis, mean over seeds
        return ((stats.rankdata(r, axis=-1)[..., labels].sum(-1) - m * (m + 1) / 2.0) / (m * n)).mean(-1)

    observed = float(mean_auroc(ra) - mean_auroc(rb))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_permutations, 256):  # blocks of permutations bound the memory
        swap = rng.random((min(256, n_permutations - start), 1, len(labels))) < 0.5  # one draw for all seeds
        d = mean_auroc(np.where(swap, rb, ra)) - mean_auroc(np.where(swap, ra, rb))
        hits += int(np.sum(np.abs(d) >= abs(observed) - 1e-12))
    return PairedTest(observed, (1 + hits) / (n_permutations + 1), "permutation")


def auroc_test(
    a: Sequence[np.ndarray], b: Sequence[np.ndarray], labels: np.ndarray, n_permutations: int = 1000, seed: int = 0
) -> PairedTest:
    """The paired AUROC test that suits the test set: the permutation test where either class has fewer than
    ``SMALL_CLASS`` images (DeLong's normal approximation gives p far below what so few images can support)
    and both sides have as many seeds, else DeLong's test."""
    labels = np.asarray(labels).astype(bool)
    if min(labels.sum(), (~labels).sum()) < SMALL_CLASS and len(a) == len(b):
        return permutation_auroc_test(a, b, labels, n_permutations, seed)
    return delong_test(a, b, labels)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (statsmodels' ``multipletests``)."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=np.float64)
    if not len(p):
        return p
    return multipletests(p, method="holm")[1]


@dataclass(frozen=True)
class RankTest:
    """Friedman's test over datasets (blocks) and methods, with Nemenyi's post-hoc test (scikit-posthocs)."""

    ranks: dict[str, float]  # mean rank per method (1 = best)
    statistic: float
    p: float
    critical_difference: float
    pairwise: object  # pandas DataFrame of Nemenyi p-values, methods x methods
    datasets: int


def friedman_nemenyi(table, higher_is_better: bool = True, alpha: float = 0.05) -> RankTest:
    """``table``: a pandas DataFrame, datasets as rows, methods as columns (at least 3 of each... Friedman needs
    three methods; two datasets are the least that ranks anything)."""
    import scikit_posthocs as sp

    values = table.to_numpy(dtype=np.float64)
    k, n = values.shape[1], values.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # every dataset ranks the methods alike: 0 / 0
        statistic, p = stats.friedmanchisquare(*values.T)
    ranks = table.rank(axis=1, ascending=not higher_is_better).mean(axis=0)
    oriented = values if higher_is_better else -values
    pairwise = sp.posthoc_nemenyi_friedman(oriented)
    pairwise.index = pairwise.columns = list(table.columns)
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2.0)
    cd = float(q * np.sqrt(k * (k + 1) / (6.0 * n)))
    return RankTest({str(m): float(r) for m, r in ranks.items()}, float(statistic), float(p), cd, pairwise, n)
