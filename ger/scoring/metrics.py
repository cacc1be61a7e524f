"""The paper's scoring rules.

Top-1 of the ranked list, folded for case and whitespace, then the dataset's rule:
plain (label equality), polarity (Abstract/ArtPhoto: the emotion's polarity against
the polarity label) or continuous (CMU-MOSI/CH-SIMS: drop score 0, positive iff > 0,
prediction positive iff `positive`/`weakly positive`). A prediction whose top-1 is
outside the label set, or that is empty or missing, is kept and scored wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ger.answers.parse import LabelMatcher, normalise
from ger.data.datasets import DatasetSpec
from ger.records import OK, Prediction

INVALID = "(invalid)"  # stands in for any unusable prediction: never equal to a true label
POSITIVE_ANSWERS = ("positive", "weakly positive")


@dataclass
class Outcome:
    """Predictions mapped into the label space the metric is computed in."""

    names: list[str]
    y_true: list[str]
    y_pred: list[str]
    classes: list[str]  # the label space, in the dataset's order
    failures: int  # predictions with a status other than ok (counted, scored wrong)
    dropped: int = 0  # continuous scoring: samples whose score is exactly 0


@dataclass
class Score:
    dataset: str
    variant: str
    values: dict[str, float]  # metric -> percent
    n: int
    failures: int
    per_class_recall: dict[str, float] = field(default_factory=dict)
    confusion_labels: list[str] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)
    paper: dict[str, float] = field(default_factory=dict)
    dropped: int = 0
    test_set: str = ""  # the conf/dataset key (differs from `dataset` only for Twitter I's subsets)
    # Which view of the run this is (ger/scoring/views.py): the rows scored and how labels are compared.
    rows: str = "all"  # all: every test sample | paper: only the rows of the paper's release file
    labels: str = "strict"  # strict: the paper's string equality | lenient: the dataset's equivalences
    views: list[Score] = field(default_factory=list)  # the other views of the same run
    notes: list[str] = field(default_factory=list)  # why a view is absent, where the paper's rows came from

    @property
    def parse_failure_rate(self) -> float:
        return round(100.0 * self.failures / self.n, 2) if self.n else 0.0

    def records(self) -> list[dict[str, Any]]:
        """Rows of results.json: one per metric."""
        return [
            {
                "dataset": self.dataset,
                "variant": self.variant,
                "metric": m,
                "value": v,
                "n": self.n,
                "paper": self.paper.get(m),
            }
            for m, v in self.values.items()
        ]

    def view_dict(self) -> dict[str, Any]:
        """One entry of metrics.json "views": which rows and label equality, and what they score."""
        return {
            "rows": self.rows,
            "labels": self.labels,
            "n": self.n,
            "parse_failures": self.failures,
            "dropped_zero_scores": self.dropped,
            "values": dict(self.values),
        }

    def to_dict(self) -> dict[str, Any]:
        every = [self, *self.views]
        return {
            "dataset": self.dataset,
            "test_set": self.test_set or self.dataset,
            "variant": self.variant,
            "n": self.n,
            "parse_failures": self.failures,
            "parse_failure_rate": self.parse_failure_rate,
            "dropped_zero_scores": self.dropped,
            "scores": [{**r, "rows": v.rows, "labels": v.labels} for v in every for r in v.records()],
            "views": [v.view_dict() for v in every],
            "notes": list(self.notes),
            "per_class_recall": self.per_class_recall,
            "confusion": {"labels": self.confusion_labels, "matrix": self.confusion},
        }


def _usable_top1(pred: Prediction, matcher: LabelMatcher) -> str | None:
    if pred.status != OK or not pred.ranked:
        return None
    return matcher.match(pred.top1)


def _plain(preds: list[Prediction], spec: DatasetSpec) -> Outcome:
    # ground truth and stored top-1 are already label spellings: the paper's strict matching, no folding
    matcher, gt_matcher = LabelMatcher(spec.labels, strict=True), LabelMatcher(spec.gt_labels, strict=True)
    y_true, y_pred, failures = [], [], 0
    for p in preds:
        gt = gt_matcher.match(p.gt)
        if gt is None:
            raise ValueError(
                f"{spec.key}: ground truth {p.gt!r} of {p.name!r} is not in the label set {spec.gt_labels}"
            )
        top = _usable_top1(p, matcher)
        failures += top is None
        y_true.append(gt)
        y_pred.append(top if top is not None else INVALID)
    return Outcome([p.name for p in preds], y_true, y_pred, spec.gt_labels, failures)


def _polarity(preds: list[Prediction], spec: DatasetSpec) -> Outcome:
    assert spec.polarity is not None
    matcher = LabelMatcher(spec.labels, strict=True)
    polarity = {normalise(k): v for k, v in spec.polarity.items()}
    y_true, y_pred, failures = [], [], 0
    for p in preds:
        gt = normalise(p.gt)
        gt = gt if gt in ("positive", "negative") else polarity.get(gt)
        if gt is None:
            raise ValueError(f"{spec.key}: ground truth {p.gt!r} of {p.name!r} has no polarity")
        top = _usable_top1(p, matcher)
        failures += top is None
        y_true.append(gt)
        y_pred.append(polarity[normalise(top)] if top is not None else INVALID)
    return Outcome([p.name for p in preds], y_true, y_pred, ["positive", "negative"], failures)


def _continuous(preds: list[Prediction], spec: DatasetSpec) -> Outcome:
    matcher = LabelMatcher(spec.labels, strict=True)
    names, y_true, y_pred, failures, dropped = [], [], [], 0, 0
    for p in preds:
        try:
            value = float(p.gt)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):  # nan/inf are no sentiment (and nan > 0 is False: "negative")
            raise ValueError(f"{spec.key}: ground truth {p.gt!r} of {p.name!r} is not a finite number")
        if value == 0:
            dropped += 1
            continue
        truth = "positive" if value > 0 else "negative"
        top = _usable_top1(p, matcher)
        failures += top is None
        names.append(p.name)
        y_true.append(truth)
        if top is None:
            y_pred.append("negative" if truth == "positive" else "positive")  # scored wrong, never dropped
        else:
            y_pred.append("positive" if normalise(top) in POSITIVE_ANSWERS else "negative")
    return Outcome(names, y_true, y_pred, ["positive", "negative"], failures, dropped)


_RULES = {"plain": _plain, "polarity": _polarity, "continuous": _continuous}


def outcome(preds: list[Prediction], spec: DatasetSpec) -> Outcome:
    """Apply the dataset's scoring rule (see module docstring)."""
    return _RULES[spec.scoring](preds, spec)


