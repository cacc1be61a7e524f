"""The paper's scoring rules applied: predictions -> Outcome -> Score.

Top-1 of the ranked list, folded for case and whitespace, then the dataset's rule
(the registry in ger/scoring/rules.py, named by the dataset YAML's `scoring`):
plain (label equality), polarity (Abstract/ArtPhoto: the emotion's polarity against
the polarity label) or continuous (CMU-MOSI/CH-SIMS: drop score 0, positive iff > 0,
prediction positive iff `positive`/`weakly positive`). A prediction whose top-1 is
outside the label set, or that is empty or missing, is kept and scored wrong. Beside the
set's metrics every Score carries top-1/top-2 and, for answers with probabilities, NLL, ECE
and AUC (ger/scoring/answer_metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ger.answers.matching import LabelMatcher
from ger.records import OK, UNKNOWN_LABEL, Prediction
from ger.scoring.answer_metrics import TOP_K, AnswerMetrics, answer_metrics, class_probs
from ger.scoring.rules import (
    DROPPED,
    INVALID,
    METRICS,
    POSITIVE_ANSWERS,
    ClassReader,
    check_metric,
    confusion_matrix,
    rule_for,
    strict_matcher,
)

if TYPE_CHECKING:
    from ger.data.datasets import DatasetSpec

__all__ = ["INVALID", "POSITIVE_ANSWERS", "Outcome", "Score", "outcome", "score", "score_outcome"]


@dataclass
class Outcome:
    """Predictions mapped into the label space the metric is computed in."""

    names: list[str]
    y_true: list[str]
    y_pred: list[str]
    classes: list[str]  # the label space, in the dataset's order
    failures: int  # predictions with a status other than ok (counted, scored wrong)
    dropped: int = 0  # continuous scoring: samples whose score is exactly 0
    # Per sample, beside y_true: the first TOP_K ranked candidate labels as classes ([]: failed) and
    # the probability of each class (likelihood answers; None for text answers). See answer_metrics.py.
    ranked: list[list[str]] = field(default_factory=list)
    probs: list[dict[str, float] | None] = field(default_factory=list)


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
    answer: AnswerMetrics | None = None  # top-1/top-2, and NLL/ECE/AUC for answers with probabilities

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
            **({"answer_metrics": self.answer.to_dict()} if self.answer else {}),
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
            **({"answer_metrics": self.answer.to_dict()} if self.answer else {}),
        }


def _usable_top1(pred: Prediction, matcher: LabelMatcher) -> str | None:
    if pred.status != OK or not pred.ranked:
        return None
    return matcher.match(pred.top1)


# Answers whose ranked list was read: top-k ranks their candidate labels even when top-1 is off the set.
READ = (OK, UNKNOWN_LABEL)


def _ranked_classes(pred: Prediction, matcher: LabelMatcher, to_class: ClassReader) -> list[str]:
    """The answer's first TOP_K candidate labels, as classes (words off the label set are skipped)."""
    out: list[str] = []
    for x in pred.ranked:
        if len(out) == TOP_K:  # only what top-k reads: scoring 40k release answers stays fast
            break
        if (m := matcher.match(x)) is not None:
            out.append(to_class(m))
    return out


def outcome(preds: list[Prediction], spec: DatasetSpec) -> Outcome:
    """Apply the dataset's scoring rule (ger/scoring/rules.py; see module docstring)."""
    rule = rule_for(spec)
    read_truth, to_class = rule.truth_reader(spec), rule.class_reader(spec)
    # ground truth and stored top-1 are already label spellings: the paper's strict matching, no folding
    matcher = strict_matcher(spec.labels)
    out = Outcome([], [], [], rule.classes(spec), 0)
    ranked: dict[tuple[str, ...], list[str]] = {}
    for p in preds:
        truth = read_truth(p.gt)
        if truth is None:
            raise ValueError(f"{spec.key}: ground truth {p.gt!r} of {p.name!r} {rule.invalid(spec)}")
        if truth == DROPPED:
            out.dropped += 1
            continue
        top = _usable_top1(p, matcher)
        out.failures += top is None
        out.names.append(p.name)
        out.y_true.append(truth)
        out.y_pred.append(to_class(top) if top is not None else rule.unusable(truth))
        if p.status in READ:
            key = tuple(p.ranked)  # answers repeat orderings: read each one once
            if key not in ranked:
                ranked[key] = _ranked_classes(p, matcher, to_class)
            out.ranked.append(ranked[key])
        else:
            out.ranked.append([])
        out.probs.append(None if p.probs is None else class_probs(p, spec, matcher, to_class, out.classes))
    return out


def metric_value(metric: str, y_true: list[str] | np.ndarray, y_pred: list[str] | np.ndarray) -> float:
    """One metric of the registry (ger/scoring/rules.py METRICS) in percent. UAR averages recall over
    the classes present in y_true."""
    check_metric(metric)
    return 100.0 * METRICS[metric](y_true, y_pred)


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
    values = {m: round(metric_value(m, out.y_true, out.y_pred), 2) for m in spec.metrics}
    cols = out.classes + ([INVALID] if INVALID in out.y_pred else [])
    matrix = confusion_matrix(out.y_true, out.y_pred, cols)[: len(out.classes)]
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
        answer=answer_metrics(out),
    )
