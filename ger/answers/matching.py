"""Label text -> a label set's own spelling, and where an answer's prose names which labels.

Two readings. `strict` is what re-scores the released GPT-4V files: case, whitespace and a
plural `s`, nothing else, so the paper's numbers come out exactly. The default, fair
reading adds what open models write instead of the exact label: markdown and punctuation
around it, other spellings (`weakly-positive`), the dataset's alias table (`joy` for
happy) and a morphological fold (`happiness` = `happy`, `worry` = `worried`) that is used
only where it points at exactly one label of the set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_QUOTES = "'\"`“”‘’"
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
# one suffix, longest first; the replacement keeps `happiness`/`happily` on `happy`, `worried` on `worry`
_SUFFIXES = (
    ("iness", "y"), ("fully", ""), ("ily", "y"), ("ied", "y"), ("ies", "y"), ("ness", ""), ("ment", ""),
    ("ful", ""), ("ity", ""), ("ing", ""), ("ed", ""), ("ly", ""), ("es", ""), ("s", ""),
)  # fmt: skip
_NEGATORS = {"not", "no", "never", "without", "neither", "nor", "nothing", "none", "lack", "lacks"}
_NEGATOR_PHRASES = (("rather", "than"), ("instead", "of"), ("as", "opposed", "to"), ("other", "than"))
_NOT_NEGATING = {"doubt", "question", "only", "mistaking", "wonder"}  # "no doubt she is happy"
_CLAUSE_WORDS = {"but", "however", "yet", "although", "though", "whereas", "while", "instead", "rather"}
_SCOPE = 12  # words a negation or hedge reaches back; also keeps long run-on answers linear
_JOINERS = {"or", "and", "nor"}
_COORDINATORS = {*_JOINERS, ""}
_CONCESSIVE = {"although", "though", "whereas", "while", "despite", "except"}
_HEDGES = {"hint", "touch", "trace", "tinge", "bit", "slight", "slightly", "possibly", "perhaps", "maybe",
           "might", "could", "may", "also", "some", "secondary", "undertone", "undertones"}  # fmt: skip
# words that are labels in a set but ordinary English in prose ("the content of the image"):
# in prose they count only right after a copula or cue ("looks content", "emotion is other")
_COMMON_WORDS = {"other", "others", "content"}
_COPULAS = {"is", "be", "are", "was", "looks", "look", "seems", "seem", "appears", "appear", "feels", "feel",
            "feeling", "as", "category", "emotion", "label", "answer", "mostly", "quite", "very"}  # fmt: skip


def normalise(text: str) -> str:
    """Case- and whitespace-folded form used for every label comparison."""
    return " ".join(str(text).strip().strip(_QUOTES).strip().split()).casefold()


def words(text: str) -> list[str]:
    """Lower-case word tokens; markdown, quotes, hyphens and underscores separate or vanish."""
    return [w.replace("’", "'") for w in _WORD.findall(str(text).casefold())]


def fold(word: str) -> str:
    """A crude stem: one common suffix off, then a final `e` (`surprised`/`surprise` -> `surpris`)."""
    for suffix, repl in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)] + repl
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


@dataclass(frozen=True)
class Mention:
    """A label named in running text: where, and whether the text denies or hedges it."""

    label: str
    start: int  # token index
    negated: bool
    hedged: bool


def _table(labels: list[str], aliases: Mapping[str, Iterable[str]]) -> dict[tuple[str, ...], str]:
    """Folded word sequence -> label, keeping only sequences that point at exactly one label."""
    owners: dict[tuple[str, ...], set[str]] = {}
    for label in labels:
        for form in [label, *aliases.get(label, ())]:
            key = tuple(fold(w) for w in words(form))
            if key:
                owners.setdefault(key, set()).add(label)
    return {key: next(iter(found)) for key, found in owners.items() if len(found) == 1}


class LabelMatcher:
    """Maps free-form label text onto a label set's own spelling (strict or fair, see module doc)."""

    def __init__(
        self, labels: list[str], aliases: Mapping[str, Iterable[str]] | None = None, *, strict: bool = False
    ):
        self.labels = list(labels)
        self.strict = strict
        self._exact = {normalise(label): label for label in labels}
        aliases = dict(aliases or {})
        self._alias = {}
        for label, forms in aliases.items():
            if label not in self.labels:
                raise ValueError(f"alias table names {label!r}, which is not a label; labels: {self.labels}")
            for form in forms:
                key = normalise(form)
                other = self._exact.get(key) or self._alias.get(key)
                if other is not None and other != label:
                    raise ValueError(f"alias {form!r} of {label!r} already names {other!r}; keep it on one")
                self._alias[key] = label
        self._phrases = _table(self.labels, aliases)
        self._longest = max((len(k) for k in self._phrases), default=0)
        self._seen: dict[str, str | None] = {}

    def match(self, text: str) -> str | None:
        """The label `text` spells, or None; never a guess between two labels."""
        if text in self._seen:  # answers repeat a handful of spellings: memoise (bounded)
            return self._seen[text]
        label = self._match(text)
        if len(self._seen) < 10_000 and len(text) <= 100:  # spellings, not whole answers
            self._seen[text] = label
        return label

    def bare(self, text: str) -> str | None:
        """The label when `text` is one label or alias alone (any case, quoted, a final `.` or `!`).

        The answer most single-label replies are; reading it needs none of the fair reader's rules."""
        key = normalise(text).rstrip(".!")
        return self._exact.get(key) or self._alias.get(key)

    def _match(self, text: str) -> str | None:
        key = normalise(text).rstrip(".!")
        if key in self._exact:
            return self._exact[key]
        if key.endswith("s") and key[:-1] in self._exact:
            return self._exact[key[:-1]]
        if key.endswith("es") and key[:-2] in self._exact:
            return self._exact[key[:-2]]
        if self.strict:
            return None
        if key in self._alias:
            return self._alias[key]
        tokens = words(text)
        return self._phrases.get(tuple(fold(w) for w in tokens)) if 0 < len(tokens) <= self._longest else None

    def mentions(self, text: str) -> list[Mention]:
        """Every label the text names, longest phrase first (`weakly positive` before `positive`)."""
        tokens = _tokens_with_breaks(text)
        folded = [fold(t) if t else "" for t in tokens]
        found: list[Mention] = []
        seen = list(
            tokens
        )  # tokens with the mentions found so far masked: "neither ... nor" in a phrase denies nothing
        i = end = 0
        while i < len(tokens):
            for n in range(min(self._longest, len(tokens) - i), 0, -1):
                label = self._phrases.get(tuple(folded[i : i + n])) if all(tokens[i : i + n]) else None
                if label is not None and _counts_in_prose(tokens, i, n):
                    hedged = _hedged(seen, i)
                    if found and set(tokens[end:i]) <= _COORDINATORS and i - end <= 3:
                        hedged = found[-1].hedged  # "could be anger or disgust": both alike, a tie
                    found.append(Mention(label, i, _negated(seen, i), hedged))
                    seen[i : i + n] = ["·"] * n
                    i += n
                    end = i
                    break
            else:
                i += 1
        return found


