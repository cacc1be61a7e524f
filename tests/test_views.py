"""Score views: every test sample vs the paper's rows, strict vs lenient labels (ger/scoring/views.py).

Hand-computed tables of cases, then the real release files: a perfect model on SAMM scores 100
in both views over 159 vs 135 samples, and GPT-4V's MER2023 answers score 63.50 strictly and
what a direct count of the release file gives with surprise = surprised.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from conftest import make_spec

from ger.data.datasets import all_specs, load_spec, read_label_list, spec_from_dict
from ger.records import ERROR, OK, UNKNOWN_LABEL, Prediction
from ger.report.reference import read_release, release_names
from ger.report.report import build_report, cli
from ger.run.predictions import write_predictions
from ger.run.run_files import views_markdown
from ger.scoring.views import (
    LENIENT,
    PAPER,
    STRICT,
    PaperRows,
    View,
    paper_rows,
    release_variant,
    score_run,
    score_views,
    select_rows,
    views_of,
)

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(
    os.environ.get("GER_REFERENCE_DIR", REPO.parent / "shared" / "reference" / "gpt4v-emotion" / "results")
)


spec = make_spec


def P(name: str, gt: str, top: str | None, status: str = OK) -> Prediction:
    return Prediction(name, gt, [top] if top else [], status)


def by_view(s) -> dict[tuple[str, str], tuple[dict, int]]:
    return {(v.rows, v.labels): (v.values, v.n) for v in [s, *s.views]}


# name, gt, top-1, status; the paper's rows are s1..s4 (s5, s6 were left out of the release).
RUN = [
    ("s1", "a", "a", OK),
    ("s2", "b", "b", OK),
    ("s3", "c", "a", OK),  # wrong
    ("s4", "a", "zzz", UNKNOWN_LABEL),  # a failure among the paper's rows: wrong in both views
    ("s5", "b", None, ERROR),  # a failure outside them: wrong in "all" only
    ("s6", "c", "c", OK),
]
PAPER_NAMES = frozenset({"s1", "s2", "s3", "s4"})


@pytest.mark.parametrize(
    ("names", "preds", "all_acc", "all_n", "paper_acc", "paper_n"),
    [
        (PAPER_NAMES, RUN, 50.0, 6, 50.0, 4),  # all: 3 right of 6; paper: 2 right of 4
        (PAPER_NAMES, RUN[:5], 40.0, 5, 50.0, 4),  # s5 the only extra sample, a failure
        (frozenset({"s1", "s5", "s6"}), RUN, 50.0, 6, 66.67, 3),  # s1, s6 right, s5 failed
        (frozenset({"s1", "s2", "x9"}), RUN, 50.0, 6, 100.0, 2),  # x9: a paper row this run lacks
        (frozenset({"s1.jpg", "s3.jpg"}), RUN, 50.0, 6, 50.0, 2),  # the release's names carry an extension
    ],
)
def test_all_samples_vs_paper_rows(names, preds, all_acc, all_n, paper_acc, paper_n):
    s = score_views([P(*row) for row in preds], spec(), PaperRows(names, "release.csv"))
    views = by_view(s)
    assert views[("all", "strict")] == ({"acc": all_acc}, all_n)
    assert views[("paper", "strict")] == ({"acc": paper_acc}, paper_n)
    assert (s.values, s.n, s.rows) == ({"acc": all_acc}, all_n, "all")  # the headline stays "all"
    assert len(views) == 2


def test_rows_note_counts_paper_rows_missing_from_the_run():
    s = score_views([P(*row) for row in RUN], spec(), PaperRows(frozenset({"s1", "s2", "x9"}), "rel.csv"))
    assert s.notes == ["paper's rows: the 3 rows of rel.csv; 2 of the run's 6 samples (1 of the paper's rows "
                       "are not in this run)"]  # fmt: skip


@pytest.mark.parametrize(
    ("paper", "why"),
    [
        (PaperRows(None, note="the GPT-4V release was not found"), "the GPT-4V release was not found"),
        (PaperRows(frozenset({"zz1", "zz2"}), "rel.csv"), "none of this run's samples is among the 2 rows"),
        (None, "not asked for"),
    ],
)
def test_paper_view_absent_with_a_note_never_a_copy(paper, why):
    s = score_views([P(*row) for row in RUN], spec(), paper)
    assert [(v.rows, v.labels) for v in [s, *s.views]] == [("all", "strict")]
    assert any(why in n and n.startswith("the paper's-rows view is absent") for n in s.notes), s.notes
    d = s.to_dict()
    assert [r["rows"] for r in d["scores"]] == ["all"] and [v["rows"] for v in d["views"]] == ["all"]


MER = dict(labels=["happy", "surprised", "sad"], gt_only_labels=["surprise"])


@pytest.mark.parametrize(
    ("preds", "strict", "lenient"),
    [
        # the label list says `surprise`, the model answers the label set's `surprised`
        ([("1", "surprise", "surprised"), ("2", "happy", "happy")], 50.0, 100.0),
        ([("1", "surprise", "happy"), ("2", "sad", "sad")], 50.0, 50.0),  # wrong either way
        (
            [("1", "surprised", "surprised"), ("2", "surprise", "surprised"), ("3", "sad", "happy")],
            33.33,
            66.67,
        ),
        ([("1", "surprise", "Surprised"), ("2", "surprise", "surprised ")], 0.0, 100.0),  # case, spaces
    ],
)
def test_strict_vs_lenient_surprise(preds, strict, lenient):
    sp = spec(**MER, lenient_equivalents={"surprise": "surprised"})
    s = score_views([P(*row) for row in preds], sp, PaperRows(frozenset(), note="no release here"))
    views = by_view(s)
    assert views[("all", STRICT)][0] == {"acc": strict}
    assert views[("all", LENIENT)][0] == {"acc": lenient}
    lenient_score = next(v for v in s.views if v.labels == LENIENT)
    assert "surprise" not in lenient_score.confusion_labels  # one class in the lenient view


def test_lenient_with_paper_rows_gives_four_views_and_uar_per_folded_class():
    sp = spec(**MER, metrics=["war", "uar"], lenient_equivalents={"surprise": "surprised"})
    preds = [P("1", "surprise", "surprised"), P("2", "surprised", "surprised"), P("3", "happy", "sad")]
    s = score_views(preds, sp, PaperRows(frozenset({"1", "3"}), "rel.csv"))
    views = by_view(s)
    # strict: surprise 0/1, surprised 1/1, happy 0/1 -> UAR 33.33; lenient: surprised 2/2, happy 0/1 -> 50
    assert views[("all", STRICT)] == ({"war": 33.33, "uar": 33.33}, 3)
    assert views[("all", LENIENT)] == ({"war": 66.67, "uar": 50.0}, 3)
    assert views[("paper", STRICT)] == ({"war": 0.0, "uar": 0.0}, 2)
    assert views[("paper", LENIENT)] == ({"war": 50.0, "uar": 50.0}, 2)
    records = s.to_dict()["scores"]
    assert {(r["rows"], r["labels"], r["metric"]) for r in records} == {
        (rows, lab, m) for rows in ("all", "paper") for lab in ("strict", "lenient") for m in ("war", "uar")
    }
    lines = views_markdown(sp, s)
    assert "| every test sample (failures wrong) | strict (the paper's) | 3 | 0 | 33.33 | 33.33 |" in lines
    assert "| the paper's rows | lenient: surprise = surprised | 2 | 0 | 50.00 | 50.00 |" in lines


@pytest.mark.parametrize(
    "bad",
    [{"surprise": "astonished"}, {"shock": "surprised"}, ["surprise", "surprised"]],
)
def test_lenient_equivalents_must_name_classes(bad):
    data = {**json.loads(json.dumps(_mer_yaml())), "lenient_equivalents": bad}
    with pytest.raises(ValueError, match="lenient_equivalents"):
        spec_from_dict(data)


def _mer_yaml() -> dict:
    from ger.config import load_group_yaml

    return load_group_yaml("dataset", "mer2023")


def test_mer2023_yaml_scores_surprise_as_surprised_only_leniently():
    sp = load_spec("mer2023")
    assert sp.lenient_equivalents == {"surprise": "surprised"} and "surprise" in sp.gt_only_labels
    assert views_of(sp) == [View(), View(PAPER), View(labels=LENIENT), View(PAPER, LENIENT)]
    assert views_of(load_spec("samm")) == [View(), View(PAPER)]  # no equivalences: strict only


@pytest.mark.parametrize(
    ("key", "modality", "greyscale", "variant"),
    [("ravdess", None, False, "3"), ("rafdb", None, True, "grey"), ("rafdb", None, False, "rgb"),
     ("sims", "text", False, "text"), ("mer2023", None, False, "multi"), ("samm", None, False, "")],
)  # fmt: skip
def test_release_variant_follows_the_run(key, modality, greyscale, variant):
    assert release_variant(load_spec(key), modality, greyscale) == variant


# ---- the real release files --------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"the released GPT-4V results are missing at {REFERENCE_DIR}; set GER_REFERENCE_DIR")
    return REFERENCE_DIR


def perfect_samm(reference_dir: Path) -> list[Prediction]:
    """A perfect model on all 159 SAMM test samples: the release's 135 plus 24 it left out."""
    with (reference_dir / "samm" / "label.csv").open(newline="") as f:
        rows = [(r["name"], r["gt"]) for r in csv.DictReader(f)]
    labels = load_spec("samm").labels
    rows += [(f"left_out_{i:02d}", labels[i % len(labels)]) for i in range(159 - len(rows))]
    return [Prediction(name, gt, [gt], OK) for name, gt in rows]


