"""Top-1/top-2, NLL, ECE and one-vs-rest AUC (ger/scoring/answer_metrics.py) on hand-computed cases,
checked against sklearn and numpy called here directly, not through ger."""

import csv
import json
import math

import numpy as np
import pytest
from conftest import make_spec
from sklearn.metrics import log_loss, roc_auc_score

from ger.data.datasets import load_spec
from ger.records import EMPTY, ERROR, OK, UNKNOWN_LABEL, Prediction
from ger.report.reference import read_release
from ger.run.predictions import read_predictions, write_predictions
from ger.scoring.metrics import score
from ger.scoring.views import score_views


def P(gt, ranked, status=OK, probs=None, name=None):
    return Prediction(name or f"s{next(_ids)}", gt, ranked, status, probs=probs)


_ids = iter(range(10**6))


def ranked_by(probs: dict[str, float]) -> list[str]:
    return sorted(probs, key=lambda k: -probs[k])


def test_top2_counts_the_second_candidate_label_and_one_label_answers_keep_top1():
    preds = [
        P("a", ["a", "b"]),  # top-1 hit
        P("b", ["a", "b"]),  # top-2 hit
        P("c", ["a"]),  # one label named: top-2 = top-1 = miss
        P("a", [], EMPTY),  # failed: miss
        P("b", ["c", "zzz", "b"]),  # b is the second candidate label (zzz is none): top-2 hit
        P("a", ["c", "b", "a"]),  # a is third: miss
        P("c", ["b", "zzz"]),  # unmatched second label: miss
        P(
            "b", ["zzz", "b"], UNKNOWN_LABEL
        ),  # top-1 off the set is wrong; b is the first candidate: top-2 hit
    ]
    m = score(preds, make_spec()).answer
    assert (m.n, m.top1, m.top2, m.with_probs) == (8, 12.5, 50.0, 0)
    assert m.nll is None and m.ece is None and m.auc_macro is None and m.auc == {}


def test_top2_in_the_polarity_class_space():
    pol = {"joy": "positive", "awe": "positive", "fear": "negative"}
    sp = make_spec(labels=["joy", "awe", "fear"], scoring="polarity", polarity=pol)
    preds = [P("positive", ["fear", "awe"]), P("negative", ["joy", "awe", "fear"]), P("awe", ["awe"])]
    m = score(preds, sp).answer
    assert m.top1 == round(100 / 3, 2) and m.top2 == round(200 / 3, 2)  # first: right at rank 2


# Four samples over labels a, b, c with the model's probabilities; worked by hand in the comments.
PROBS = [
    ("a", {"a": 0.9, "b": 0.05, "c": 0.05}),  # right, confidence 0.9 (bin 13 of 15)
    ("b", {"a": 0.9, "b": 0.05, "c": 0.05}),  # wrong, 0.9 (bin 13); b is second: a top-2 hit
    ("b", {"a": 0.2, "b": 0.5, "c": 0.3}),  # right, 0.5 (bin 7)
    ("c", {"a": 0.45, "b": 0.3, "c": 0.25}),  # wrong, 0.45 (bin 6); c is third
]
# ECE = 2/4 |0.5 - 0.9| + 1/4 |1 - 0.5| + 1/4 |0 - 0.45| = 0.2 + 0.125 + 0.1125
ECE = 43.75
# AUC by pair counting (ties 1/2): a: positive 0.9 vs negatives 0.9, 0.2, 0.45 -> 2.5/3;
# b: positives 0.05, 0.5 vs negatives 0.05, 0.3 -> 2.5/4; c: positive 0.25 vs 0.05, 0.05, 0.3 -> 2/3
AUC = {"a": 250 / 3, "b": 62.5, "c": 200 / 3}


def prob_preds(rows=PROBS):
    return [P(gt, ranked_by(p), probs=p, name=f"p{i}") for i, (gt, p) in enumerate(rows)]


