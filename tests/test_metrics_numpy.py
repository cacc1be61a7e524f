"""The run's metrics without sklearn (ger/scoring/rules.py METRICS, confusion_matrix).

`ger run` scores with numpy because importing sklearn.metrics (with the scipy and pandas it pulls
in) cost ~1.2 s of every run. The numbers must stay sklearn's, bit for bit: here they are checked
against sklearn.metrics called directly on seeded random label vectors (predictions outside the
true classes, classes of zero support, one class only), on every released GPT-4V prediction file,
and on hand-computed cases; and a real `ger run` per text answer mode is checked not to import
sklearn or scipy at all.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO, STUB_MODEL, run_ger
from sklearn.metrics import accuracy_score, f1_score, recall_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from ger.data.datasets import all_specs
from ger.report.reference import discover, read_release, spec_index
from ger.scoring.metrics import outcome, score_outcome
from ger.scoring.rules import INVALID, METRICS, confusion_matrix

TRUE = ["anger", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
NEVER_TRUE = [INVALID, "surprised", "zzz"]  # predicted, but no sample has them as truth


def sklearn_values(y_true: list, y_pred: list) -> dict[str, float]:
    present = sorted(set(y_true))
    return {
        "acc": accuracy_score(y_true, y_pred),
        "uar": recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0),
        "wf1": f1_score(y_true, y_pred, average="weighted", zero_division=0),
    }


def ours(y_true: list, y_pred: list) -> dict[str, float]:
    return {m: METRICS[m](y_true, y_pred) for m in ("acc", "uar", "wf1")}


def pick(rng: np.random.Generator, labels: list[str], least: int) -> list[str]:
    """A random subset of `labels` of at least `least` items."""
    return [str(x) for x in rng.choice(labels, size=int(rng.integers(least, len(labels) + 1)), replace=False)]


def random_cases(count: int, seed: int = 0) -> list[tuple[list, list]]:
    """Seeded label vectors: 1-7 true classes, predictions from a subset of them plus, often,
    labels never true; sizes 1-200; now and then a class that dominates."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        classes = pick(rng, TRUE, 1)
        offered = pick(rng, classes, 1) + pick(rng, NEVER_TRUE, 0)
        n = int(rng.integers(1, 201))
        weights = rng.dirichlet(np.full(len(classes), 0.3 if rng.random() < 0.3 else 3.0))
        y_true = [str(x) for x in rng.choice(classes, size=n, p=weights)]
        right = rng.random(n) < rng.random()  # accuracy anywhere from 0 to 1
        y_pred = [t if r else str(rng.choice(offered)) for t, r in zip(y_true, right, strict=True)]
        cases.append((y_true, y_pred))
    return cases


@pytest.mark.parametrize("seed", range(2))
def test_random_label_vectors_give_sklearns_numbers_exactly(seed):
    for y_true, y_pred in random_cases(250, seed):
        assert ours(y_true, y_pred) == sklearn_values(y_true, y_pred), (y_true, y_pred)


@pytest.mark.parametrize(
    "y_true, y_pred",
    [
        (["a"], ["a"]),
        (["a"], ["b"]),  # the only prediction is a label never true
        (["a"] * 5, ["a", "a", INVALID, "b", "a"]),  # one class only
        (["a", "b"] * 3, [INVALID] * 6),  # every answer unusable
        (["positive", "negative", "positive"], ["positive", "negative", "negative"]),  # continuous/polarity
        ([0, 1, 2, 2, 1], [0, 2, 2, 3, 1]),  # int labels, as stats.encode makes them
        (np.array(["b", "a", "c"]), np.array(["a", "a", "c"])),  # numpy arrays
    ],
)
def test_edge_cases_give_sklearns_numbers_exactly(y_true, y_pred):
    assert ours(y_true, y_pred) == sklearn_values(list(y_true), list(y_pred))


