"""Uncertainty for comparing runs: bootstrap confidence intervals and McNemar's paired test.

A test set of a few hundred samples moves a percent or two between reruns, so a table of
point estimates alone invites reading noise as progress. Every metric here is computed
from per-sample (y_true, y_pred) arrays, the same ones `ger.scoring.metrics.outcome` scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# A metric over a batch of resamples: int-coded (B, n) y_true and y_pred -> (B,) values in percent.
BatchMetric = Callable[[np.ndarray, np.ndarray], np.ndarray]

EXACT_BELOW = 25  # discordant pairs below this: exact binomial test; at or above: chi-square
_CHUNK_ELEMENTS = 4_000_000  # resampled entries held at once, to bound memory (~16 MB per int32 array)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile-bootstrap interval, all in percent."""

    value: float
    low: float
    high: float
    n: int
    n_boot: int

    def __str__(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


@dataclass(frozen=True)
class McNemar:
    """McNemar's test on paired correctness: b = only A right, c = only B right."""

    n: int  # paired samples (names present in both runs)
    b: int
    c: int
    statistic: float  # chi-square with continuity correction, or the smaller count for the exact test
    p_value: float
    method: str  # "exact" | "chi2"

    def __str__(self) -> str:
        return f"p={format_p(self.p_value)} ({self.method}; b={self.b}, c={self.c}, n={self.n})"


def format_p(p: float) -> str:
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def encode(y_true: Sequence[str], y_pred: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Map string labels to shared int codes (true labels first), as the batch metrics expect."""
    codes: dict[str, int] = {}
    for label in list(y_true) + list(y_pred):
        codes.setdefault(label, len(codes))
    return (
        np.fromiter((codes[x] for x in y_true), dtype=np.int32, count=len(y_true)),
        np.fromiter((codes[x] for x in y_pred), dtype=np.int32, count=len(y_pred)),
    )


def confusion_batch(y_true: np.ndarray, y_pred: np.ndarray, k: int | None = None) -> np.ndarray:
    """(B, n) int codes -> (B, k, k) confusion counts, rows = true. One bincount for the whole batch."""
    y_true, y_pred = np.atleast_2d(y_true), np.atleast_2d(y_pred)
    if k is None:
        k = int(max(y_true.max(initial=0), y_pred.max(initial=0))) + 1
    batch = y_true.shape[0]
    offsets = (np.arange(batch, dtype=np.int64) * k * k)[:, None]
    flat = (y_true.astype(np.int64) * k + y_pred + offsets).ravel()
    return np.bincount(flat, minlength=batch * k * k).reshape(batch, k, k)


def _acc_from(conf: np.ndarray) -> np.ndarray:
    total = conf.sum(axis=(1, 2))
    return 100.0 * np.trace(conf, axis1=1, axis2=2) / np.maximum(total, 1)


def _uar_from(conf: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present in y_true (as ger.scoring.metrics.metric_value does)."""
    support = conf.sum(axis=2)
    diag = np.diagonal(conf, axis1=1, axis2=2)
    present = support > 0
    recall = np.where(present, diag / np.maximum(support, 1), 0.0)
    return 100.0 * recall.sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def _wf1_from(conf: np.ndarray) -> np.ndarray:
    """Support-weighted F1 (sklearn's average='weighted', zero_division=0): 2tp / (true + predicted)."""
    support = conf.sum(axis=2)
    predicted = conf.sum(axis=1)
    tp = np.diagonal(conf, axis1=1, axis2=2)
    denom = support + predicted
    f1 = np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 0.0)
    return 100.0 * (f1 * support).sum(axis=1) / np.maximum(support.sum(axis=1), 1)


def _from_confusion(fn: Callable[[np.ndarray], np.ndarray]) -> BatchMetric:
    def metric(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
        return fn(confusion_batch(y_true, y_pred))

    metric.__doc__ = fn.__doc__
    metric.from_confusion = fn  # type: ignore[attr-defined]  # lets bootstrap_ci take its fast path
    return metric


accuracy = _from_confusion(_acc_from)
uar = _from_confusion(_uar_from)
weighted_f1 = _from_confusion(_wf1_from)
METRICS: dict[str, BatchMetric] = {"acc": accuracy, "war": accuracy, "uar": uar, "wf1": weighted_f1}


def batch_metric(metric: str | BatchMetric) -> BatchMetric:
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)} or a function")
    return METRICS[metric]


