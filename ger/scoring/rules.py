"""The scoring-rule registry: how a test set's ground truth is read and how its answers are scored.

A dataset YAML names its rule (`scoring: plain | polarity | continuous`) and its metrics
(`metrics: [acc] | [war, uar] | [wf1]`). Each rule says, in one place, used by both the label-list
checks (ger/data/validate.py) and the scoring (ger/scoring/metrics.py):

- which ground-truth texts are valid, and what a valid one is (for the error message);
- the class space the metric is computed in, and which class a ground truth is (or that it is left out);
- which class each label of the set counts as, when the model answers it;
- what an unusable answer counts as (always a wrong class, never dropped).

The rules reproduce the paper's (shared/reference/PROTOCOL.md, "Scoring"): plain label equality,
the polarity of Abstract/ArtPhoto's emotions, and CMU-MOSI/CH-SIMS's continuous scores (score 0
dropped, positive iff > 0, `positive`/`weakly positive` answers positive). A new rule is a subclass
registered with `@register`; a new metric an entry of METRICS.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ger.answers.matching import LabelMatcher, normalise

if TYPE_CHECKING:
    from ger.data.datasets import DatasetSpec

INVALID = "(invalid)"  # stands in for any unusable prediction: never equal to a true label
DROPPED = "(dropped)"  # a ground truth the rule leaves out of the score (continuous: score exactly 0)
POSITIVE_ANSWERS = ("positive", "weakly positive")
POLARITIES = ["positive", "negative"]

TruthReader = Callable[[str], str | None]  # gt text -> class, DROPPED, or None (not a valid gt)
ClassReader = Callable[[str], str]  # a label of the set (as matched) -> the class it counts as


class ScoringRule:
    """How one kind of test set is scored; subclasses fill in the reading of gt and labels."""

    name: ClassVar[str] = ""

    def check_spec(self, data: dict[str, Any], key: str) -> None:
        """Raise ValueError for a dataset YAML this rule cannot score (called when the YAML loads)."""

    def classes(self, spec: DatasetSpec) -> list[str]:
        """The label space the metric is computed in, in a fixed order."""
        raise NotImplementedError

    def expected(self, spec: DatasetSpec) -> str:
        """What a valid ground truth is, for the label-list checks ("... is not <expected>")."""
        raise NotImplementedError

    def invalid(self, spec: DatasetSpec) -> str:
        """What is wrong with an invalid ground truth, for the scoring error ("gt 'x' of 'y' <invalid>")."""
        return f"is not {self.expected(spec)}"

    def truth_reader(self, spec: DatasetSpec) -> TruthReader:
        raise NotImplementedError

    def class_reader(self, spec: DatasetSpec) -> ClassReader:
        raise NotImplementedError

    def unusable(self, truth: str) -> str:
        """The class an unusable answer (failed, empty, unknown label) is scored as: a wrong one."""
        return INVALID


RULES: dict[str, ScoringRule] = {}


def register(cls: type[ScoringRule]) -> type[ScoringRule]:
    """Class decorator: add a rule to the registry under its `name`."""
    if not cls.name or cls.name in RULES:
        raise ValueError(f"scoring rule {cls.__name__}: name {cls.name!r} is empty or already registered")
    RULES[cls.name] = cls()
    return cls


def rule_named(name: str, key: str = "") -> ScoringRule:
    """The registered rule `name`; an unknown one fails listing the valid names."""
    if name not in RULES:
        where = f"dataset {key}: " if key else ""
        raise ValueError(f"{where}unknown scoring {name!r}; expected one of {list(RULES)}")
    return RULES[name]


def rule_for(spec: DatasetSpec) -> ScoringRule:
    return rule_named(spec.scoring, spec.key)


def strict_matcher(labels: list[str]) -> LabelMatcher:
    """The paper's label reading (case, whitespace, a plural `s`), for label lists and stored answers."""
    return LabelMatcher(labels, strict=True)


@register
class Plain(ScoringRule):
    """Label equality in the set's own spelling; MER2023's gt-only `surprise` is a class of its own."""

    name = "plain"

    def classes(self, spec: DatasetSpec) -> list[str]:
        return spec.gt_labels

    def expected(self, spec: DatasetSpec) -> str:
        return f"one of {spec.gt_labels}"

    def invalid(self, spec: DatasetSpec) -> str:
        return f"is not in the label set {spec.gt_labels}"

    def truth_reader(self, spec: DatasetSpec) -> TruthReader:
        return strict_matcher(spec.gt_labels).match  # a label list spells its classes exactly

    def class_reader(self, spec: DatasetSpec) -> ClassReader:
        return lambda label: label


@register
class Polarity(ScoringRule):
    """Abstract/ArtPhoto: the answered emotion's polarity against the polarity (or emotion) label."""

    name = "polarity"

    def check_spec(self, data: dict[str, Any], key: str) -> None:
        if not data.get("polarity"):
            raise ValueError(f"dataset {key}: scoring 'polarity' needs a `polarity` map")

    def classes(self, spec: DatasetSpec) -> list[str]:
        return list(POLARITIES)

    def expected(self, spec: DatasetSpec) -> str:
        return f"one of {spec.gt_labels}"

    def invalid(self, spec: DatasetSpec) -> str:
        return "has no polarity"

    def _polarity(self, spec: DatasetSpec) -> dict[str, str]:
        assert spec.polarity is not None
        return {normalise(k): v for k, v in spec.polarity.items()}

    def truth_reader(self, spec: DatasetSpec) -> TruthReader:
        polarity = self._polarity(spec)

        def read(gt: str) -> str | None:
            key = normalise(gt)
            return key if key in POLARITIES else polarity.get(key)  # gt given as polarity or as emotion

        return read

    def class_reader(self, spec: DatasetSpec) -> ClassReader:
        polarity = self._polarity(spec)
        return lambda label: polarity[normalise(label)]