def test_nll_ece_and_auc_on_a_hand_worked_case():
    m = score(prob_preds(), make_spec()).answer
    assert (m.top1, m.top2, m.with_probs) == (50.0, 75.0, 4)
    by_hand = -(math.log(0.9) + math.log(0.05) + math.log(0.5) + math.log(0.25)) / 4
    truth = [gt for gt, _ in PROBS]
    matrix = [[p[c] for c in "abc"] for _, p in PROBS]
    assert m.nll == pytest.approx(by_hand, abs=1e-4)
    assert m.nll == pytest.approx(log_loss(truth, matrix, labels=list("abc")), abs=1e-4)
    assert m.ece == pytest.approx(ECE, abs=0.01)
    assert m.auc == pytest.approx(AUC, abs=0.01)
    for k, c in enumerate("abc"):
        direct = roc_auc_score([t == c for t in truth], [row[k] for row in matrix])
        assert m.auc[c] == pytest.approx(100 * direct, abs=0.01)
    assert m.auc_macro == pytest.approx(sum(AUC.values()) / 3, abs=0.01)


def numpy_ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """A second ECE: bin b holds (b/bins, (b+1)/bins], found by ceil, the first bin also 0."""
    idx = np.maximum(np.ceil(conf * bins).astype(int) - 1, 0)
    return sum(
        (idx == b).mean() * abs(correct[idx == b].mean() - conf[idx == b].mean())
        for b in range(bins)
        if (idx == b).any()
    )


def test_ece_and_nll_match_a_second_computation_on_random_probabilities():
    rng = np.random.default_rng(3)
    labels = ["a", "b", "c", "d"]
    raw = rng.dirichlet([0.6] * 4, size=200)
    truth = rng.integers(0, 4, size=200)
    rows = [
        (labels[t], dict(zip(labels, map(float, p), strict=True))) for t, p in zip(truth, raw, strict=True)
    ]
    m = score(prob_preds(rows), make_spec(labels=labels)).answer
    correct = raw.argmax(axis=1) == truth
    assert m.ece == pytest.approx(100 * numpy_ece(raw.max(axis=1), correct), abs=0.01)
    assert m.nll == pytest.approx(log_loss(truth, raw, labels=range(4)), abs=1e-4)
    assert m.top1 == pytest.approx(100 * correct.mean(), abs=0.01)


def test_samples_without_probabilities_are_counted_not_dropped():
    preds = [*prob_preds(), P("a", ["b"], name="text"), P("b", [], ERROR, name="failed")]
    m = score(preds, make_spec()).answer
    assert (m.n, m.with_probs) == (6, 4)
    assert m.nll == pytest.approx(score(prob_preds(), make_spec()).answer.nll)  # over the 4 with probs
    assert m.top1 == round(100 * 2 / 6, 2)  # top-k over all 6; the two without probs are misses here
    d = score(preds, make_spec()).to_dict()["answer_metrics"]
    assert (d["n"], d["with_probs"], d["without_probs"], d["ece_bins"]) == (6, 4, 2, 15)


def test_continuous_sets_sum_label_probabilities_into_polarity_and_drop_score_zero():
    labels = ["negative", "weakly negative", "neutral", "weakly positive", "positive"]
    sp = make_spec(labels=labels, scoring="continuous", metrics=["wf1"])
    p1 = dict(zip(labels, [0.1, 0.1, 0.2, 0.3, 0.3], strict=True))  # P(positive) = 0.6
    p2 = dict(zip(labels, [0.3, 0.3, 0.3, 0.05, 0.05], strict=True))  # P(positive) = 0.1 (neutral negative)
    preds = [
        P("1.5", ranked_by(p1), probs=p1),
        P("-2", ranked_by(p2), probs=p2),
        P("0", ["positive"], probs=p1),
    ]
    m = score(preds, sp).answer
    assert (m.n, m.with_probs) == (2, 2)
    assert m.nll == pytest.approx(-(math.log(0.6) + math.log(0.9)) / 2, abs=1e-4)
    assert m.auc == {"positive": 100.0, "negative": 100.0}


