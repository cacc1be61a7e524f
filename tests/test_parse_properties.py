"""Property tests of the answer parser: whatever a model writes, parsing never raises, never
guesses a label, and in batch mode never moves an answer onto another sample.

Label sets are the real ones from conf/dataset; answers are generated in the formats models
use (JSON, Python literals, plain lists, enumerations, fences) with case, plural and spacing
variants, plus arbitrary and broken text.
"""

from __future__ import annotations

import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ger.answers.parse import LabelMatcher, parse_batch, parse_ranked
from ger.data.datasets import all_specs
from ger.records import EMPTY, MISSING, OK, STATUSES, UNKNOWN_LABEL

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LABEL_SETS = sorted({tuple(s.labels) for s in all_specs(include_demo=True)})


def dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------- strategies


@st.composite
def spelling(draw, label: str) -> str:
    """How a model may write `label`: other case, a plural, extra spaces, trailing full stop."""
    case = draw(st.sampled_from([str, str.lower, str.upper, str.title, str.swapcase]))
    text = case(label)
    text = draw(st.sampled_from([" ", "  ", " \t "])).join(text.split(" ")) if " " in label else text
    text += draw(st.sampled_from(["", "", "s", "es", "."]))
    pad = draw(st.sampled_from(["", " ", "\t"]))
    return pad + text + pad


@st.composite
def ranked_answer(draw) -> tuple[list[str], list[str], str]:
    """(label set, the ranking meant, the answer text in one of the formats models use)."""
    labels = list(draw(st.sampled_from(LABEL_SETS)))
    meant = draw(st.lists(st.sampled_from(labels), min_size=1, max_size=len(labels) + 2))
    words = [draw(spelling(label)) for label in meant]
    fmt = draw(st.sampled_from(["comma", "json", "python", "enum", "fence", "dict", "arrow", "lines"]))
    text = {
        "comma": lambda: draw(st.sampled_from([",", ", ", " ,"])).join(words),
        "json": lambda: json.dumps([w.strip() for w in words]),
        "python": lambda: repr([w.strip() for w in words]),
        "enum": lambda: "\n".join(f"{i}. {w.strip()}" for i, w in enumerate(words, 1)),
        "fence": lambda: "```json\n" + json.dumps([w.strip() for w in words]) + "\n```",
        "dict": lambda: json.dumps({"result": [w.strip() for w in words]}),
        "arrow": lambda: " > ".join(words),
        "lines": lambda: "\n".join(f"- {w.strip()}" for w in words),
    }[fmt]()
    return labels, dedupe(meant), text


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from(["happy", "Sad", "neutral", "weakly positive", "anger"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["name", "result", "results", "labels", "x", ""]) | st.text(max_size=5),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@st.composite
def broken_json(draw) -> str:
    """Nested JSON or Python literals, often cut off mid-way, sometimes wrapped in prose."""
    value = draw(json_values)
    text = draw(st.sampled_from([json.dumps, repr]))(value)
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]
    return (
        draw(st.sampled_from(["", "Answer: ", "```json\n"]))
        + text
        + draw(st.sampled_from(["", "\n```", " ok"]))
    )


# ---------------------------------------------------------------- single answers


def check_invariants(result, labels: list[str]) -> None:
    """What a caller may rely on for any text: top-1 is a label (ok), or the status says why."""
    assert result.status in (OK, EMPTY, UNKNOWN_LABEL)
    if result.status == OK:
        assert result.ranked and all(r in labels for r in result.ranked)
        assert len(set(result.ranked)) == len(result.ranked)
    elif result.status == UNKNOWN_LABEL:
        assert result.ranked and result.ranked[0] not in labels and result.detail
        assert all(r in labels for r in result.ranked[1:])
    else:
        assert result.ranked == [] and result.detail


@SETTINGS
@given(st.sampled_from(LABEL_SETS), st.text(max_size=300))
def test_parse_ranked_never_raises_on_any_text(labels, text):
    check_invariants(parse_ranked(text, list(labels)), list(labels))


@SETTINGS
@given(st.sampled_from(LABEL_SETS), broken_json())
def test_parse_ranked_never_raises_on_nested_or_broken_json(labels, text):
    check_invariants(parse_ranked(text, list(labels)), list(labels))


def test_parse_ranked_survives_pathological_nesting():
    labels = ["happy", "sad"]
    for text in (
        "[" * 50_000,
        "{'result': " * 5_000,
        "[" * 2_000 + "]" * 2_000,
        '"' * 10_000,
        "happy" * 20_000,
        "happy " * 5_000,  # run-on prose: the fair reader's scans must stay linear
        "<think>" + "sad or happy, " * 3_000,
        "Final answer: " * 3_000,
    ):
        check_invariants(parse_ranked(text, labels), labels)


@SETTINGS
@given(ranked_answer())
def test_parse_ranked_recovers_the_ranking_in_any_usual_format(case):
    labels, meant, text = case
    result = parse_ranked(text, LabelMatcher(labels))
    assert (result.status, result.ranked) == (OK, meant), text


# ---------------------------------------------------------------- batch answers

NAME_CHARS = string.ascii_letters + string.digits + "_-"
stems = st.text(NAME_CHARS, min_size=1, max_size=10)
shared_stems = st.sampled_from(
    ["a", "A", "clip_01", "Clip_01"]
)  # names that differ only in case or extension
extensions = st.sampled_from(["", "", ".jpg", ".png", ".mp4"])
names_strategy = st.builds(str.__add__, stems | shared_stems, extensions)
junk = st.text(st.characters(blacklist_characters=":=", blacklist_categories=("Cs",)), max_size=30)


