"""The prompt templates: conf/prompts/<name>.yaml, validated when loaded.

Templates are YAML files in conf/prompts/, one per task kind, so a new wording is a
new file, not code. A template has a `single` form (one sample per request), an
optional `constrained` form (single mode with the answer constrained to one
label), a `batch` form (several samples, answered as one record each), an `item`
line placed before each sample's media in batch mode, and optional `media`
phrases describing how a clip's frames are shown (images | grid | video).

Placeholders are `{identifier}`; any other brace text (such as a JSON example
`{"name": ..., "result": [...]}`) is left as written. An unknown placeholder is
an error when the template is loaded, not a silent literal in the prompt.

Samples are never named in a prompt: file names can carry the label (RAVDESS names
hold the emotion code), and the paper's prompts sent none. In batch mode each sample
is introduced by a neutral positional id (`{id}`, "Sample 3"; `{index}`, "3"), the
batch text can list them (`{ids}`), and the answer is read back by those ids
(ger/answers/parse.py). `{name}` and `{names}` are refused with an error naming the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ger.config import group_names, load_group_yaml

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
FRAMES_AS = ("images", "grid", "video")  # how a clip's frames are shown (a template's `media` phrases)

# Which placeholders each part of a template may use.
_ALLOWED: dict[str, frozenset[str]] = {
    "single": frozenset({"labels", "count", "transcript", "media", "frames"}),
    "constrained": frozenset({"labels", "count", "transcript", "media", "frames"}),
    "batch": frozenset({"labels", "count", "ids", "media", "frames"}),
    "item": frozenset({"id", "index", "transcript", "frames"}),
    "media": frozenset({"frames"}),
    "id": frozenset({"index"}),
}
# Placeholders that would put file names into the prompt (see the module docstring).
_NAME_PLACEHOLDERS = frozenset({"name", "names"})
_KEYS = ("description", "single", "constrained", "batch", "item", "id", "media")


def placeholders(text: str) -> set[str]:
    """The `{identifier}` placeholders in `text`."""
    return set(_PLACEHOLDER.findall(text))


def render(text: str, values: dict[str, str]) -> str:
    """Fill `{identifier}` placeholders; other braces stay as written."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"no value for placeholder {{{name}}}; given {sorted(values)}")
        return values[name]

    return _PLACEHOLDER.sub(fill, text)


@dataclass(frozen=True)
class PromptTemplate:
    """One task kind's instructions (see the module docstring for the parts)."""

    name: str
    single: str
    batch: str
    constrained: str | None = None
    item: str = "{id}:"
    id: str = "Sample {index}"  # how the prompt and the answer refer to the index-th sample of a batch
    media: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        parts = {"single": self.single, "batch": self.batch, "item": self.item, "id": self.id}
        if self.constrained is not None:
            parts["constrained"] = self.constrained
        parts.update({f"media.{k}": v for k, v in self.media.items()})
        for part, text in parts.items():
            if part == "item" and text == "":  # no text before each sample's media (the release's prompts)
                continue
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"prompt template {self.name!r}: {part!r} must be a non-empty string")
            allowed = _ALLOWED[part.split(".")[0]]
            named = placeholders(text) & _NAME_PLACEHOLDERS
            if named:
                raise ValueError(
                    f"prompt template {self.name!r}: {part!r} uses "
                    f"{', '.join('{' + n + '}' for n in sorted(named))}, which would put sample file names "
                    f"(that can encode the label) into the prompt; refer to samples by position instead: "
                    f"{{id}} or {{index}} in 'item', {{ids}} in 'batch'"
                )
            unknown = placeholders(text) - allowed
            if unknown:
                raise ValueError(
                    f"prompt template {self.name!r}: unknown placeholder(s) "
                    f"{', '.join('{' + u + '}' for u in sorted(unknown))} in {part!r}; "
                    f"allowed there: {', '.join('{' + a + '}' for a in sorted(allowed))}"
                )
        if "index" not in placeholders(self.id):
            raise ValueError(
                f"prompt template {self.name!r}: 'id' must contain {{index}} so each sample of a batch "
                f"gets its own id (e.g. 'Sample {{index}}'), got {self.id!r}"
            )
        unknown_kinds = set(self.media) - set(FRAMES_AS)
        if unknown_kinds:
            raise ValueError(
                f"prompt template {self.name!r}: unknown media kind(s) {sorted(unknown_kinds)}; "
                f"expected {list(FRAMES_AS)}"
            )
        if any("media" in placeholders(t) for t in parts.values()) and set(self.media) != set(FRAMES_AS):
            raise ValueError(
                f"prompt template {self.name!r} uses {{media}} so `media` must describe each of "
                f"{list(FRAMES_AS)}; it has {sorted(self.media)}"
            )
        # A transcript either goes into every form or into none, so no mode silently drops it.
        forms = {"single": self.single, "item": self.item}
        if self.constrained is not None:
            forms["constrained"] = self.constrained
        with_transcript = {k for k, t in forms.items() if "transcript" in placeholders(t)}
        if with_transcript and with_transcript != set(forms):
            raise ValueError(
                f"prompt template {self.name!r}: {{transcript}} appears in {sorted(with_transcript)} "
                f"but not in {sorted(set(forms) - with_transcript)}"
            )

    @property
    def uses_transcript(self) -> bool:
        return "transcript" in placeholders(self.single)

    @property
    def uses_media(self) -> bool:
        forms = [self.single, self.batch, self.constrained or ""]
        return any("media" in placeholders(t) for t in forms)

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> PromptTemplate:
        """Validate a template read from YAML; unknown keys are typos, so they are errors."""
        unknown = set(data) - set(_KEYS)
        if unknown:
            raise ValueError(
                f"prompt template {name!r}: unknown key(s) {sorted(unknown)}; expected {list(_KEYS)}"
            )
        missing = {"single", "batch"} - set(data)
        if missing:
            raise ValueError(f"prompt template {name!r}: missing {sorted(missing)}")
        kwargs = {k: data[k] for k in _KEYS if data.get(k) is not None}
        kwargs["media"] = dict(kwargs.get("media") or {})
        return cls(name=name, **kwargs)


def available_templates() -> list[str]:
    """Names of the templates in conf/prompts/."""
    return group_names("prompts")


def load_template(name: str) -> PromptTemplate:
    """Read and validate conf/prompts/<name>.yaml (an unknown name lists the available ones).

    The folder is not conf/prompt/: Hydra takes every folder of conf/ for a config group, and one
    named `prompt` made the `prompt=<name>` override a group choice that could never be made."""
    if name not in available_templates():
        raise ValueError(f"unknown prompt {name!r}; expected one of {available_templates()}")
    return PromptTemplate.from_dict(name, load_group_yaml("prompts", name))


def sample_ids(template: PromptTemplate, count: int) -> list[str]:
    """The positional ids ("Sample 1", "Sample 2", ...) a batch prompt uses for its samples, in order."""
    return [render(template.id, {"index": str(i)}) for i in range(1, count + 1)]