def _counts_in_prose(tokens: list[str], i: int, n: int) -> bool:
    """A common word (`other`, `content`) names its label only after a copula or beside another label."""
    if tokens[i] not in _COMMON_WORDS:  # "other emotions are hard to read" names no label
        return True
    before = tokens[i - 1] if i > 0 else ""
    after = tokens[i + n] if i + n < len(tokens) else ""
    return before in _COPULAS or before in _JOINERS or after in _JOINERS


def _tokens_with_breaks(text: str) -> list[str]:
    """Word tokens, with "" at every clause break (punctuation), so scopes stop there."""
    out: list[str] = []
    for piece in re.split(r"[,;:.!?()\[\]\n]+", str(text)):
        out += words(piece)
        out.append("")
    return out


def _scope_start(tokens: list[str], i: int) -> int:
    """Index of the first token of the clause that holds token i (at most _SCOPE tokens back)."""
    j, stop = i, max(0, i - _SCOPE)
    while j > stop and tokens[j - 1] and tokens[j - 1] not in _CLAUSE_WORDS:
        j -= 1
    return j


def _negated(tokens: list[str], i: int) -> bool:
    start = _scope_start(tokens, i)
    clause = tokens[start:i]
    if start > 0 and tokens[start - 1] in ("rather", "instead") and clause[:1] in (["than"], ["of"]):
        return True  # "happy rather than sad", "sad instead of happy"
    for k, tok in enumerate(clause):
        nxt = clause[k + 1] if k + 1 < len(clause) else ""
        if (tok in _NEGATORS or tok.endswith("n't")) and nxt not in _NOT_NEGATING:
            return True
        if any(tuple(clause[k : k + len(p)]) == p for p in _NEGATOR_PHRASES):
            return True
    return False


def _hedged(tokens: list[str], i: int) -> bool:
    """Named as a secondary note ("a hint of surprise", "although sad") rather than the answer."""
    start = _scope_start(tokens, i)
    if start > 0 and tokens[start - 1] in _CONCESSIVE:
        return True
    return any(t in _HEDGES or t in _CONCESSIVE for t in tokens[max(start, i - 3) : i])
