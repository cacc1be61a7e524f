"""Metrics every run can show beside the test set's own: top-1/top-2 accuracy, and for answers with
probabilities (likelihood mode) the mean negative log-likelihood, expected calibration error and
one-vs-rest ROC AUC per class.

Everything is computed in the scoring rule's class space (ger/scoring/rules.py), over the samples
the rule keeps (continuous sets drop score 0), in the same view as the test set's metrics:

- top-k (percent): a sample is a hit when its top-1 is right (the set's accuracy, the paper's rule:
  an answer whose first word is off the label set is wrong) or when one of the first k candidate
  labels the answer ranks, read as a class by the rule, is the true class. Words off the label set
  are no candidates and are skipped (as ger's parser skips them after rank 1). An empty, missing or
  failed answer is a miss; an answer that names one label only has top-2 = top-1.
- class probabilities: a likelihood answer's `Prediction.probs` (label -> probability over the
  label set) summed into classes (Abstract's emotions into polarities, MOSI's five labels into
  positive/negative, the lenient view's equivalents into one class). Probabilities are used whatever
  the answer's status; samples without them (text answers, failed requests) are never dropped
  silently: `with_probs` / `n` is the coverage, and NLL, ECE and AUC are over those samples only.
- NLL (nats per sample): mean of -log P(true class), P clipped below at 1e-15 (a true class the
  model was never offered, MER2023's strict `surprise`, counts -log 1e-15 = 34.5).
- ECE (percent): 15 equal-width bins on the top-1 class probability (bin b holds (b/15, (b+1)/15],
  the first also 0); sum over bins of (samples in bin / samples) x |accuracy - mean probability|,
  where the top-1 class is the most probable one (the first in class order on a tie).
- AUC (percent): per class, roc_auc_score(true class == c, P(c)) over the samples with probs; None
  where c is never or always the true class there; `auc_macro` is the mean of the defined ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ger.scoring.rules import ClassReader

if TYPE_CHECKING:
    from ger.answers.matching import LabelMatcher
    from ger.data.datasets import DatasetSpec
    from ger.records import Prediction
    from ger.scoring.metrics import Outcome

ECE_BINS = 15
TOP_K = 2  # the largest k reported (top-1, top-2): the paper's prompt asks for a ranking of the labels
NLL_FLOOR = 1e-15
SUM_TOLERANCE = 1e-3  # a probs column summing further from 1 is a broken file, not rounding


@dataclass(frozen=True)
class AnswerMetrics:
    """Top-k for every run; NLL, ECE and AUC over the samples with probabilities (None without any)."""

    n: int
    top1: float  # percent
    top2: float  # percent
    with_probs: int  # samples whose answer carries probabilities (coverage = with_probs / n)
    nll: float | None = None  # nats per sample
    ece: float | None = None  # percent
    auc_macro: float | None = None  # percent
    auc: dict[str, float | None] = field(default_factory=dict)  # percent per class

    def to_dict(self) -> dict[str, Any]:
        """metrics.json "answer_metrics" (and each view's): units in the key's comment of the module doc."""
        return {
            "n": self.n,
            "top1": self.top1,
            "top2": self.top2,
            "with_probs": self.with_probs,
            "without_probs": self.n - self.with_probs,
            "nll": self.nll,
            "ece": self.ece,
            "ece_bins": ECE_BINS,
            "auc_macro": self.auc_macro,
            "auc": dict(self.auc),
        }


def class_probs(
    pred: Prediction, spec: DatasetSpec, matcher: LabelMatcher, to_class: ClassReader, classes: list[str]
) -> dict[str, float] | None:
    """The answer's label probabilities summed into the rule's classes, or None for a text answer."""
    if pred.probs is None:
        return None
    out = dict.fromkeys(classes, 0.0)
    total = 0.0
    for label, prob in pred.probs.items():
        matched = matcher.match(label)
        if matched is None:
            raise ValueError(
                f"{spec.key}: probs of {pred.name!r} name {label!r}, not a label of {spec.labels}"
            )
        if not (isinstance(prob, (int, float)) and math.isfinite(prob) and prob >= 0):
            raise ValueError(f"{spec.key}: probs of {pred.name!r}: {label!r} has probability {prob!r}")
        out[to_class(matched)] += float(prob)
        total += float(prob)
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise ValueError(f"{spec.key}: probs of {pred.name!r} sum to {total:.6g}, not 1 over the label set")
    return {c: p / total for c, p in out.items()}


def top_k_hits(out: Outcome, k: int) -> np.ndarray:
    """Per kept sample: top-1 right, or the true class among the first k candidate classes ranked."""
    right = np.asarray(out.y_true, dtype=object) == np.asarray(out.y_pred, dtype=object)
    if k == 1:
        return right
    more = [t in r[:k] for t, r in zip(out.y_true, out.ranked or [[]] * len(out.y_true), strict=True)]
    return right | np.asarray(more, dtype=bool)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE as a fraction: equal-width bins on confidence, (b/bins, (b+1)/bins] (see module doc)."""
    which = np.digitize(confidence, np.linspace(0.0, 1.0, bins + 1)[1:-1], right=True)
    total = 0.0
    for b in np.unique(which):
        inside = which == b
        total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def one_vs_rest_auc(truth: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, float | None]:
    """ROC AUC (fraction) of P(c) for "true class is c", per class; None where it is undefined."""
    from sklearn.metrics import roc_auc_score  # lazy: ~2 s of imports

    out: dict[str, float | None] = {}
    for k, c in enumerate(classes):
        positive = truth == k
        out[c] = float(roc_auc_score(positive, probs[:, k])) if 0 < positive.sum() < len(truth) else None
    return out


def answer_metrics(out: Outcome) -> AnswerMetrics:
    """Top-1/top-2 over every kept sample; NLL, ECE and AUC over those with probabilities."""
    n = len(out.y_true)
    top1, top2 = (round(100.0 * float(top_k_hits(out, k).mean()), 2) if n else 0.0 for k in (1, 2))
    have = [i for i, p in enumerate(out.probs) if p is not None]
    if not have:
        return AnswerMetrics(n, top1, top2, 0)
    index = {c: k for k, c in enumerate(out.classes)}
    probs = np.array([[out.probs[i][c] for c in out.classes] for i in have], dtype=float)  # type: ignore[index]
    truth = np.array([index[out.y_true[i]] for i in have])
    nll = float(-np.log(np.clip(probs[np.arange(len(have)), truth], NLL_FLOOR, 1.0)).mean())
    ece = expected_calibration_error(probs.max(axis=1), probs.argmax(axis=1) == truth)
    auc = one_vs_rest_auc(truth, probs, out.classes)
    defined = [v for v in auc.values() if v is not None]
    macro = round(100.0 * float(np.mean(defined)), 2) if defined else None
    auc_pct = {c: None if v is None else round(100.0 * v, 2) for c, v in auc.items()}
    return AnswerMetrics(n, top1, top2, len(have), round(nll, 4), round(100.0 * ece, 2), macro, auc_pct)


def markdown_lines(m: AnswerMetrics | None) -> list[str]:
    """report.md lines: top-k always; coverage, NLL, ECE and AUC when any answer had probabilities."""
    if m is None:
        return []
    lines = [f"- top-1 {m.top1:.2f}%, top-2 {m.top2:.2f}% (top-2: the true class among the first two labels)"]
    if not m.with_probs:
        return [*lines, f"- label probabilities: none of the {m.n} answers has them (text answers)"]
    share = 100.0 * m.with_probs / m.n if m.n else 0.0
    macro = f"{m.auc_macro:.2f}%" if m.auc_macro is not None else "–"
    lines.append(
        f"- label probabilities for {m.with_probs} of {m.n} samples ({share:.1f}%; NLL, ECE and AUC over "
        f"those): NLL {m.nll:.4f} nats, ECE {m.ece:.2f}% ({ECE_BINS} equal-width bins), one-vs-rest AUC "
        f"macro {macro}"
    )
    cells = [f"{c} {v:.2f}" if v is not None else f"{c} –" for c, v in m.auc.items()]
    return [*lines, "- AUC % per class: " + ", ".join(cells)]