@register
class Continuous(ScoringRule):
    """CMU-MOSI/CH-SIMS: gt a sentiment score; 0 dropped, positive iff > 0; answers positive iff
    `positive`/`weakly positive` (neutral counts negative)."""

    name = "continuous"

    def classes(self, spec: DatasetSpec) -> list[str]:
        return list(POLARITIES)

    def expected(self, spec: DatasetSpec) -> str:
        return "a finite number"

    def truth_reader(self, spec: DatasetSpec) -> TruthReader:
        def read(gt: str) -> str | None:
            try:
                value = float(gt)
            except ValueError:
                return None
            if not math.isfinite(value):  # nan/inf are no sentiment (and nan > 0 is False: "negative")
                return None
            if value == 0:
                return DROPPED
            return "positive" if value > 0 else "negative"

        return read

    def class_reader(self, spec: DatasetSpec) -> ClassReader:
        return lambda label: "positive" if normalise(label) in POSITIVE_ANSWERS else "negative"

    def unusable(self, truth: str) -> str:
        return "negative" if truth == "positive" else "positive"  # scored wrong, never dropped


# --- metrics: name -> fraction in [0, 1] from (y_true, y_pred) in the rule's class space -------------
# Computed with numpy from one confusion matrix, not with sklearn.metrics: importing it (and the scipy
# and pandas it pulls in) costs ~1.2 s, most of a fully cached `ger run`. The arithmetic follows
# sklearn's (>= 1.4) step by step, so the numbers are the same to the last bit (tests/test_metrics_numpy.py
# checks them against sklearn itself).


def confusion_matrix(y_true: Sequence[Any], y_pred: Sequence[Any], labels: Sequence[Any]) -> np.ndarray:
    """Counts of (true, predicted) pairs in `labels`' order, rows = true class; as
    sklearn.metrics.confusion_matrix, a pair with a label outside `labels` is not counted."""
    true, pred = np.asarray(y_true).tolist(), np.asarray(y_pred).tolist()
    if len(true) != len(pred):
        raise ValueError(f"y_true has {len(true)} samples but y_pred has {len(pred)}")
    index = {label: i for i, label in enumerate(labels)}
    t = np.fromiter((index.get(x, -1) for x in true), dtype=np.int64, count=len(true))
    p = np.fromiter((index.get(x, -1) for x in pred), dtype=np.int64, count=len(pred))
    kept = (t >= 0) & (p >= 0)
    k = len(index)
    return np.bincount(t[kept] * k + p[kept], minlength=k * k).reshape(k, k)


def _counts(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label of y_true or y_pred, sorted as sklearn sorts them: true positives, support, predicted."""
    labels = sorted(set(np.asarray(y_true).tolist()) | set(np.asarray(y_pred).tolist()))
    if not labels:
        raise ValueError("no samples to score")
    matrix = confusion_matrix(y_true, y_pred, labels)
    return np.diagonal(matrix), matrix.sum(axis=1), matrix.sum(axis=0)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator as floats, 0 where the denominator is 0 (sklearn's zero_division=0)."""
    den = denominator.astype(np.float64)
    zero = den == 0
    den[zero] = 1.0
    out = numerator.astype(np.float64) / den
    out[zero] = 0.0
    return out


def _accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of samples whose prediction equals the truth (sklearn's accuracy_score)."""
    tp, support, _ = _counts(y_true, y_pred)
    return float(tp.sum() / support.sum())


def _uar(y_true: Any, y_pred: Any) -> float:
    """Mean recall over the classes present in y_true (sklearn's recall_score with labels=present,
    average="macro", zero_division=0; a prediction outside those classes is a miss)."""
    tp, support, _ = _counts(y_true, y_pred)
    present = support > 0
    return float(np.mean(_divide(tp[present], support[present])))


def _weighted_f1(y_true: Any, y_pred: Any) -> float:
    """Support-weighted mean of per-label F1 = 2tp / (support + predicted), over every label of y_true
    or y_pred (one only predicted has weight 0): sklearn's f1_score(average="weighted", zero_division=0)."""
    tp, support, predicted = _counts(y_true, y_pred)
    f1 = _divide(2.0 * tp, support + predicted)
    return float(np.average(f1, weights=support))


METRICS: dict[str, Callable[[Any, Any], float]] = {
    "acc": _accuracy,
    "war": _accuracy,  # weighted average recall = accuracy
    "uar": _uar,
    "wf1": _weighted_f1,
}


def check_metric(metric: str, key: str = "") -> None:
    if metric not in METRICS:
        where = f"dataset {key}: " if key else ""
        raise ValueError(f"{where}unknown metric {metric!r}; expected one of {list(METRICS)}")
