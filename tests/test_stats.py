"""Bootstrap intervals and McNemar's test, against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, recall_score

from ger.scoring.stats import (
    accuracy,
    binomial_two_sided,
    bootstrap_ci,
    confusion_batch,
    encode,
    mcnemar,
    mcnemar_counts,
    rowwise,
    uar,
    weighted_f1,
)

BAD = "(invalid)"

# (y_true, y_pred, acc, uar, wf1), worked by hand.
METRIC_CASES = [
    # all right
    (["a", "b", "c"], ["a", "b", "c"], 100.0, 100.0, 100.0),
    # recall a = 1/2, b = 2/2; F1 a = 2*1/(2+1) = 2/3, F1 b = 2*2/(2+3) = 4/5; weighted (2*2/3 + 2*4/5)/4
    (["a", "a", "b", "b"], ["a", "b", "b", "b"], 75.0, 75.0, 100 * (4 / 3 + 8 / 5) / 4),
    # an unusable prediction has no true support: it lowers acc/recall, weighs nothing in F1
    (["a", "a", "b"], ["a", BAD, BAD], 100 / 3, 25.0, 100 * (2 * 2 / 3) / 3),
    # class c never predicted and b never true: UAR averages the present classes a, c only
    (
        ["a", "c", "c", "c"],
        ["a", "b", "c", "a"],
        50.0,
        100 * (1 + 1 / 3) / 2,
        100 * (1 * 2 / 3 + 3 * 2 / 4) / 4,
    ),
    # everything wrong
    (["a", "b"], ["b", "a"], 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize("y_true,y_pred,acc,uar_,wf1", METRIC_CASES)
def test_batch_metrics_match_hand_values(y_true, y_pred, acc, uar_, wf1):
    yt, yp = encode(y_true, y_pred)
    assert accuracy(yt, yp)[0] == pytest.approx(acc)
    assert uar(yt, yp)[0] == pytest.approx(uar_)
    assert weighted_f1(yt, yp)[0] == pytest.approx(wf1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_metrics_match_sklearn_on_random_rows(seed):
    rng = np.random.default_rng(seed)
    yt = rng.integers(0, 5, size=(4, 60))
    yp = np.where(rng.random((4, 60)) < 0.5, yt, rng.integers(0, 6, size=(4, 60)))
    for row in range(4):
        t, p = yt[row], yp[row]
        assert accuracy(yt, yp)[row] == pytest.approx(100 * accuracy_score(t, p))
        present = sorted(set(t.tolist()))
        assert uar(yt, yp)[row] == pytest.approx(100 * recall_score(t, p, labels=present, average="macro"))
        assert weighted_f1(yt, yp)[row] == pytest.approx(
            100 * f1_score(t, p, average="weighted", zero_division=0)
        )


def test_confusion_batch_counts_each_row_separately():
    conf = confusion_batch(np.array([[0, 0, 1], [1, 1, 1]]), np.array([[0, 1, 1], [0, 0, 1]]), k=2)
    assert conf.tolist() == [[[1, 1], [0, 1]], [[0, 0], [2, 1]]]


def test_bootstrap_degenerate_cases_have_zero_width():
    assert (bootstrap_ci(["a"] * 50, ["a"] * 50, "acc", n_boot=200).low,) == (100.0,)
    ci = bootstrap_ci(["a"] * 50, ["b"] * 50, "wf1", n_boot=200)
    assert (ci.value, ci.low, ci.high) == (0.0, 0.0, 0.0)


def test_bootstrap_accuracy_width_matches_the_binomial_standard_error():
    n, p = 8000, 0.75
    y_true = ["x"] * n
    y_pred = ["x"] * int(n * p) + ["y"] * (n - int(n * p))
    ci = bootstrap_ci(y_true, y_pred, "acc", n_boot=2000, seed=0)
    half_width = 1.96 * 100 * math.sqrt(p * (1 - p) / n)  # 0.949 points
    assert ci.value == pytest.approx(75.0)
    assert ci.low < 75.0 < ci.high
    assert (ci.high - ci.low) / 2 == pytest.approx(half_width, rel=0.1)


def test_bootstrap_zero_resamples_gives_the_point_estimate():
    ci = bootstrap_ci(["a", "a", "b", "b"], ["a", "b", "b", "b"], "uar", n_boot=0)
    assert (ci.value, ci.low, ci.high, ci.n_boot) == (75.0, 75.0, 75.0, 0)


def test_bootstrap_is_reproducible_and_seed_dependent():
    rng = np.random.default_rng(3)
    yt = rng.integers(0, 4, 300)
    yp = np.where(rng.random(300) < 0.6, yt, rng.integers(0, 4, 300))
    a, b = bootstrap_ci(yt, yp, "uar", seed=7), bootstrap_ci(yt, yp, "uar", seed=7)
    assert a == b
    assert bootstrap_ci(yt, yp, "uar", seed=8) != a


def test_fast_path_agrees_with_explicit_resampling():
    """The multinomial shortcut is the same bootstrap as resampling indices (up to Monte Carlo noise)."""
    rng = np.random.default_rng(5)
    yt = rng.integers(0, 6, 2000)
    yp = np.where(rng.random(2000) < 0.55, yt, rng.integers(0, 7, 2000))
    for name, fn in (("acc", accuracy), ("uar", uar), ("wf1", weighted_f1)):
        fast = bootstrap_ci(yt, yp, name, n_boot=2000)
        slow = bootstrap_ci(yt, yp, lambda t, p, fn=fn: fn(t, p), n_boot=2000)
        assert fast.value == slow.value
        assert fast.low == pytest.approx(slow.low, abs=0.4)
        assert fast.high == pytest.approx(slow.high, abs=0.4)


def test_bootstrap_accepts_a_row_metric_from_sklearn():
    yt, yp = ["a", "a", "b", "b"] * 10, ["a", "b", "b", "b"] * 10
    ci = bootstrap_ci(yt, yp, rowwise(lambda t, p: 100 * accuracy_score(t, p)), n_boot=100)
    assert ci.value == pytest.approx(75.0) and ci.low <= 75.0 <= ci.high


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(y_true=["a"], y_pred=[]), "samples"),
        (dict(y_true=[], y_pred=[]), "empty"),
        (dict(y_true=["a"], y_pred=["a"], metric="f2"), "unknown metric"),
        (dict(y_true=["a"], y_pred=["a"], n_boot=-1), "n_boot"),
    ],
)
def test_bootstrap_rejects_bad_input(kwargs, error):
    with pytest.raises(ValueError, match=error):
        bootstrap_ci(**kwargs)


# (b, c, method, p), p worked by hand: exact = 2 * sum_{i<=min} C(n, i) / 2^n; chi2 = (|b-c|-1)^2/(b+c).
MCNEMAR_CASES = [
    (0, 0, "exact", 1.0),
    (1, 0, "exact", 1.0),  # 2 * 1/2
    (5, 0, "exact", 2 / 32),
    (0, 6, "exact", 2 / 64),
    (2, 8, "exact", 2 * (1 + 10 + 45) / 1024),
    (3, 9, "exact", 2 * (1 + 12 + 66 + 220) / 4096),
    (12, 12, "exact", 1.0),
    (20, 5, "chi2", math.erfc(math.sqrt(7.84 / 2))),  # chi2 = 14^2 / 25 = 7.84 -> p = 0.00511
    (30, 10, "chi2", 0.0026631),  # chi2 = 19^2 / 40 = 9.025
    (13, 12, "chi2", 1.0),  # |b - c| - 1 = 0
    (60, 100, "chi2", 0.0020477),  # chi2 = 39^2 / 160 = 9.50625
]


@pytest.mark.parametrize("b,c,method,p", MCNEMAR_CASES)
def test_mcnemar_counts(b, c, method, p):
    result = mcnemar_counts(b, c)
    assert result.method == method
    assert result.p_value == pytest.approx(p, abs=1e-6)


def test_binomial_tail_is_symmetric():
    assert binomial_two_sided(2, 10) == binomial_two_sided(8, 10) == pytest.approx(0.109375)


def test_mcnemar_pairs_by_name_on_the_intersection_only():
    # shared: s1 (A right, B wrong), s2 (both right), s3 (A wrong, B right), s4 (A right, B wrong)
    names_a = ["s1", "s2", "s3", "s4", "only_a"]
    correct_a = [True, True, False, True, False]
    names_b = ["s4", "s3", "s2", "s1", "only_b"]
    correct_b = [False, True, True, False, True]
    result = mcnemar(correct_a, names_a, correct_b, names_b)
    assert (result.n, result.b, result.c) == (4, 2, 1)
    assert result.p_value == pytest.approx(1.0)  # 2 * (1 + 3) / 8 -> capped at 1


def test_mcnemar_rejects_unpaired_or_ambiguous_runs():
    with pytest.raises(ValueError, match="share no sample"):
        mcnemar([True], ["a"], [True], ["b"])
    with pytest.raises(ValueError, match="duplicate"):
        mcnemar([True, False], ["a", "a"], [True], ["a"])