def rowwise(fn: Callable[[np.ndarray, np.ndarray], float]) -> BatchMetric:
    """Adapt a one-sample-set metric (e.g. an sklearn scorer) to the batch form; slow, for checks only."""

    def metric(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
        y_true, y_pred = np.atleast_2d(y_true), np.atleast_2d(y_pred)
        return np.array([fn(t, p) for t, p in zip(y_true, y_pred, strict=True)], dtype=float)

    return metric


def bootstrap_ci(
    y_true: Sequence[str] | np.ndarray,
    y_pred: Sequence[str] | np.ndarray,
    metric: str | BatchMetric = "acc",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Percentile-bootstrap interval of `metric` over samples, resampled with replacement.

    `metric` is a name (acc, war, uar, wf1) or a function of int-coded (B, n) arrays returning (B,)
    values in percent. The seed is fixed so a report is reproducible byte for byte.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} samples but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("cannot bootstrap an empty sample")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    fn = batch_metric(metric)
    yt, yp = _as_codes(y_true, y_pred)
    n = len(yt)
    value = float(fn(yt[None, :], yp[None, :])[0])
    if n_boot == 0:  # the point estimate alone, for quick tables
        return Interval(value, value, value, n, 0)
    from_confusion = getattr(fn, "from_confusion", None)
    rng = np.random.default_rng(seed)
    if from_confusion is not None:
        resampled = from_confusion(_multinomial_confusions(yt, yp, n_boot, rng))
    else:
        rows = max(1, _CHUNK_ELEMENTS // n)
        chunks = []
        for start in range(0, n_boot, rows):
            idx = rng.integers(0, n, size=(min(rows, n_boot - start), n), dtype=np.int32)
            chunks.append(np.asarray(fn(yt[idx], yp[idx]), dtype=float))
        resampled = np.concatenate(chunks)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(resampled, [tail, 100.0 - tail])
    return Interval(value, float(low), float(high), n, n_boot)


def _as_codes(
    y_true: Sequence[str] | np.ndarray, y_pred: Sequence[str] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    yt, yp = np.asarray(y_true), np.asarray(y_pred)
    if yt.dtype.kind in "iu" and yp.dtype.kind in "iu":
        return yt.astype(np.int32), yp.astype(np.int32)
    return encode([str(x) for x in yt], [str(x) for x in yp])


def _multinomial_confusions(
    yt: np.ndarray, yp: np.ndarray, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """Bootstrap confusion matrices without materialising resamples.

    Resampling n samples with replacement and counting (true, pred) pairs is exactly a
    multinomial draw of n over the observed cells, so for metrics that are functions of the
    confusion matrix this is the same bootstrap at O(n_boot * k^2) instead of O(n_boot * n).
    """
    k = int(max(yt.max(), yp.max())) + 1
    counts = np.bincount(yt.astype(np.int64) * k + yp, minlength=k * k)
    cells = np.flatnonzero(counts)
    draws = rng.multinomial(len(yt), counts[cells] / counts.sum(), size=n_boot)
    conf = np.zeros((n_boot, k * k), dtype=np.int64)
    conf[:, cells] = draws
    return conf.reshape(n_boot, k, k)


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p of min(b, c) = k under Binomial(n, 1/2): twice the smaller tail, capped at 1."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def mcnemar_counts(b: int, c: int, n: int | None = None) -> McNemar:
    """McNemar's test from the discordant counts: exact below EXACT_BELOW discordant pairs, else chi2(1)."""
    discordant = b + c
    total = discordant if n is None else n
    if discordant < EXACT_BELOW:
        return McNemar(total, b, c, float(min(b, c)), binomial_two_sided(min(b, c), discordant), "exact")
    chi2 = max(abs(b - c) - 1, 0) ** 2 / discordant  # Edwards' continuity correction; b == c gives 0
    p = math.erfc(math.sqrt(chi2 / 2.0))  # chi-square(1) survival: P(|Z| > sqrt(chi2))
    return McNemar(total, b, c, chi2, p, "chi2")


def mcnemar(
    correct_a: np.ndarray | Sequence[bool],
    names_a: Sequence[str],
    correct_b: np.ndarray | Sequence[bool],
    names_b: Sequence[str],
) -> McNemar:
    """Paired test of two runs on the samples both scored, matched by sample name."""
    a = _by_name(correct_a, names_a, "A")
    b = _by_name(correct_b, names_b, "B")
    shared = [name for name in a if name in b]
    if not shared:
        raise ValueError("the two runs share no sample names; McNemar's test needs paired samples")
    ca = np.fromiter((a[x] for x in shared), dtype=bool, count=len(shared))
    cb = np.fromiter((b[x] for x in shared), dtype=bool, count=len(shared))
    return mcnemar_counts(int((ca & ~cb).sum()), int((~ca & cb).sum()), len(shared))


def _by_name(correct: np.ndarray | Sequence[bool], names: Sequence[str], which: str) -> dict[str, bool]:
    if len(correct) != len(names):
        raise ValueError(f"run {which}: {len(correct)} correctness values for {len(names)} names")
    out = dict(zip(names, (bool(x) for x in correct), strict=True))
    if len(out) != len(names):
        raise ValueError(f"run {which}: duplicate sample names; pairing by name would be ambiguous")
    return out
