"""The dataset registry: one YAML per test set in conf/dataset, and the label list -> Samples step."""

from __future__ import annotations

import codecs
import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ger.answers.matching import LabelMatcher
from ger.config import group_names, load_group_yaml
from ger.errors import UserError
from ger.files import RealPaths
from ger.records import Sample
from ger.scoring.rules import check_metric, rule_named

TASKS = ("facial", "sentiment", "micro", "dynamic", "multimodal")
MODALITIES = ("image", "video", "video+text")
MEDIA_KINDS = ("image", "video", "frames")
TASK_TITLES = {
    "facial": "Facial emotion recognition (Table 3)",
    "sentiment": "Visual sentiment analysis (Table 4)",
    "micro": "Micro-expression recognition (Table 5)",
    "dynamic": "Dynamic facial emotion recognition (Table 6)",
    "multimodal": "Multimodal emotion recognition (Table 7)",
}


@dataclass(frozen=True)
class Layout:
    """How a test set sits on disk under <data_root>/<key>/ (or `root`)."""

    label_file: str = "label.csv"
    media_dir: str = "media"
    media_kind: str = "image"
    extension: str = ""
    transcript_dir: str | None = None
    transcript_ext: str = ".npy"
    root: str | None = None


@dataclass(frozen=True)
class Reference:
    """Where the released GPT-4V predictions for this test set are, per variant."""

    folder: str
    files: dict[str, str]
    paper_variant: str = ""


@dataclass(frozen=True)
class Paper:
    table: int | None = None
    test_samples: int | None = None
    gpt4v: dict[str, float] = field(default_factory=dict)
    supervised: dict[str, float] = field(default_factory=dict)
    supervised_method: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    key: str
    title: str
    task: str
    modality: str
    labels: list[str]
    scoring: str  # a rule of ger/scoring/rules.py: how gt is read and answers are scored
    metrics: list[str]
    prompt: str
    batch_size: int
    layout: Layout
    polarity: dict[str, str] | None = None
    reference: Reference | None = None
    paper: Paper = field(default_factory=Paper)
    demo: bool = False
    # The media carry the speakers' voices (video files with a sound track): the audio modalities
    # (`modality=audio|audio_video|audio_text|audio_video_text`) are offered for this set.
    speech: bool = False
    # Ground-truth spellings that are valid classes but not offered to the model (MER2023's
    # label list says `surprise` where the prompt says `surprised`; the paper scored them apart).
    gt_only_labels: list[str] = field(default_factory=list)
    # Spellings scored as one class in the lenient view only (ger/scoring/views.py), e.g. MER2023's
    # {surprise: surprised}; the strict view (the paper's, and the default) keeps them apart.
    lenient_equivalents: dict[str, str] = field(default_factory=dict)
    # Other words a careful reader takes for a label (`joy` for happy); read by the fair answer reader.
    aliases: dict[str, list[str]] = field(default_factory=dict)

    @property
    def gt_labels(self) -> list[str]:
        """Every valid ground-truth class for plain scoring."""
        return self.labels + [x for x in self.gt_only_labels if x not in self.labels]

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    def root(self, data_root: str | Path) -> Path:
        return Path(self.layout.root).expanduser() if self.layout.root else Path(data_root) / self.key


def _check(value: Any, allowed: tuple[str, ...], what: str, key: str) -> None:
    if value not in allowed:
        raise ValueError(f"dataset {key}: unknown {what} {value!r}; expected one of {list(allowed)}")


def spec_from_dict(data: dict[str, Any]) -> DatasetSpec:
    """Build and validate a DatasetSpec, so a broken YAML fails at load time with its name."""
    key = data["key"]
    _check(data["task"], TASKS, "task", key)
    _check(data["modality"], MODALITIES, "modality", key)
    rule = rule_named(data["scoring"], key)
    for metric in data["metrics"]:
        check_metric(metric, key)
    layout = Layout(**(data.get("layout") or {}))
    _check(layout.media_kind, MEDIA_KINDS, "layout.media_kind", key)
    rule.check_spec(data, key)
    polarity = data.get("polarity")
    ref = data.get("reference")
    paper = data.get("paper") or {}
    return DatasetSpec(
        key=key,
        title=data.get("title", key),
        task=data["task"],
        modality=data["modality"],
        labels=list(data["labels"]),
        scoring=data["scoring"],
        metrics=list(data["metrics"]),
        prompt=data["prompt"],
        batch_size=int(data["batch_size"]),
        layout=layout,
        polarity=dict(polarity) if polarity else None,
        reference=Reference(**ref) if ref else None,
        paper=Paper(
            **{**paper, "gpt4v": paper.get("gpt4v") or {}, "supervised": paper.get("supervised") or {}}
        ),
        demo=bool(data.get("demo", False)),
        speech=bool(data.get("speech", False)),
        gt_only_labels=list(data.get("gt_only_labels") or []),
        lenient_equivalents=_equivalents(data, key),
        aliases=_aliases(data, key),
    )


