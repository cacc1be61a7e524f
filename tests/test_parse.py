"""The answer parser: tables of hand-made answers."""

import pytest

from ger.answers.parse import normalise, parse_batch, parse_ranked
from ger.records import EMPTY, MISSING, OK, UNKNOWN_LABEL

LABELS = ["happy", "sad", "neutral", "weakly positive", "Anger"]


@pytest.mark.parametrize(
    "text, ranked, status",
    [
        ("happy,sad,neutral", ["happy", "sad", "neutral"], OK),  # the release's format
        ('["Sad", "happy"]', ["sad", "happy"], OK),  # JSON list, other case
        ("['neutral', 'sad']", ["neutral", "sad"], OK),  # Python literal, as the paper asked for
        ("{'name': 'x', 'result': ['anger', 'sad']}", ["Anger", "sad"], OK),  # record; label-set spelling
        ("Weakly   Positive, happy", ["weakly positive", "happy"], OK),  # whitespace folded
        ("1. happy\n2. sad", ["happy", "sad"], OK),  # enumerated
        ('```json\n["sad"]\n```', ["sad"], OK),  # fenced
        ("angers", ["Anger"], OK),  # plural
        ("happy, happy, sad", ["happy", "sad"], OK),  # duplicates dropped
        ("surprised, happy", ["surprised", "happy"], UNKNOWN_LABEL),  # top-1 outside the set: not guessed
        ("The person looks happy", ["happy"], OK),  # a sentence is read (issue 10: a fair answer reader)
        ("The person looks in pain", ["The person looks in pain"], UNKNOWN_LABEL),
        ("", [], EMPTY),
        (None, [], EMPTY),
        ("  \n ", [], EMPTY),
    ],
)
def test_parse_ranked(text, ranked, status):
    result = parse_ranked(text, LABELS)
    assert (result.ranked, result.status) == (ranked, status)


def test_unknown_top1_is_reported_with_the_text():
    result = parse_ranked("Pain, happy", LABELS)
    assert result.status == UNKNOWN_LABEL and "Pain" in result.detail


def test_normalise_folds_case_whitespace_and_quotes():
    assert normalise("  'Weakly \t Positive' ") == "weakly positive"


def test_batch_matches_by_id_not_position():
    text = "[{'name': 'Sample 2', 'result': ['sad']}, {'name': 'Image 1', 'result': ['happy', 'sad']}]"
    out = parse_batch(text, ["a.jpg", "b.jpg", "c.jpg"], LABELS)
    assert out.n_records == 2 and out.by_position == 0
    assert out.results["a.jpg"].ranked == ["happy", "sad"]
    assert out.results["b.jpg"].ranked == ["sad"]
    assert out.results["c.jpg"].status == MISSING and out.missing == ["c.jpg"]


def test_batch_tolerates_broken_json_and_reports_strangers():
    text = (
        "{'name': 'Sample 1', 'result': ['sad', 'happy']}\n{'name': 'zz', 'result': ['happy']}\n"
        "{'name': 'Sample 2', 'result': ['neu"
    )
    out = parse_batch(text, ["a", "b"], LABELS)
    assert out.results["a"].ranked == ["sad", "happy"]
    assert out.results["b"].status == UNKNOWN_LABEL
    assert out.unmatched == ["zz"]


def test_batch_answers_in_the_styles_models_use():
    two = ["a", "b"]
    cases = [
        ('[{"name": "Image 2", "result": ["sad"]}, {"name": 1, "result": ["happy"]}]', two),
        ('{"results": {"Sample 1:": ["happy"], "sample_2": "sad"}}', two),
        ("Here you go:\n\n1. **Sample 1**: happy, sad\n2. **Sample 2**: sad", two),
        ("Sample 2 - sad\n#1: happy", two),
        ('```json\n[["happy"], ["sad", "happy"]]\n```', two),  # no ids: by position
        ('["happy", "sad"]', ["a"]),  # a batch of one answered with a bare ranking
    ]
    for text, names in cases:
        out = parse_batch(text, names, LABELS)
        assert [out.results[n].ranked[0] for n in names] == ["happy", "sad"][: len(names)], text
        assert not out.missing and not out.unmatched, text


def test_a_repeated_record_counts_once_and_is_reported():
    text = "Sample 1: happy\nSample 2: sad\nSample 1: sad"
    out = parse_batch(text, ["a", "b"], LABELS)
    assert out.results["a"].ranked == ["happy"] and out.duplicates == 1 and out.by_position == 0
