"""Model text -> ranked labels, with the reason when it fails.

The parser never raises and never guesses: a top-1 answer that is not in the label
set is reported as `unknown_label` (scored wrong), an answer with nothing in it as
`empty`. Labels are matched after folding case and whitespace, and a plural `s`
(e.g. "Sadnesses" is not matched, "angers" -> "anger") when that is unambiguous.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ger.records import EMPTY, MISSING, OK, UNKNOWN_LABEL

_SPLIT = re.compile(r"[,;\n|>]+|\s+-\s+")
_ENUM = re.compile(r"^\s*(?:\d+[.):]|[-*•])\s*")
_QUOTES = "'\"`“”‘’"
_FENCE = re.compile(r"^```\w*\s*|\s*```$")


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


def normalise(text: str) -> str:
    """Case- and whitespace-folded form used for every label comparison."""
    return " ".join(str(text).strip().strip(_QUOTES).strip().split()).casefold()


class LabelMatcher:
    """Maps free-form label text onto a label set's own spelling."""

    def __init__(self, labels: list[str]):
        self.labels = list(labels)
        self._exact = {normalise(label): label for label in labels}
        self._seen: dict[str, str | None] = {}

    def match(self, text: str) -> str | None:
        if text in self._seen:  # answers repeat a handful of spellings: memoise (bounded)
            return self._seen[text]
        label = self._match(text)
        if len(self._seen) < 10_000:
            self._seen[text] = label
        return label

    def _match(self, text: str) -> str | None:
        key = normalise(text).rstrip(".!")
        if key in self._exact:
            return self._exact[key]
        if key.endswith("s") and key[:-1] in self._exact:
            return self._exact[key[:-1]]
        if key.endswith("es") and key[:-2] in self._exact:
            return self._exact[key[:-2]]
        return None


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
    """One sample's answer -> ranked labels. Never raises."""
    matcher = labels if isinstance(labels, LabelMatcher) else LabelMatcher(labels)
    try:
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