def _equivalents(data: dict[str, Any], key: str) -> dict[str, str]:
    """`lenient_equivalents` as {spelling: class}; both sides must be valid ground-truth classes."""
    raw = data.get("lenient_equivalents") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"dataset {key}: lenient_equivalents must map a spelling to a class, got {raw!r}")
    valid = list(data["labels"]) + list(data.get("gt_only_labels") or [])
    for spelling, target in raw.items():
        if spelling not in valid or target not in valid:
            raise ValueError(
                f"dataset {key}: lenient_equivalents {spelling!r}: {target!r} must name classes of "
                f"labels or gt_only_labels {valid}"
            )
    return {str(k): str(v) for k, v in raw.items()}


def _aliases(data: dict[str, Any], key: str) -> dict[str, list[str]]:
    aliases = data.get("aliases") or {}
    unknown = [label for label in aliases if label not in data["labels"]]
    if unknown:
        raise ValueError(
            f"conf/dataset/{key}.yaml: aliases for {unknown}, which are not in labels {data['labels']}"
        )
    table = {str(label): [str(form) for form in forms or []] for label, forms in aliases.items()}
    try:
        LabelMatcher(list(data["labels"]), table)  # one alias naming two labels fails here, not mid-run
    except ValueError as exc:
        raise ValueError(f"conf/dataset/{key}.yaml: {exc}") from None
    return table


def load_spec(key: str) -> DatasetSpec:
    """The test set `key` from conf/dataset/<key>.yaml."""
    return spec_from_dict(load_group_yaml("dataset", key))


def all_specs(include_demo: bool = False) -> list[DatasetSpec]:
    specs = [load_spec(name) for name in group_names("dataset")]
    return [s for s in specs if include_demo or not s.demo]


class LabelListError(UserError):
    """A label list that cannot be read at all (encoding, header, no rows, names leaving the folder)."""


_ENCODING_FIX = (
    "save it as UTF-8 (Excel: File > Save As > 'CSV UTF-8'; or `iconv -f LATIN1 -t UTF-8 label.csv`)"
)


def _decode_label_file(path: Path) -> str:
    """The text of a label list: UTF-8 with or without a BOM (as spreadsheets save it), or UTF-16
    with a BOM (Excel's "Unicode text"). Other encodings fail naming the file: a Latin-1 guess
    would silently turn file names with accents into names that match no file."""
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    elif b"\x00" in raw[:200]:
        raise LabelListError(f"{path} looks like UTF-16 without a byte-order mark; {_ENCODING_FIX}")
    else:
        encoding = "utf-8-sig"  # drops a UTF-8 BOM if there is one
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LabelListError(
            f"{path}:{line}: not {encoding.removesuffix('-sig').upper()} text (byte {raw[e.start]:#x}); "
            + _ENCODING_FIX
        ) from None


def read_label_rows(path: Path) -> list[tuple[int, str, str]]:
    """(line, name, gt) rows of a label list; extra columns (the release's empty `gpt4v`) are ignored.

    Comma-, semicolon- or tab-separated (whichever the header uses), any line ends; blank lines skipped.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"label list not found: {path}; a test set lives at <data_root>/<key>/ (check data_root)"
        )
    text = _decode_label_file(path)
    header_line = text.split("\n", 1)[0]
    delimiter = next((d for d in (",", "\t", ";") if d in header_line), ",")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [h.strip() for h in next(reader, [])]
    if not {"name", "gt"} <= set(header):
        raise LabelListError(f"{path}: expected a header with columns name,gt; got {header}")
    i_name, i_gt = header.index("name"), header.index("gt")
    rows = []
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue
        cells += [""] * (max(i_name, i_gt) + 1 - len(cells))  # a short row: its gt is reported empty
        rows.append((reader.line_num, cells[i_name].strip(), cells[i_gt].strip()))
    if not rows:
        raise LabelListError(f"{path} lists no samples (only a header); add one `name,gt` row per sample")
    return rows


def read_label_list(path: Path) -> list[tuple[str, str]]:
    """(name, gt) rows of a label list (see read_label_rows)."""
    return [(name, gt) for _, name, gt in read_label_rows(path)]


# Written by `ger prepare source=` into the test set's folder: the raw download its symlinks lead into.
LAYOUT_SOURCES = ".ger-sources"


def layout_sources(root: Path) -> tuple[Path, ...]:
    """The raw folders a laid-out test set links into: links there are the layout, not an escape."""
    listing = root / LAYOUT_SOURCES
    if not listing.is_file():
        return ()
    return tuple(Path(line).resolve() for line in listing.read_text(encoding="utf-8").splitlines() if line)


@dataclass
class PathRules:
    """How one test set's sample names become paths: follow links out of its folders or not, the raw
    download a layout of `ger prepare source=` links into (LAYOUT_SOURCES), and the path resolver
    (one per test set, so each folder is resolved once)."""

    follow: bool = False
    sources: tuple[Path, ...] = ()
    real: RealPaths = field(default_factory=RealPaths)
    _folders: dict[tuple[Path, str], str] = field(default_factory=dict)  # (root, sub) -> resolved

    def folder(self, root: Path, sub: str) -> str:
        """The test set's media or transcript folder `root / sub`, resolved once per test set."""
        real = self._folders.get((root, sub))
        if real is None:
            real = self._folders[root, sub] = self.real(root / sub)
        return real


