"""The paper's scoring rules on small hand-computed cases."""

import pytest
from conftest import make_spec

from ger.records import EMPTY, OK, UNKNOWN_LABEL, Prediction
from ger.scoring.metrics import INVALID, metric_value, score

spec = make_spec


def P(gt, ranked, status=OK, name=None):
    return Prediction(name or f"{gt}-{ranked}-{id(ranked)}", gt, ranked, status)


def test_accuracy_uses_top1_and_folds_case():
    preds = [P("a", ["A", "b"]), P("b", ["a", "b"]), P("c", [" c "]), P("a", ["a"])]
    assert score(preds, spec()).values == {"acc": 75.0}


def test_failures_are_kept_and_scored_wrong():
    preds = [P("a", ["a"]), P("b", [], EMPTY), P("c", ["zzz"], UNKNOWN_LABEL), P("a", ["a"])]
    s = score(preds, spec())
    assert s.values == {"acc": 50.0} and s.n == 4 and s.failures == 2 and s.parse_failure_rate == 50.0
    assert s.confusion_labels == ["a", "b", "c", INVALID]
    assert s.confusion == [[2, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]]


def test_war_and_uar():
    # class a: 3 samples, 3 right; class b: 1 sample, 0 right -> WAR 75, UAR (100 + 0) / 2 = 50
    preds = [P("a", ["a"]), P("a", ["a"]), P("a", ["a"]), P("b", ["a"])]
    s = score(preds, spec(metrics=["war", "uar"]))
    assert s.values == {"war": 75.0, "uar": 50.0}
    assert s.per_class_recall == {"a": 100.0, "b": 0.0}


def test_polarity_rule():
    pol = {"joy": "positive", "awe": "positive", "fear": "negative"}
    sp = spec(labels=["joy", "awe", "fear"], scoring="polarity", polarity=pol)
    preds = [P("positive", ["awe"]), P("joy", ["joy"]), P("negative", ["joy"]), P("fear", ["Fear"])]
    assert score(preds, sp).values == {"acc": 75.0}  # gt given as polarity or as emotion


def test_continuous_rule_drops_zero_and_counts_weakly_positive():
    labels = ["negative", "weakly negative", "neutral", "weakly positive", "positive"]
    sp = spec(labels=labels, scoring="continuous", metrics=["wf1"])
    preds = [
        P("1.2", ["weakly positive"]),  # pos -> pos
        P("-0.4", ["neutral"]),  # neg -> neutral counts negative: right
        P("0.0", ["positive"]),  # dropped
        P("2.0", ["neutral"]),  # pos -> neg: wrong
    ]
    s = score(preds, sp)
    # y_true = [p, n, p], y_pred = [p, n, n]: F1(p) = 2/3 (support 2), F1(n) = 2/3 (support 1) -> 66.67
    assert s.n == 3 and s.dropped == 1 and s.values == {"wf1": 66.67}


def test_metric_value_rejects_unknown_metric():
    with pytest.raises(ValueError, match="expected one of"):
        metric_value("f2", ["a"], ["a"])


def test_gt_outside_label_set_is_an_error():
    with pytest.raises(ValueError, match="not in the label set"):
        score([P("z", ["a"])], spec())
