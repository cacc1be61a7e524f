"""The scoring-rule registry (ger/scoring/rules.py): one reading of ground truth for checks and scoring."""

import pytest
from conftest import make_spec

from ger.data.datasets import all_specs, load_spec, spec_from_dict
from ger.data.validate import check_labels
from ger.records import OK, Prediction, Sample
from ger.scoring import rules
from ger.scoring.metrics import outcome, score

GTS = ["1.2", "-0.4", "0", "nan", "", "positive", "Negative", "Amusement", "amusement", "Sads", "Sad"]
GTS += ["surprise", "surprised", "Surprised", "happy", "zz"]


@pytest.mark.parametrize("key", ["cmumosi", "abstract", "mer2023", "dfew", "twitter2"])
def test_label_checks_reject_exactly_the_ground_truths_scoring_cannot_read(key):
    spec = load_spec(key)
    report = check_labels(spec, [Sample(key, f"n{i}", gt, line=i + 2) for i, gt in enumerate(GTS)])
    flagged = {line.split(": ", 2)[2].split(" is not ")[0] for line in report.bad_labels}
    unreadable = set()
    for gt in GTS:
        try:
            outcome([Prediction("x", gt, [spec.labels[0]], OK)], spec)
        except ValueError:
            unreadable.add(repr(gt))
    assert flagged == unreadable  # the same rule object decides both
    assert flagged and len(flagged) < len(GTS)  # GTS holds valid and invalid ground truths for each set


def test_every_dataset_yaml_names_a_registered_rule_and_metrics():
    for spec in all_specs(include_demo=True):
        assert spec.scoring in rules.RULES and set(spec.metrics) <= set(rules.METRICS)


def test_an_unknown_rule_or_metric_fails_listing_the_registered_ones():
    data = {"key": "x", "task": "facial", "modality": "image", "labels": ["a"], "metrics": ["acc"]}
    data |= {"prompt": "facial", "batch_size": 1}
    with pytest.raises(ValueError, match=r"dataset x: unknown scoring 'votes'; expected one of \['plain'"):
        spec_from_dict({**data, "scoring": "votes"})
    with pytest.raises(ValueError, match=r"unknown metric 'f2'; expected one of \['acc', 'war'"):
        spec_from_dict({**data, "scoring": "plain", "metrics": ["f2"]})
    with pytest.raises(ValueError, match="needs a `polarity` map"):
        spec_from_dict({**data, "scoring": "polarity"})


class Parity(rules.ScoringRule):
    """A rule made for this test: gt is an integer, labels `even`/`odd` are answers about it."""

    name = "parity"

    def classes(self, spec):
        return ["even", "odd"]

    def expected(self, spec):
        return "an integer"

    def truth_reader(self, spec):
        return lambda gt: ("odd" if int(gt) % 2 else "even") if gt.lstrip("-").isdigit() else None

    def class_reader(self, spec):
        return lambda label: label


def test_a_new_rule_is_one_registry_entry_used_by_yaml_checks_and_scoring(monkeypatch):
    monkeypatch.setitem(rules.RULES, "parity", Parity())
    data = {"key": "p", "task": "facial", "modality": "image", "labels": ["even", "odd"], "metrics": ["acc"]}
    spec = spec_from_dict({**data, "scoring": "parity", "prompt": "facial", "batch_size": 1})
    report = check_labels(spec, [Sample("p", "a", "4", line=2), Sample("p", "b", "x", line=3)], "l.csv")
    assert report.bad_labels == ["l.csv:3: b: 'x' is not an integer"]
    preds = [Prediction("a", "4", ["even"]), Prediction("b", "7", ["even"]), Prediction("c", "3", ["odd"])]
    assert score(preds, spec).values == {"acc": round(200 / 3, 2)}
    with pytest.raises(ValueError, match="'x' of 'd' is not an integer"):
        score([Prediction("d", "x", ["odd"])], spec)


def test_make_spec_default_is_the_plain_rule():
    assert isinstance(rules.rule_for(make_spec()), rules.Plain)