def test_perfect_model_on_samm_scores_100_in_both_views(reference_dir, monkeypatch):
    monkeypatch.setenv("GER_REFERENCE_DIR", str(reference_dir))
    s = score_run(perfect_samm(reference_dir), load_spec("samm"))
    assert by_view(s) == {
        ("all", "strict"): ({"acc": 100.0}, 159),
        ("paper", "strict"): ({"acc": 100.0}, 135),
    }
    assert s.notes == [f"paper's rows: the 135 rows of {reference_dir / 'samm' / 'label-gpt4v.csv'}; "
                       "135 of the run's 159 samples"]  # fmt: skip


def test_without_the_release_the_paper_view_is_absent(reference_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("GER_REFERENCE_DIR", str(tmp_path / "nowhere"))
    s = score_run(perfect_samm(reference_dir), load_spec("samm"))
    assert [v.rows for v in [s, *s.views]] == ["all"]
    assert "GER_REFERENCE_DIR" in s.notes[0] and "absent" in s.notes[0]
    monkeypatch.delenv("GER_REFERENCE_DIR")
    monkeypatch.setenv("GER_CACHE_DIR", str(tmp_path / "empty-cache"))
    s = score_run(perfect_samm(reference_dir), load_spec("samm"))
    assert [v.rows for v in [s, *s.views]] == ["all"] and "ger reproduce" in s.notes[0]


def test_paper_rows_pick_the_paper_tables_file(reference_dir):
    expected = [("ravdess", "label-gpt4v-3.csv", 1440), ("rafdb", "label-gpt4v-rgb.csv", 3067),
                ("sims", "label-gpt4v-multi.csv", 453), ("ferv39k", "label-gpt4v.csv", 7538)]  # fmt: skip
    for key, file, count in expected:
        rows = paper_rows(load_spec(key), ref_dir=reference_dir)
        assert Path(rows.source).name == file and len(rows.names or ()) == count


def test_gpt4v_on_mer2023_strict_reproduces_the_paper_and_lenient_counts_surprise(reference_dir):
    path = reference_dir / "mer2023" / "label-gpt4v-multi.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    top1 = [(r["gt"].strip(), r["gpt4v"].split(",")[0].strip()) for r in rows]
    strict = sum(g == t for g, t in top1)
    lenient = sum(g == t or (g, t) == ("surprise", "surprised") for g, t in top1)
    assert sum(g == "surprise" for g, _ in top1) == 18 and lenient > strict  # 18 can never be right strictly
    sp = load_spec("mer2023")
    s = score_views(read_release(path, sp), sp, PaperRows(frozenset(release_names(path)), str(path)), "multi")
    views = by_view(s)
    assert views[("all", STRICT)] == ({"acc": 63.50}, 411) == ({"acc": round(100 * strict / 411, 2)}, 411)
    assert views[("all", LENIENT)] == ({"acc": round(100 * lenient / 411, 2)}, 411)
    assert views[("paper", LENIENT)] == views[("all", LENIENT)]  # the release holds every MER2023 sample


def write_run(folder: Path, preds: list[Prediction], dataset: str, model: str = "perfect") -> Path:
    folder.mkdir(parents=True)
    write_predictions(folder / "predictions.csv", preds)
    meta = {"dataset": dataset, "test_set": dataset, "model": model, "overrides": [f"dataset={dataset}"]}
    (folder / "metrics.json").write_text(json.dumps(meta))
    return folder


def test_ger_report_shows_both_views_labelled(reference_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GER_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("GER_REFERENCE_DIR", raising=False)
    run = write_run(tmp_path / "runs" / "samm", perfect_samm(reference_dir), "samm")
    out = tmp_path / "report"
    assert cli([str(run), "--out", str(out), "--bootstrap", "0", "--reference-dir", str(reference_dir)]) == 0
    table = json.loads((out / "report.json").read_text())["table"]
    got = {(r["row"], r["rows"]): (r["value"], r["n"]) for r in table if r["source"] == "run"}
    assert got == {("perfect", "all"): (100.0, 159), ("perfect [paper's rows]", "paper"): (100.0, 135)}
    markdown = capsys.readouterr().out
    assert "| perfect | 100.00 |" in markdown and "| perfect [paper's rows] | 100.00 |" in markdown
    assert "[paper's rows] score only the samples in the GPT-4V release" in markdown

    absent = build_report([run], 0, 0)  # no --reference-dir, no GER_REFERENCE_DIR, an empty cache
    rows = {r.row for r in absent.table_rows() if r.source == "run"}
    assert rows == {"perfect"} and "the paper's-rows view is absent" in absent.notes[0]


def test_ger_report_shows_mer2023_strict_and_lenient_for_the_release(reference_dir, tmp_path):
    from ger.report.reference import score_release

    ref = tmp_path / "ref"
    (ref / "mer2023").mkdir(parents=True)
    for name in ("label-gpt4v-multi.csv", "label.csv"):
        (ref / "mer2023" / name).write_text((reference_dir / "mer2023" / name).read_text())
    score_release(ref, tmp_path / "repro")
    metrics = json.loads((tmp_path / "repro" / "runs" / "mer2023-multi" / "metrics.json").read_text())
    assert [(v["rows"], v["labels"]) for v in metrics["views"]] == [("all", "strict"), ("all", "lenient")]
    report = build_report([tmp_path / "repro"], 0, 0, reference_dir=ref)
    cells = {r.row: r.value for r in report.table_rows() if r.source == "reference"}
    assert cells["GPT-4V (release) multi"] == 63.5
    assert cells["GPT-4V (release) multi [surprise=surprised]"] == metrics["views"][1]["values"]["acc"] > 63.5
    assert report.notes == []  # the release's own rows need no paper's-rows view


@pytest.mark.parametrize("key", [s.key for s in all_specs()])
def test_release_label_lists_find_every_paper_row(reference_dir, key):
    """A data root holding the release's label list finds each paper row exactly once, whatever the
    naming: AffectNet's list says `1/<hash>.JPG`, SAMM's, CASME's and RAVDESS's carry an extension,
    while their prediction files name the bare sample."""
    sp = load_spec(key)
    folder = reference_dir / sp.reference.folder
    listed = [Prediction(name, gt, [], OK) for name, gt in read_label_list(folder / sp.layout.label_file)]
    rows = paper_rows(sp, ref_dir=reference_dir)
    found = select_rows(listed, rows.names)
    assert len(found) == len(rows.names) == len({p.name for p in found})
