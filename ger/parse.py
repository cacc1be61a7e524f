"""Model text -> ranked labels, with the reason when it fails.

The parser never raises and never guesses: a top-1 answer that is not in the label
set, or that names two labels equally, is reported as `unknown_label` (scored wrong),
an answer with nothing in it as `empty`. Model answers go through the fair reader
(ger/reading.py: markdown, sentences, lists, reasoning blocks; the label set's aliases
and word forms, ger/matching.py); a strict LabelMatcher keeps the reading the released
GPT-4V files were scored with (case, whitespace and a plural `s`).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ger.matching import LabelMatcher, normalise
from ger.reading import Reading, final_part, read_items, read_text, strip_reasoning
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
    n_records: int  # records found in the answer; != len(names) triggers the paper's split-and-retry
    unmatched: list[str] = field(default_factory=list)  # record names that match no requested sample


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


def _parse_fair(text: str, matcher: LabelMatcher) -> ParseResult:
    answer = strip_reasoning(text)
    if not answer.strip():
        return ParseResult([], EMPTY, "empty answer" if not text.strip() else "only reasoning, no answer")
    final = final_part(answer)
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


def name_key(name: str) -> str:
    """Names are compared without folder, extension, case or quotes."""
    base = normalise(name).replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    return stem if dot and ext.isalnum() and len(ext) <= 4 else base


_RECORD = re.compile(
    r"""['"]?name['"]?\s*[:=]\s*['"]?(?P<name>[^'",}\]\n]+?)['"]?\s*,\s*"""
    r"""['"]?results?['"]?\s*[:=]\s*(?P<result>\[[^\]]*\]?|['"][^'"]*['"]|[^,}\n]+)""",
    re.IGNORECASE,
)


def _records(text: str) -> list[tuple[str, str]]:
    """(name, result text) pairs from a batch answer, tolerant of broken JSON."""
    value = _literal(_FENCE.sub("", text.strip()))
    if isinstance(value, dict):
        value = value.get("results") or value.get("records") or [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        pairs = []
        for record in value:
            if "name" in record:
                result = record.get("result", record.get("results", ""))
                text = result if isinstance(result, str) else json.dumps(result)
                pairs.append((str(record["name"]), text))
        if pairs:
            return pairs
    return [(m.group("name"), m.group("result")) for m in _RECORD.finditer(text)]


def parse_batch(text: str | None, names: list[str], labels: list[str]) -> BatchParse:
    """A batch answer -> one ParseResult per requested name, matched by name, never by position.

    Matching by name is what keeps answers from shifting onto the wrong sample when the
    model skips or repeats a record; a name with no record is MISSING.
    """
    matcher = LabelMatcher(labels)
    try:
        records = _records(text or "")
    except Exception:  # noqa: BLE001 - never raise on model output
        records = []
    exact = {n.strip(): n for n in names}
    keys = [name_key(n) for n in names]
    # the folded key (no case, folder or extension) only where it fits one requested name:
    # "a.jpg" and "a.png" in one batch must not take each other's answers
    wanted = {k: n for k, n in zip(keys, names, strict=True) if keys.count(k) == 1}
    results: dict[str, ParseResult] = {}
    unmatched: list[str] = []
    for rec_name, rec_result in records:
        name = exact.get(rec_name.strip().strip(_QUOTES).strip()) or wanted.get(name_key(rec_name))
        if name is None:
            unmatched.append(rec_name)
        elif name not in results:  # first record for a name wins; duplicates are ignored
            results[name] = parse_ranked(rec_result, matcher)
    for name in names:
        results.setdefault(name, ParseResult([], MISSING, "no record for this sample in the batch answer"))
    return BatchParse(results=results, n_records=len(records), unmatched=unmatched)