# Hand-computed, independent of sklearn. wf1 weighs each true class's F1 = 2tp / (support + predicted)
# by its support; a label only predicted has weight 0 but its predictions are misses of their classes.
HAND = [
    # a: tp 1, support 2, predicted 1 -> F1 2/3; b: 1/1/1 -> 1; x: weight 0. wf1 = (2 * 2/3 + 1) / 3 = 7/9.
    # (Dropping the pair predicted x would give 1.0; an unweighted mean over a, b, x would give 5/9.)
    (["a", "a", "b"], ["a", "x", "b"], {"acc": 2 / 3, "uar": (1 / 2 + 1) / 2, "wf1": 7 / 9}),
    # a: tp 2, support 3, predicted 3 -> 2/3; b: tp 0, support 1, predicted 1 -> 0. wf1 = 3 * 2/3 / 4 = 0.5.
    (["a", "a", "a", "b"], ["a", "a", "b", "a"], {"acc": 0.5, "uar": (2 / 3 + 0) / 2, "wf1": 0.5}),
    # a: tp 1, support 1, predicted 3 -> 1/2; b: tp 0, support 2, predicted 0 -> 0; c: 1/1/1 -> 1.
    # wf1 = (1/2 + 0 + 1) / 4 = 3/8; uar = (1 + 0 + 1) / 3.
    (["a", "b", "b", "c"], ["a", "a", "a", "c"], {"acc": 0.5, "uar": 2 / 3, "wf1": 3 / 8}),
    # every prediction unusable: all zero, no division by zero
    (["a", "b"], [INVALID, INVALID], {"acc": 0.0, "uar": 0.0, "wf1": 0.0}),
]


@pytest.mark.parametrize("y_true, y_pred, expected", HAND)
def test_hand_computed_cases(y_true, y_pred, expected):
    got = ours(y_true, y_pred)
    assert got == pytest.approx(expected, abs=1e-12)


def test_mismatched_lengths_and_empty_input_fail():
    with pytest.raises(ValueError, match="2 samples but y_pred has 1"):
        METRICS["acc"](["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no samples"):
        METRICS["wf1"]([], [])


@pytest.mark.parametrize("seed", range(2))
def test_confusion_matrix_is_sklearns_with_zero_support_classes_and_labels_outside(seed):
    """score_outcome's call: columns = the class space (+ INVALID); classes of zero support are rows of
    zeros; pairs with a label outside the columns (MER2023's `surprised`) are not counted."""
    rng = np.random.default_rng(100 + seed)
    for y_true, y_pred in random_cases(200, seed):
        labels = [str(x) for x in rng.permutation(TRUE)] + ([INVALID] if rng.random() < 0.5 else [])
        got = confusion_matrix(y_true, y_pred, labels)
        np.testing.assert_array_equal(got, sk_confusion_matrix(y_true, y_pred, labels=labels))


@pytest.fixture(scope="module")
def release_outcomes(reference_dir):
    index = spec_index(all_specs())
    found = []
    for rf in discover(reference_dir):
        spec = index.get((rf.folder, rf.variant))
        if spec is not None:
            found.append((rf.run_name, spec, outcome(read_release(rf.path, spec), spec)))
    return found


def test_every_released_gpt4v_file_scores_as_with_sklearn(release_outcomes):
    """40k real answers: INVALID (affectnet, ferv39k, ...), `surprised` only predicted (MER2023),
    binary wf1 (CMU-MOSI, CH-SIMS)."""
    assert len(release_outcomes) >= 30
    for name, spec, out in release_outcomes:
        assert ours(out.y_true, out.y_pred) == sklearn_values(out.y_true, out.y_pred), name
        s = score_outcome(out, spec)
        np.testing.assert_array_equal(
            s.confusion,
            sk_confusion_matrix(out.y_true, out.y_pred, labels=s.confusion_labels)[: len(out.classes)],
            err_msg=name,
        )


# ------------------------------------------------------------------ a real run imports neither


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from ger.data.demo import ensure_demo

    return ensure_demo(tmp_path_factory.mktemp("demo")) / "demo"


@pytest.mark.parametrize(
    "answer, reply",
    [("free", json.dumps(TRUE)), ("batch", "happy"), ("choice", "happy")],  # batch: unreadable, scored wrong
    ids=["free", "batch", "choice"],
)
def test_a_run_scores_without_importing_sklearn_or_scipy(
    answer, reply, stub_server, demo_root, cache, tmp_path
):
    stub_server.model = lambda body: (reply, "stop")
    out = tmp_path / "run"
    args = [
        "run",
        "dataset=demo",
        f"dataset.layout.root={demo_root}",
        "dataset.demo=false",
        "limit=6",
        f"answer={answer}",
        f"model={STUB_MODEL}",
        "backend=server",
        f"backend.base_url={stub_server.url}",
        "backend.max_retries=0",
        "progress=false",
        f"hydra.run.dir={out}",
    ]
    proc = run_ger(args, cache, REPO, env={"PYTHONPROFILEIMPORTTIME": "1"})  # = python -X importtime
    lines = proc.stderr.splitlines()
    imported = [line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")]
    assert "ger.scoring.metrics" in imported and "numpy" in imported  # the import log is really there
    heavy = [m for m in imported if m.split(".")[0] in ("sklearn", "scipy")]
    assert heavy == [], f"ger run answer={answer} imported {heavy[:5]}"
    assert json.loads((out / "metrics.json").read_text())["n"] == 6  # and it did score