def metric_value(metric: str, y_true: list[str] | np.ndarray, y_pred: list[str] | np.ndarray) -> float:
    """One metric in percent. UAR averages recall over the classes present in y_true."""
    from sklearn.metrics import accuracy_score, f1_score, recall_score  # lazy: ~2 s of imports

    if metric in ("acc", "war"):
        value = accuracy_score(y_true, y_pred)
    elif metric == "uar":
        present = sorted(set(np.asarray(y_true).tolist()))
        value = recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    elif metric == "wf1":
        value = f1_score(y_true, y_pred, average="weighted", zero_division=0)
    else:
        raise ValueError(f"unknown metric {metric!r}; expected one of acc, war, uar, wf1")
    return 100.0 * float(value)


def correct_vector(preds: list[Prediction], spec: DatasetSpec) -> tuple[np.ndarray, list[str]]:
    """Per-sample correctness under the dataset's rule, with the names kept (for paired tests)."""
    out = outcome(preds, spec)
    return np.asarray(out.y_true) == np.asarray(out.y_pred), out.names


def score(preds: list[Prediction], spec: DatasetSpec, variant: str = "") -> Score:
    """All of the dataset's metrics, per-class recall and the confusion matrix."""
    if not preds:
        raise ValueError(f"{spec.key}: nothing to score")
    return score_outcome(outcome(preds, spec), spec, variant)


def score_outcome(out: Outcome, spec: DatasetSpec, variant: str = "") -> Score:
    """score() on an Outcome already mapped into the metric's label space (ger/scoring/views.py folds it)."""
    from sklearn.metrics import confusion_matrix

    values = {m: round(metric_value(m, out.y_true, out.y_pred), 2) for m in spec.metrics}
    cols = out.classes + ([INVALID] if INVALID in out.y_pred else [])
    matrix = confusion_matrix(out.y_true, out.y_pred, labels=cols)[: len(out.classes)]
    support = matrix.sum(axis=1)
    recall = {c: round(100.0 * matrix[i, i] / support[i], 2) for i, c in enumerate(out.classes) if support[i]}
    paper = spec.paper.gpt4v if (spec.reference is None or variant == spec.reference.paper_variant) else {}
    return Score(
        spec.key,
        variant,
        values,
        len(out.y_true),
        out.failures,
        recall,
        cols,
        matrix.tolist(),
        dict(paper),
        out.dropped,
        spec.key,
    )