def test_the_lenient_view_adds_the_probabilities_of_equivalent_spellings():
    sp = make_spec(
        labels=["happy", "surprised"],
        gt_only_labels=["surprise"],
        lenient_equivalents={"surprise": "surprised"},
    )
    p = {"happy": 0.2, "surprised": 0.8}
    preds = [
        P("surprise", ["surprised", "happy"], probs=p, name="x"),
        P("happy", ["happy"], probs=p, name="y"),
    ]
    main = score_views(preds, sp, None)
    (lenient,) = main.views
    # strict: `surprise` was never offered, P = 0, floored at 1e-15
    assert main.answer.nll == pytest.approx((-math.log(1e-15) - math.log(0.2)) / 2, abs=1e-4)
    assert lenient.answer.nll == pytest.approx(-(math.log(0.8) + math.log(0.2)) / 2, abs=1e-4)
    assert (main.answer.top1, lenient.answer.top1) == (50.0, 100.0)  # x right only when folded
    assert main.to_dict()["views"][1]["answer_metrics"]["nll"] == lenient.answer.nll


@pytest.mark.parametrize(
    ("probs", "message"),
    [
        ({"a": 0.5, "b": 0.2}, "sum to 0.7"),
        ({"a": 0.5, "zz": 0.5}, "'zz', not a label"),
        ({"a": -1}, "probability"),
    ],
)
def test_broken_probabilities_fail_naming_the_sample(probs, message):
    with pytest.raises(ValueError, match=message):
        score([P("a", ["a"], probs=probs, name="bad")], make_spec())


def test_probabilities_round_trip_through_predictions_csv(tmp_path):
    preds = prob_preds()
    write_predictions(tmp_path / "predictions.csv", preds)
    again = read_predictions(tmp_path / "predictions.csv")
    assert score(again, make_spec()).answer == score(preds, make_spec()).answer


def release_top2(path, labels: list[str]) -> float:
    """Top-2 of a released GPT-4V file read with the csv module: the first answer right, or the true
    label among the first two answers that are candidate labels (case-folded)."""
    candidates = {x.casefold() for x in labels}
    rows = list(csv.DictReader(path.open(newline="", encoding="utf-8")))
    hits = 0
    for row in rows:
        words = [w.strip().casefold() for w in row["gpt4v"].split(",")]
        gt = row["gt"].strip().casefold()
        hits += words[0] == gt or gt in [w for w in words if w in candidates][:2]
    return round(100 * hits / len(rows), 2)


@pytest.mark.parametrize(
    ("key", "variant"),
    [("ckplus", ""), ("rafdb", "grey"), ("enterface", "3"), ("samm", ""), ("mer2023", "multi")],
)
def test_top2_of_the_gpt4v_release_matches_a_reading_with_the_csv_module(reference_dir, key, variant):
    spec = load_spec(key)
    path = reference_dir / spec.reference.folder / spec.reference.files[variant]
    s = score(read_release(path, spec), spec, variant)
    assert s.answer.top2 == release_top2(path, spec.labels)
    assert s.answer.top1 == s.values[spec.main_metric] < s.answer.top2


def test_run_files_add_answer_metrics_beside_the_existing_keys(tmp_path):
    from omegaconf import OmegaConf

    from ger.run.ask import AskStats
    from ger.run.run_files import write_run_files

    spec, preds = make_spec(), [*prob_preds(), P("a", ["b"], name="text")]
    result = score_views(preds, spec, None)
    cfg = OmegaConf.create({"model": {"name": "tiny"}, "backend": {"name": "hf"}})
    meta = write_run_files(tmp_path, cfg, spec, preds, result, [], AskStats(sent=5))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(meta))
    old = {
        "dataset",
        "test_set",
        "variant",
        "n",
        "parse_failures",
        "parse_failure_rate",
        "dropped_zero_scores",
    }
    old |= {
        "scores",
        "views",
        "notes",
        "per_class_recall",
        "confusion",
        "model",
        "backend",
        "overrides",
        "requests",
    }
    assert set(saved) == old | {"answer_metrics", "answer"}  # answer: the mode (ger/answers/modes.py)
    assert [r["metric"] for r in saved["scores"]] == ["acc"]  # the set's metrics only, as before
    am = saved["answer_metrics"]
    assert (am["n"], am["with_probs"], am["without_probs"], am["top1"]) == (5, 4, 1, 40.0)
    assert saved["views"][0]["answer_metrics"] == am
    report = (tmp_path / "report.md").read_text()
    assert "- top-1 40.00%, top-2 60.00%" in report
    assert "label probabilities for 4 of 5 samples (80.0%" in report and f"NLL {am['nll']:.4f} nats" in report
    assert "AUC % per class: a 83.33, b 62.50, c 66.67" in report
