"""Model text -> ranked labels, with the reason when it fails.

The parser never raises and never guesses: a top-1 answer that is not in the label
set, or that names two labels equally, is reported as `unknown_label` (scored wrong),
an answer with nothing in it as `empty`. Model answers go through the fair reader
(ger/answers/reading.py: markdown, sentences, lists, reasoning blocks; the label set's aliases
and word forms, ger/answers/matching.py); a strict LabelMatcher keeps the reading the released
GPT-4V files were scored with (case, whitespace and a plural `s`).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ger.answers.matching import LabelMatcher, normalise
from ger.answers.reading import Reading, final_part, read_items, read_text, strip_reasoning
from ger.records import EMPTY, MISSING, OK, UNKNOWN_LABEL

__all__ = ["BatchParse", "LabelMatcher", "ParseResult", "normalise", "parse_batch", "parse_ranked"]

_SPLIT = re.compile(r"[,;\n|>]+|\s+-\s+")
_ENUM = re.compile(r"^\s*(?:\d+[.):]|[-*•])\s*")
_QUOTES = "'\"`“”‘’"
_FENCE = re.compile(r"^```\w*\s*|\s*```$")
_FENCE_ANY = re.compile(r"```[\w-]*")
_ANSWER_KEY = re.compile(r"emotion|label|answer|result|rank|sentiment|predict|class", re.IGNORECASE)


@dataclass
class ParseResult:
    ranked: list[str]  # canonical labels where matched; the raw top-1 text if it matched nothing
    status: str = OK
    detail: str = ""


@dataclass
class BatchParse:
    results: dict[str, ParseResult]  # one entry per requested name
    n_records: int  # records found in the answer
    unmatched: list[str] = field(default_factory=list)  # record ids that match no sample of the batch
    duplicates: int = 0  # records repeating a sample already answered (the first one counts)
    by_position: int = 0  # records without a usable id, matched by their position

    @property
    def missing(self) -> list[str]:
        """Samples the answer has no record for: the batch is split and asked again."""
        return [n for n, r in self.results.items() if r.status == MISSING]


def _literal(text: str) -> Any:
    """JSON, then a Python literal (the paper's format uses single quotes); None when neither."""
    if not text or text[0] not in "[{(\"'":
        return None  # plain text such as "happy, sad": skip two failing parsers (hot in scoring)
    for loader in (json.loads, ast.literal_eval):
        try:
            return loader(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return None


def _items_from_value(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        if len(value) == 1 and isinstance(value[0], dict) and _items_from_value(value[0]) is not None:
            return _items_from_value(value[0])  # [{'name': 1, 'result': [...]}]: the one record asked for
        items: list[str] = []
        for v in value:
            if isinstance(v, (str, int, float)):
                items.append(str(v))
            elif isinstance(v, dict) and v:
                items.append(str(next(iter(v.values()))))
        return items
    if isinstance(value, dict):
        for key in ("result", "results", "ranking", "labels", "label", "emotion", "answer"):
            if key in value:
                return _items_from_value(value[key])
    return None


def _candidate_items(text: str) -> list[str]:
    """The answer's list of label strings, from structure when there is any, else by splitting."""
    stripped = text.strip()
    fenced = _FENCE.sub("", stripped) if "`" in stripped else stripped
    value = _literal(fenced)
    items = _items_from_value(value) if value is not None else None
    if items is None:
        bracket = re.search(r"\[[^\[\]]*\]", fenced)
        if bracket:
            value = _literal(bracket.group(0))
            items = _items_from_value(value) if value is not None else None
            if items is None:
                items = bracket.group(0)[1:-1].split(",")
    if items is None:
        items = _SPLIT.split(fenced)
    return [_clean_item(item) for item in items if item and not item.isspace()]


def _clean_item(item: str) -> str:
    item = item.strip()
    if item[:1].isdigit() or item[:1] in "-*•":
        item = _ENUM.sub("", item)
    return item.strip(_QUOTES).strip()


def parse_ranked(text: str | None, labels: list[str] | LabelMatcher) -> ParseResult:
    """One sample's answer -> ranked labels. Never raises.

    A strict matcher reads the release's comma-separated lists as the paper did; any
    other goes through the fair reader.
    """
    matcher = labels if isinstance(labels, LabelMatcher) else LabelMatcher(labels)
    try:
        if not matcher.strict:
            return _parse_fair(text or "", matcher)
        items = _candidate_items(text or "")
    except Exception as exc:  # noqa: BLE001 - the parser must never end a run
        return ParseResult([], EMPTY, f"unparseable answer: {exc!r}")
    items = [i for i in items if i]
    if not items:
        return ParseResult([], EMPTY, "empty answer")
    ranked: list[str] = []
    for item in items:
        label = matcher.match(item)
        if label is not None and label not in ranked:
            ranked.append(label)
    top = matcher.match(items[0])
    if top is None:
        raw = items[0][:80]
        return ParseResult([raw, *ranked], UNKNOWN_LABEL, f"top-1 {raw!r} not in label set")
    return ParseResult(ranked, OK)


def _structured_items(text: str) -> list[str] | None:
    """The items of a JSON / Python literal answer (fenced or not, or one bracketed list in prose)."""
    body = _FENCE_ANY.sub("", text).strip()
    value = _literal(body)
    if value is None:
        bracket = re.search(r"\[[^\[\]]*\]", body)
        value = _literal(bracket.group(0)) if bracket else None
        if bracket and value is None:
            return bracket.group(0)[1:-1].split(",")
    if isinstance(value, dict) and _items_from_value(value) is None:  # {"top_emotion": "happy", ...}
        keys = [k for k in value if _ANSWER_KEY.search(str(k))]
        value = value[keys[0]] if keys else None
    items = _items_from_value(value) if value is not None else None
    return [str(i) for i in items] if items else None


def _read(text: str, matcher: LabelMatcher) -> Reading | None:
    items = _structured_items(text)
    reading = read_items(items, matcher) if items else None
    return reading or read_text(text, matcher)


def _holds_nothing(value: Any) -> bool:
    """A parsed literal with no text in it at any depth (None: the answer was no literal)."""
    if isinstance(value, dict):
        return all(_holds_nothing(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_holds_nothing(v) for v in value)
    return isinstance(value, str) and not value.strip()


def _parse_fair(text: str, matcher: LabelMatcher) -> ParseResult:
    label = matcher.bare(text)  # "Happy." reads as the fair reader would read it, at a tenth of the cost
    return ParseResult([label], OK) if label is not None else _read_fair(text, matcher)


def _read_fair(text: str, matcher: LabelMatcher) -> ParseResult:
    answer = strip_reasoning(text)
    if not answer.strip():
        return ParseResult([], EMPTY, "empty answer" if not text.strip() else "only reasoning, no answer")
    final = final_part(answer)
    if _holds_nothing(_literal(_FENCE_ANY.sub("", final).strip())):  # `[]`, `{"results": []}`
        return ParseResult([], EMPTY, "empty answer")
    reading = _read(final, matcher) or (_read(answer, matcher) if final != answer else None)
    if reading is None:
        raw = next(line.strip() for line in final.splitlines() + [answer] if line.strip())[:80]
        raw = raw if raw not in matcher.labels else f"{raw!r}"
        return ParseResult([raw], UNKNOWN_LABEL, f"top-1 {raw!r} names no label of the set")
    raw = reading.top_text[:80] if reading.top_text not in matcher.labels else f"{reading.top_text!r}"
    if reading.tied:
        tied = " and ".join(reading.tied)
        return ParseResult([raw], UNKNOWN_LABEL, f"names {tied} equally; read as neither")
    if reading.top is None:
        return ParseResult([raw, *reading.ranked], UNKNOWN_LABEL, f"top-1 {raw!r} not in label set")
    return ParseResult(reading.ranked, OK)


_RECORD = re.compile(
    r"""['"]?(?:name|id|sample)['"]?\s*[:=]\s*['"]?(?P<name>[^'",}\]\n]+?)['"]?\s*,\s*"""
    r"""['"]?results?['"]?\s*[:=]\s*(?P<result>\[[^\]]*\]?|['"][^'"]*['"]|[^,}\n]+)""",
    re.IGNORECASE,
)
# "Sample 3: happy, sad", "**Image 3** - happy", "3. happy, sad", "- sample_3: happy",
# "1. **Sample 1**: happy"
_LINE = re.compile(
    r"^\s*(?:[-*•]\s*|\d+[.)]\s+(?=[*_`]*[A-Za-z]+[ _#-]*\d))?"  # a bullet, or "1. " before "Sample 1"
    r"[*_`]*(?P<name>(?:[A-Za-z]+[ _#-]*)?#?\d+)[*_`]*"  # the id, maybe in bold
    r"\s*(?:[:.)=-]|\*\*)+\s*(?P<result>\S.*)$"
)
# A positional id as models write it back: "Sample 3", "3", "Image 3", "sample_3", "#3", "Sample 3:"
_ID = re.compile(r"(?:[a-z]+\s*[_#-]?\s*)?#?\s*(\d+)")
_ID_KEYS = ("name", "id", "sample", "sample_id", "image", "clip", "video", "index")
_RESULT_KEYS = ("result", "results", "ranking", "labels", "label", "emotion", "emotions", "answer")


def _result_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _structured_records(value: Any) -> list[tuple[str | None, str]] | None:
    """(id text or None, result text) from a parsed JSON/Python answer; None if it has no records."""
    if isinstance(value, dict):
        for key in ("results", "records", "samples", "answers"):
            if isinstance(value.get(key), (list, dict)):
                return _structured_records(value[key])
        if any(k in value for k in _RESULT_KEYS):
            value = [value]
        else:  # {"Sample 1": [...], "Sample 2": [...]}
            return [(str(k), _result_text(v)) for k, v in value.items()] or None
    if not isinstance(value, list) or not value:
        return None
    pairs: list[tuple[str | None, str]] = []
    for record in value:
        if isinstance(record, dict):
            rid = next((record[k] for k in _ID_KEYS if k in record), None)
            result = next((record[k] for k in _RESULT_KEYS if k in record), None)
            if result is None and rid is None and len(record) == 1:  # [{"Sample 1": [...]}, ...]
                rid, result = next(iter(record.items()))
            if result is not None:
                pairs.append((None if rid is None else str(rid), _result_text(result)))
        elif isinstance(record, (list, tuple)):  # [["happy", "sad"], [...]]: positional
            pairs.append((None, _result_text(list(record))))
        else:
            return None  # a flat list is one ranking, not records
    return pairs or None


def _records(text: str) -> list[tuple[str | None, str]]:
    """(id text or None, result text) pairs from a batch answer, tolerant of broken JSON and prose."""
    stripped = text.strip()
    body = _FENCE.sub("", stripped) if "`" in stripped else stripped
    pairs = _structured_records(_literal(body))
    if pairs:
        return pairs
    found = [(m.group("name"), m.group("result")) for m in _RECORD.finditer(text)]
    if found:
        return found
    return [(m.group("name"), m.group("result")) for line in text.splitlines() if (m := _LINE.match(line))]


def _index(record_id: str | None, ids: dict[str, int], size: int) -> int | None:
    """The 0-based position a record's id refers to, or None when it names no sample of the batch."""
    if record_id is None:
        return None
    key = normalise(record_id).strip("*_`[]()").rstrip(":.").strip()
    if key in ids:
        return ids[key]
    m = _ID.fullmatch(key)
    if m and 1 <= int(m.group(1)) <= size:
        return int(m.group(1)) - 1
    return None


def parse_batch(
    text: str | None, names: list[str], labels: list[str] | LabelMatcher, ids: list[str] | None = None
) -> BatchParse:
    """A batch answer -> one ParseResult per requested name, matched by positional id.

    `ids` are the ids the prompt gave the samples, in order (default "Sample 1", ...).
    A record is matched by its id in any usual spelling ("Sample 3", "3", "Image 3",
    "sample_3", "Sample 3:"); records without a usable id are matched by position only
    when there are exactly as many records as samples, so an answer that skips or
    repeats a record never shifts onto the wrong sample. A second record for a sample
    is a defect (counted; the first one counts); a sample with no record is MISSING.
    """
    matcher = labels if isinstance(labels, LabelMatcher) else LabelMatcher(labels)
    try:
        records = _records(text or "")
    except Exception:  # noqa: BLE001 - never raise on model output
        records = []
    ids = ids or [f"Sample {i}" for i in range(1, len(names) + 1)]
    id_index = {normalise(x).rstrip(":.").strip(): i for i, x in enumerate(ids)}
    if not records and len(names) == 1 and parse_ranked(text, matcher).status != EMPTY:
        records = [(None, text or "")]  # a batch of one answered with a bare ranking: that is its record
    out = BatchParse(results={}, n_records=len(records))
    indices = [_index(rec_id, id_index, len(names)) for rec_id, _ in records]
    if len(records) == len(names):  # ids first, so a record by position never takes a sample named later
        taken = set(indices)
        for position, index in enumerate(indices):
            if index is None and position not in taken:
                indices[position] = position
                out.by_position += 1
    for (rec_id, rec_result), index in zip(records, indices, strict=True):
        if index is None:
            out.unmatched.append(str(rec_id))
        elif names[index] in out.results:
            out.duplicates += 1
        else:
            out.results[names[index]] = parse_ranked(rec_result, matcher)
    for name in names:
        out.results.setdefault(name, ParseResult([], MISSING, "no record for this sample in the answer"))
    out.results = {n: out.results[n] for n in names}
    return out