ID_FORMS = ["Sample {i}", "{i}", "Image {i}", "sample_{i}", "Sample {i}:", "#{i}", "Clip {i}", "SAMPLE {i}"]


def record_text(fmt: str, rid: str | int, words: list[str]) -> str:
    if fmt == "python":
        return repr({"name": rid, "result": words})
    if fmt == "single" and len(words) == 1:
        return json.dumps({"name": rid, "result": words[0]})
    if fmt == "lines":
        return f"{rid}: {', '.join(words)}"
    return json.dumps({"name": rid, "result": words})


@st.composite
def batch_answer(draw):
    """A batch of samples known as "Sample 1".."Sample n" in the prompt, and an answer with records
    for a shuffled subset under the id spellings models use, some repeated with another ranking,
    some strangers whose ids name no sample, junk in between. Also returns what each sample must
    get: the first record naming it, else (only when there are exactly n records) the record at
    its position when that record names no sample, else MISSING."""
    labels = list(draw(st.sampled_from(LABEL_SETS)))
    n = draw(st.integers(1, 20))
    names = [f"file_{k}" for k in draw(st.permutations(range(n)))]  # names never reach the answer
    fmt = draw(st.sampled_from(["json_list", "wrapped", "python", "json", "single", "lines"]))
    answered = draw(st.lists(st.integers(1, n), unique=True, max_size=n))
    entries = [(i, draw(st.lists(st.sampled_from(labels), min_size=1, max_size=3))) for i in answered]
    if answered:  # repeats, with a ranking of their own: the first record for a sample counts
        entries += [(i, [labels[-1]]) for i in draw(st.lists(st.sampled_from(answered), max_size=3))]
    stranger_ids = st.sampled_from(["zz", "Sample 0", f"Sample {n + 1}", "note"])
    if fmt == "lines":  # a line record needs a number to be one
        stranger_ids = st.sampled_from(["Sample 0", f"Sample {n + 1}", f"{n + 7}"])
    entries += [(draw(stranger_ids), [labels[0]]) for _ in range(draw(st.integers(0, 3)))]
    entries = draw(st.permutations(entries))
    records, lines = [], []
    for target, meant in entries:
        rid = draw(st.sampled_from(ID_FORMS)).format(i=target) if isinstance(target, int) else target
        if isinstance(target, int) and fmt in ("json", "python") and draw(st.booleans()):
            rid = target  # a bare number
        words = [draw(spelling(w)).strip() for w in meant]
        records.append((target if isinstance(target, int) else None, dedupe(meant)))
        if fmt == "python" and draw(st.booleans()):
            lines.append(draw(junk))
        lines.append(record_text(fmt, rid, words))
    if fmt in ("json_list", "wrapped"):
        body = [json.loads(line) for line in lines]
        text = json.dumps(body if fmt == "json_list" else {"results": body})
    else:
        text = "\n".join(lines)
    expected: dict[str, list[str] | None] = {}
    for target, meant in records:
        if target is not None:
            expected.setdefault(names[target - 1], meant)
    if len(records) == n:
        for position, (target, meant) in enumerate(records):
            named = {t for t, _ in records if t is not None}
            if target is None and position + 1 not in named:
                expected.setdefault(names[position], meant)
    return labels, names, expected, len(records), text


@SETTINGS
@given(batch_answer())
def test_batch_answers_never_shift_onto_another_sample(case):
    labels, names, expected, n_records, text = case
    out = parse_batch(text, names, labels)
    assert list(out.results) == names
    assert out.n_records == n_records, text
    for name in names:
        got = out.results[name]
        if expected.get(name) is None:
            assert got.status == MISSING, (name, text)
        else:
            assert (got.status, got.ranked) == (OK, expected[name]), (name, text)
    assert out.missing == [n for n in names if expected.get(n) is None]


@SETTINGS
@given(st.lists(names_strategy, min_size=1, max_size=8, unique=True), st.text(max_size=300) | broken_json())
def test_parse_batch_never_raises_and_answers_every_name(names, text):
    labels = ["happy", "sad", "neutral"]
    out = parse_batch(text, names, labels)
    assert set(out.results) == set(names)
    for result in out.results.values():
        assert result.status in STATUSES
        if result.status == OK:
            assert result.ranked[0] in labels


def test_a_bare_label_reads_as_the_full_fair_reader_reads_it():
    """LabelMatcher.bare (the fast path for "Happy.") against the fair reader without it, for every
    label and alias of every shipped test set, in the spellings models write them."""
    from ger.answers.parse import _read_fair

    checked = 0
    for spec in all_specs(include_demo=True):
        matcher = LabelMatcher(spec.labels, spec.aliases)
        for form in [*spec.labels, *(a for forms in spec.aliases.values() for a in forms)]:
            for case in (str, str.lower, str.upper, str.title):
                word = case(form)
                for text in (word, f" {word}.\n", f"{word}!", f'"{word}"', f"'{word}'"):
                    label = matcher.bare(text)
                    assert label is not None, (spec.key, text)
                    read = _read_fair(text, matcher)
                    assert parse_ranked(text, matcher) == read == _ok(label), (spec.key, text)
                    checked += 1
    assert checked > 1000
    matcher = LabelMatcher(["happy", "sad"])
    for text in ("happy, sad", "not happy", "**happy**", "happy because she smiles", "1. happy", "happys"):
        assert matcher.bare(text) is None, text  # the full reader's work


def _ok(label: str):
    from ger.answers.parse import ParseResult

    return ParseResult([label], OK)
