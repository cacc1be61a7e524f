"""The fair answer reader: what an open model wrote -> its ranked labels, or why there are none.

Open models wrap the label the paper asked for in markdown, sentences, lists and reasoning.
The reader takes, in order: the text after any reasoning block; the explicit final answer
when there is one (`\\boxed{}`, `<answer>`, "Final answer:", an `Answer:`/`Emotion:` line);
then a ranked list (numbered, bulleted, delimited) whose order is the ranking (or the
probabilities its entries carry); else a
bare label in the first or last sentence; else the label of the concluding sentence; else
the one label the prose names. Two labels named equally ("happy or sad") and labels
that are denied ("not happy") are never read as an answer: the result is then unknown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ger.answers.matching import LabelMatcher, Mention, words

_FLAGS = re.IGNORECASE | re.DOTALL
_TAGS = r"think|thinking|reasoning|reflection"
_THINK = re.compile(
    rf"<({_TAGS})>.*?</\1>|◁think▷.*?◁/think▷|<\|begin_of_thought\|>.*?<\|end_of_thought\|>", _FLAGS
)
_THINK_CLOSE = re.compile(rf"</(?:{_TAGS})>|◁/think▷|<\|end_of_thought\|>", re.IGNORECASE)
_THINK_OPEN = re.compile(rf"<(?:{_TAGS})>|◁think▷|<\|begin_of_thought\|>", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_ANSWER_TAG = re.compile(
    r"<answer>(.*?)(?:</answer>|$)|<\|begin_of_solution\|>(.*?)(?:<\|end_of_solution|$)", _FLAGS
)
_FINAL = re.compile(
    r"\bfinal\s+(?:answer|emotion|prediction|label|ranking|result|classification|output|verdict)s?\b"
    r"(?:\s+(?:is|would\s+be|are)\b)?[\s*_:=\-]*",
    re.IGNORECASE,
)
_MARKER_WORDS = (
    r"(?:the\s+)?(?:(?:predicted|primary|dominant|main|detected|top|overall)\s+)?"
    r"(?:answer|emotion|emotion\s+label|label|prediction|result|output|sentiment|classification|category"
    r"|ranking|ranked\s+(?:emotions|labels|list)|conclusion|verdict)s?"
)
_LINE_MARKER = re.compile(
    rf"^[ \t>#*_\-•]*{_MARKER_WORDS}[ \t*_]*(?:[:：=][ \t*_]*|$)", re.IGNORECASE | re.MULTILINE
)
_FENCE = re.compile(r"```[\w-]*")
_ENUM_LINE = re.compile(r"^\s*(?:\(?\d{1,2}[.):]|[-*•+]|[a-eA-E][.)])\s+")
_INLINE_ENUM = re.compile(r"(?:^|\s)\(?\d{1,2}[.)]\s+")  # "1) Sad 2) Neutral 3) Fear" on one line
_SCORE = re.compile(r"(\d{1,3}(?:\.\d+)?)\s*%|(?<![\d.])(0?\.\d+|1\.0+)(?![\d.])")
_SPLIT = re.compile(r"[,;\n|>]+|\s+[-–—]\s+")
_HEAD_CUT = re.compile(
    r"\s*[(\[:,]|\s+[-–—]\s+|\s+(?:because|as|since|due\s+to|given|based\s+on|with|indicating|suggesting"
    r"|which|confidence|probability|score)\b",
    re.IGNORECASE,
)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_INTRO = re.compile(r"^(?:sure|certainly|okay|ok|of course|absolutely|alright)\b[!,.]*\s*", re.IGNORECASE)
_HERE = re.compile(
    r"^(?:here(?:'s|’s| is| are)|below is|the following|my (?:answer|ranking))\b", re.IGNORECASE
)
_STRONG_CUE = re.compile(
    r"\b(?:therefore|thus|hence|overall|in conclusion|to conclude|in summary|finally|final|answer"
    r"|most (?:likely|probably|probable)|best (?:describes?|described|fits?|matches|captures)"
    r"|i would (?:say|classify|choose|pick|go with|label)|i'd (?:say|choose|go with|classify)"
    r"|i think|i believe|so the"
    r"|(?:predominant|dominant|primary|main|overall) (?:emotion|sentiment|expression)"
    r"|(?:emotion|sentiment|expression) (?:is|would be|appears to be|seems to be)|classified as)\b",
    re.IGNORECASE,
)
_EQUALLY = re.compile(r"\b(?:equally|tie|tied|50/50|either)\b", re.IGNORECASE)
_SHORT = 4  # words in a list item's head; longer pieces are sentences, not list items


@dataclass
class Reading:
    """What the reader found: the ranking, the text it read as top-1, and why it may not count."""

    ranked: list[str]  # labels, best first
    top_text: str  # the text read as the top-1 answer
    top: str | None  # its label; None when it names none
    tied: list[str] = field(default_factory=list)  # labels the top-1 text names equally


def strip_reasoning(text: str) -> str:
    """The text outside reasoning blocks; an unclosed block means the answer never came."""
    text = _THINK.sub(" ", text)
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:  # chat templates that open the block in the prompt leave only its end
        text = text[closes[-1].end() :]
    opened = _THINK_OPEN.search(text)
    return text[: opened.start()] if opened else text


def final_part(text: str) -> str:
    """The explicit final answer when the text marks one, else the whole text."""
    boxed = _BOXED.findall(text)
    if boxed and boxed[-1].strip():
        return re.sub(r"\\text\{([^{}]*)\}", r"\1", boxed[-1])
    tags = [a or b for a, b in _ANSWER_TAG.findall(text)]
    if tags and tags[-1].strip():
        return tags[-1]
    for marker in (_FINAL, _LINE_MARKER):
        found = list(marker.finditer(text))
        if found and text[found[-1].end() :].strip(" \t\n*_:.-"):
            return text[found[-1].end() :]
    return text


def _strip_item(item: str) -> str:
    item = _ENUM_LINE.sub("", item.strip(), count=1)
    return item.strip().strip("*_#>`'\"“”‘’ \t").rstrip(".!?;:,").strip("*_`'\"“”‘’ ")


def _head(item: str) -> str:
    return _HEAD_CUT.split(item, maxsplit=1)[0]


def decide(mentions: list[Mention]) -> tuple[str | None, list[str]]:
    """(the one label the text asserts, or None; the labels it names equally)."""
    live = [m for m in mentions if not m.negated]
    labels = list(dict.fromkeys(m.label for m in live))
    if len(labels) <= 1:
        return (labels[0] if labels else None), []
    firm = list(dict.fromkeys(m.label for m in live if not m.hedged))
    return (firm[0], []) if len(firm) == 1 else (None, labels)


def read_item(item: str, matcher: LabelMatcher) -> tuple[str | None, list[str], bool]:
    """One list entry -> (label, labels named equally, whether the entry is a bare label).

    Bare: the label alone with decoration or an explanation after it; else a short phrase
    that names one label ("mostly happy").
    """
    text = _strip_item(item)
    if not text:
        return None, [], False
    for candidate in (text, _head(text), text.rsplit(":", 1)[-1]):
        label = matcher.match(candidate)
        if label is not None:
            return label, [], True
    if len(words(text)) > 12:
        return None, [], False
    label, tied = _decide_text(text, matcher)
    return label, tied, False


def _decide_text(text: str, matcher: LabelMatcher) -> tuple[str | None, list[str]]:
    mentions = matcher.mentions(text)
    label, tied = decide(mentions)
    named = sorted({m.label for m in mentions if not m.negated})
    if label is not None and len(named) > 1 and _EQUALLY.search(text):  # "X and Y are equally likely"
        return None, named
    return label, tied


def read_items(items: list[str], matcher: LabelMatcher, *, need_bare: bool = False) -> Reading | None:
    """A ranked list: its first entry is the answer, the order of the rest is the ranking.

    None when no entry names a label, or (`need_bare`, for text split at commas) when no
    entry is a bare label, so that a sentence with a comma is not taken for a list.
    """
    items = _by_score([i for i in items if i and i.strip()], matcher)
    reads = [read_item(i, matcher) for i in items]
    if not any(label or tied for label, tied, _ in reads) or (need_bare and not any(b for *_, b in reads)):
        return None
    ranked = list(dict.fromkeys(label for label, _, _ in reads if label))
    top, tied, _ = reads[0]
    return Reading(ranked, _strip_item(items[0]) or items[0].strip(), top, tied)


def _by_score(items: list[str], matcher: LabelMatcher) -> list[str]:
    """Items ordered by the probability or percentage each carries, when every label item has one."""
    scored = [(i, _SCORE.search(_strip_item(i))) for i in items]
    labelled = [m for i, m in scored if read_item(i, matcher)[0] is not None]
    if len(labelled) < 2 or not all(labelled):
        return items
    value = {i: float(m.group(1) or m.group(2)) if m else -1.0 for i, m in scored}
    return sorted(items, key=lambda i: -value[i])  # stable: ties keep the answer's order


def _is_short(item: str) -> bool:
    text = _strip_item(item)
    return len(words(_head(text))) <= _SHORT and not re.search(r"[.!?]\s", text)


def _clean_lines(text: str, matcher: LabelMatcher) -> list[str]:
    """Lines without fences, heading marks, intros ("Here is my ranking:") or label-free `key:` prefixes."""
    out = []
    text = _FENCE.sub("\n", _INTRO.sub("", text.strip()))
    split = [part for raw in text.splitlines() for part in _inline_entries(raw)]
    for raw in split:
        line = raw.strip().lstrip("#>").strip()
        pre, colon, post = line.partition(":")
        if colon and not _ENUM_LINE.match(line) and not matcher.mentions(pre) and matcher.match(pre) is None:
            line = post.strip()
        if _HERE.match(line) and not matcher.mentions(line):
            continue
        if line.strip(" *_-=:"):
            out.append(line)
    return out


def _inline_entries(line: str) -> list[str]:
    """A line holding two or more numbered entries, one per entry (the number kept)."""
    starts = [m.start() for m in _INLINE_ENUM.finditer(line)]
    if len(starts) < 2:
        return [line]
    ends = [*starts[1:], len(line)]
    return [line[: starts[0]]] + [line[a:b].strip() for a, b in zip(starts, ends, strict=True)]


def read_text(text: str, matcher: LabelMatcher) -> Reading | None:
    """Free text: a list when it is one, else the prose's answer (see module doc)."""
    lines = _clean_lines(text, matcher)
    if not lines:
        return None
    entries = [line for line in lines if _ENUM_LINE.match(line)]
    if len(entries) >= 2 and _is_short(entries[0]):
        reading = read_items(entries, matcher)
        if reading is not None and (reading.top or reading.tied):
            return reading
    for whole, part in ((True, "\n".join(lines)), (False, lines[0])):
        items = [i for i in _SPLIT.split(part) if i.strip()]
        if items and all(_is_short(i) for i in items):
            reading = read_items(items, matcher, need_bare=True)  # a list whose top is no label: unknown
            if reading is not None and (reading.top or reading.tied or whole):
                return reading
    return _read_prose("\n".join(lines), matcher)


def _read_prose(text: str, matcher: LabelMatcher) -> Reading | None:
    sentences = [s.strip() for s in _SENTENCE.split(text) if s.strip()]
    for sentence in (sentences[0], sentences[-1]):
        bare = _strip_item(sentence)
        label = matcher.match(bare) or matcher.match(_head(bare))
        if label is not None:
            return Reading([label], bare, label)
    concluding = [s for s in sentences if _STRONG_CUE.search(s) and decide(matcher.mentions(s)) != (None, [])]
    target = concluding[-1] if concluding else text
    if concluding:  # "..., which can be anger, the expression is best described as disgust"
        tail = target[list(_STRONG_CUE.finditer(target))[-1].start() :]
        target = tail if decide(matcher.mentions(tail)) != (None, []) else target
    label, tied = _decide_text(target, matcher)
    if label is None and not tied:
        return None
    return Reading([label] if label else [], target.strip()[:80], label, tied)
