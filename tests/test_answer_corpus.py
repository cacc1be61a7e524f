"""The fair answer reader against a corpus of hand-written answers in the styles open VLMs use.

tests/data/answer_corpus.yaml holds, per answer, the test set and the label a careful human reads
(or none: two labels named equally, a denied label, a word outside the set). Every answer goes
through parse_ranked with the test set's real label list and alias table from conf/dataset.
"""

from __future__ import annotations

import csv
import os
from functools import cache
from pathlib import Path

import pytest
import yaml

from ger.answers.parse import LabelMatcher, parse_ranked
from ger.data.datasets import all_specs, load_spec, spec_from_dict
from ger.records import OK, UNKNOWN_LABEL
from ger.report.reference import discover, spec_index

REPO = Path(__file__).resolve().parents[1]

CORPUS = yaml.safe_load((Path(__file__).parent / "data" / "answer_corpus.yaml").read_text(encoding="utf-8"))


@cache
def matcher(key: str) -> LabelMatcher:
    spec = load_spec(key)
    return LabelMatcher(spec.labels, spec.aliases)


def case_id(case: dict) -> str:
    return f"{case['dataset']}-{case['style']}-{case['answer'][:30]}"


def test_corpus_covers_every_test_set_with_at_least_150_answers():
    assert len(CORPUS) >= 150
    assert {c["dataset"] for c in CORPUS} == {s.key for s in all_specs()}
    assert sum(1 for c in CORPUS if c.get("adversarial")) >= 30


def test_every_expected_label_is_spelled_as_its_set_spells_it():
    for case in CORPUS:
        expect = case["expect"]
        assert expect is None or expect in load_spec(case["dataset"]).labels, case


@pytest.mark.parametrize("case", CORPUS, ids=case_id)
def test_answer_is_read_as_a_careful_human_reads_it(case):
    result = parse_ranked(case["answer"], matcher(case["dataset"]))
    if case["expect"] is None:
        assert result.status == case.get("status", UNKNOWN_LABEL) and result.detail, result
        assert not result.ranked or result.ranked[0] not in matcher(case["dataset"]).labels
    else:
        assert (result.status, result.ranked[:1]) == (OK, [case["expect"]]), result
        ranked = case.get("ranked")
        if ranked:
            assert result.ranked[: len(ranked)] == ranked


def test_strict_reading_of_the_corpus_is_what_the_release_scoring_did():
    """The strict matcher (used for the released GPT-4V files) reads only exact spellings: it
    never finds a label the fair reader does not, and finds far fewer (why the fair one exists)."""
    strict_ok = fair_ok = 0
    for case in CORPUS:
        spec = load_spec(case["dataset"])
        strict = parse_ranked(case["answer"], LabelMatcher(spec.labels, strict=True))
        fair = parse_ranked(case["answer"], matcher(case["dataset"]))
        if strict.status == OK:
            strict_ok += 1
            assert fair.status == OK and fair.ranked[0] == strict.ranked[0], case
        fair_ok += fair.status == OK
    assert strict_ok < fair_ok / 2


# ---------------------------------------------------------------- every label, in every wrapping

WRAPPINGS = [
    "{x}",
    "**{x}**",
    "Answer: {x}",
    "**Emotion:** {x}.",
    "The emotion is {x}.",
    "The person appears to be {x}.",
    "### Final Answer\n{x}",
    "<think>\nLet me look at the face and the context carefully.\n</think>\n\n{x}",
    "1. {x}\n2. {y}",
    "- {x}: the clearest cue\n- {y}",
    '```json\n{{"emotion": "{x}"}}\n```',
    "{x}\n\nThe expression and the setting both point to this.",
]
TIES = ["{x} or {y}", "It could be {x} or {y}.", "{x} and {y} are equally likely."]


def forms(spec) -> list[tuple[str, str]]:
    """(label, a way to write it): the label, upper and lower case, and each alias."""
    out = []
    for label in spec.labels:
        for form in {label, label.lower(), label.upper(), *spec.aliases.get(label, [])}:
            out.append((label, form))
    return out


@pytest.mark.parametrize("spec", all_specs(include_demo=True), ids=lambda s: s.key)
def test_every_label_and_alias_is_read_in_every_wrapping(spec):
    m = matcher(spec.key)
    for label, form in forms(spec):
        other = next(x for x in spec.labels if x != label)
        for wrapping in WRAPPINGS:
            text = wrapping.format(x=form, y=other)
            result = parse_ranked(text, m)
            assert (result.status, result.ranked[:1]) == (OK, [label]), (text, result)


@pytest.mark.parametrize("spec", all_specs(include_demo=True), ids=lambda s: s.key)
def test_two_labels_named_alike_or_a_denied_label_are_never_read(spec):
    m = matcher(spec.key)
    for label, form in forms(spec):
        for other in (x for x in spec.labels if x != label):
            for tie in TIES:
                result = parse_ranked(tie.format(x=form, y=other), m)
                assert result.status == UNKNOWN_LABEL, (tie.format(x=form, y=other), result)
        for denial in (f"not {form}", f"The person is not {form}."):
            assert parse_ranked(denial, m).status == UNKNOWN_LABEL, denial


def test_alias_tables_name_labels_of_their_own_set_only():
    for spec in all_specs(include_demo=True):
        assert set(spec.aliases) <= set(spec.labels), spec.key
        LabelMatcher(spec.labels, spec.aliases)  # raises when an alias names two labels


def test_an_alias_for_two_labels_is_a_config_error_naming_the_file():
    data = yaml.safe_load((Path(__file__).parents[1] / "conf/dataset/abstract.yaml").read_text())
    data["aliases"]["Sad"] = ["fun"]  # already Amusement's
    with pytest.raises(ValueError, match=r"abstract\.yaml.*'fun'"):
        spec_from_dict(data)
    data["aliases"] = {"Joy": ["glad"]}
    with pytest.raises(ValueError, match=r"abstract\.yaml.*Joy"):
        spec_from_dict(data)


def test_the_fair_reader_reads_every_released_gpt4v_answer_as_the_strict_one():
    """The paper's numbers come from the strict reading; the fair one agrees on all 40k released
    answers, so the choice of reader cannot move a reproduced number."""
    ref = Path(os.environ.get("GER_REFERENCE_DIR", REPO.parent / "shared/reference/gpt4v-emotion/results"))
    if not ref.is_dir():
        pytest.fail(f"the released GPT-4V results are missing at {ref}; set GER_REFERENCE_DIR")
    index, rows = spec_index(all_specs()), 0
    for rf in discover(ref):
        spec = index.get((rf.folder, rf.variant))
        if spec is None:
            continue
        strict, fair = LabelMatcher(spec.labels, strict=True), matcher(spec.key)
        with rf.path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                a, b = parse_ranked(row["gpt4v"], strict), parse_ranked(row["gpt4v"], fair)
                assert (a.status, a.ranked[:1]) == (b.status, b.ranked[:1]), (rf.path.name, row)
                rows += 1
    assert rows > 40_000