def _locate(base: str, rel: str, what: str, name: str, rules: PathRules) -> tuple[Path | None, str]:
    """(path, problem) of `rel`, the file of sample `name`, under `base` (a PathRules.folder).

    A name that leaves the folder gives (None, why); a symlink that leads out of it gives
    (the link, why) unless `rules.follow`, or unless it leads into one of `rules.sources`.
    """
    if os.sep in rel or rel in ("", ".", ".."):
        lexical = os.path.normpath(os.path.join(base, rel))
        if not _within(lexical, base):
            return None, f"sample {name!r} points outside the {what} folder {base}"
        target = rules.real(lexical)
    else:  # a plain file name, as nearly every sample's is: in `base` (resolved already) as it stands
        lexical = os.path.join(base, rel)
        target = rules.real.resolve_file(lexical)
    if _within(target, base) or rules.follow:
        return Path(target), ""
    if any(Path(target).is_relative_to(src) for src in rules.sources):
        return Path(lexical), ""  # the layout's own link, as `ger prepare source=` placed it
    return Path(lexical), (
        f"{lexical} is a symlink to {target}, outside the {what} folder {base}; "
        "set follow_symlinks=true to read files through such links"
    )


def _within(path: str, folder: str) -> bool:
    """Path.is_relative_to on normalised absolute strings."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _suffix(name: str) -> str:
    """Path(name).suffix without building a Path (a fifth of reading a 4,000-line label list): the
    extension of the last component that is neither empty nor ".", unless it is all of that component."""
    last = next((part for part in reversed(name.split(os.sep)) if part not in ("", ".")), "")
    dot = last.rfind(".")
    return last[dot:] if 0 < dot < len(last) - 1 else ""


def _media(spec: DatasetSpec, root: Path, name: str, rules: PathRules) -> tuple[Path | None, str]:
    rel = name if (spec.layout.media_kind == "frames" or _suffix(name)) else name + spec.layout.extension
    # the folder itself may be a link (media -> /mnt/big/...): that is the layout
    return _locate(rules.folder(root, spec.layout.media_dir), rel, "media", name, rules)


def _transcript(spec: DatasetSpec, root: Path, name: str, rules: PathRules) -> tuple[Path | None, str]:
    if not spec.layout.transcript_dir:
        return None, ""
    rel = Path(name).stem + spec.layout.transcript_ext
    return _locate(rules.folder(root, spec.layout.transcript_dir), rel, "transcript", name, rules)


def media_path(spec: DatasetSpec, root: Path, name: str, follow_symlinks: bool = False) -> Path:
    """The media file or frames folder for sample `name`, kept inside the dataset root."""
    path, problem = _media(spec, root, name, PathRules(follow_symlinks))
    if problem or path is None:
        raise ValueError(problem)
    return path


def transcript_path(spec: DatasetSpec, root: Path, name: str, follow_symlinks: bool = False) -> Path | None:
    path, problem = _transcript(spec, root, name, PathRules(follow_symlinks))
    if problem:
        raise ValueError(problem)
    return path


def _sample(spec: DatasetSpec, root: Path, row: tuple[int, str, str], rules: PathRules) -> Sample:
    """One Sample; a path problem is kept on it (Sample.problem) so every problem can be listed."""
    line, name, gt = row
    media, problem = _media(spec, root, name, rules)
    transcript, t_problem = _transcript(spec, root, name, rules) if media is not None else (None, "")
    if transcript is None and t_problem:
        media = None  # the name leaves the transcript folder: a label-list problem
    problems = "; ".join(x for x in (problem, t_problem) if x)
    return Sample(spec.key, name, gt, media, transcript, line, problems)


def load_samples(spec: DatasetSpec, data_root: str | Path, follow_symlinks: bool = False) -> list[Sample]:
    """The test set's samples, in label-list order.

    A file that cannot be read at all raises LabelListError. Path problems do not raise: they are
    kept on the sample (Sample.problem), so the checks list every one of them with its line.
    """
    root = spec.root(data_root)
    rows = read_label_rows(root / spec.layout.label_file)
    rules = PathRules(follow_symlinks, layout_sources(root))
    return [_sample(spec, root, row, rules) for row in rows]
