"""`ger prepare source=RAW_DIR`: from a raw dataset download to the layout `ger run` reads.

The release's label list for the test set names every sample; one walk of the raw tree
(ger/data/raw_index.py) finds each name's media (file stem or frame-folder name, any case, any
extension of the set's media kind). The layout, `<data_root>/<key>/` with the label list,
links to the media and the transcripts, is built in a temporary folder beside the target and
renamed into place, then checked as `ger prepare` checks any layout.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ger.config import plain
from ger.data.datasets import (
    LAYOUT_SOURCES,
    DatasetSpec,
    load_samples,
    media_path,
    read_label_list,
    spec_from_dict,
    transcript_path,
)
from ger.data.media import IMAGE_EXTENSIONS
from ger.data.raw_index import VIDEO_EXTENSIONS, Entry, RawIndex, build_index, name_key
from ger.data.raw_transcripts import TranscriptSource, read_sources, write_transcript
from ger.data.validate import SHOW, check_dataset
from ger.errors import UserError

KIND_EXTENSIONS = {"image": IMAGE_EXTENSIONS, "video": VIDEO_EXTENSIONS, "frames": ()}


@dataclass(frozen=True)
class RawHints:
    """The `raw:` block of a dataset config: where the official download keeps the test split."""

    folders: list[str] = field(
        default_factory=list
    )  # sub-folders that hold the test split (shown on ambiguity)
    key: str = "stem"  # stem | parent_stem
    transcripts: TranscriptSource | None = None
    note: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, key: str) -> RawHints:
        data = dict(data or {})
        if data.get("key", "stem") not in ("stem", "parent_stem"):
            raise ValueError(f"dataset {key}: raw.key must be stem or parent_stem, got {data['key']!r}")
        data["transcripts"] = TranscriptSource.from_dict(data.get("transcripts"), key)
        return cls(**data)


@dataclass
class MatchReport:
    """Which listed samples were found once, not at all, or more than once in the raw tree."""

    found: dict[str, Entry] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)
    transcripts: dict[str, str] = field(default_factory=dict)
    missing_transcripts: list[str] = field(default_factory=list)
    conflicting_transcripts: dict[str, list[str]] = field(default_factory=dict)  # name -> files that disagree
    transcript_files: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return (
            len(self.missing)
            + len(self.ambiguous)
            + len(self.missing_transcripts)
            + len(self.conflicting_transcripts)
        )


def _split_name(name: str, kind: str) -> tuple[list[str], str, str]:
    """(folder parts, stem, suffix) of a listed name; a suffix counts only if it is a media extension."""
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    last = parts[-1] if parts else name
    stem, ext = os.path.splitext(last)
    if kind == "frames" or ext.lower() not in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
        stem, ext = last, ""
    return [p.lower() for p in parts[:-1]], stem, ext.lower()


def find(name: str, index: RawIndex, kind: str) -> list[Entry]:
    """Every entry that can be sample `name`; a listed folder part (AffectNet's `1/x.jpg`) must match too."""
    folders, stem, ext = _split_name(name, kind)
    hits = index.media.get(name_key(stem), [])
    if folders:
        hits = [e for e in hits if e.parents[-len(folders) :] == folders]
    if len(hits) > 1 and ext:  # the same stem as .jpg and .png: the listed extension decides
        exact = [e for e in hits if e.suffix == ext]
        hits = exact or hits
    return hits


def match(names: list[str], index: RawIndex, kind: str) -> MatchReport:
    """Each listed name's one file. A file two names would share is ambiguous for both: names that key
    alike (`Abc` and `aBC`, `12` and `012`) where the download holds only one of them."""
    report = MatchReport()
    for name in names:
        hits = find(name, index, kind)
        if len(hits) == 1:
            report.found[name] = hits[0]
        elif hits:
            report.ambiguous[name] = sorted(e.rel for e in hits)
        else:
            report.missing.append(name)
    claims: dict[str, list[str]] = {}
    for name, entry in report.found.items():
        claims.setdefault(entry.path, []).append(name)
    for shared in (names for names in claims.values() if len(names) > 1):
        for name in shared:
            others = ", ".join(n for n in shared if n != name)
            report.ambiguous[name] = [f"{report.found.pop(name).rel} (also the file found for {others})"]
    return report


def match_transcripts(report: MatchReport, names: list[str], index: RawIndex, hints: RawHints) -> None:
    """The dataset's own transcript files first, then one `<name>.txt` per sample."""
    own: dict[str, str] = {}
    disputed: dict[str, list[str]] = {}
    if hints.transcripts and hints.transcripts.format != "txt":
        own, disputed, report.transcript_files = read_sources(hints.transcripts, index.sources)
    for name in names:
        key = name_key(Path(name).stem if Path(name).suffix.lower() in VIDEO_EXTENSIONS else name)
        if key in disputed:
            report.conflicting_transcripts[name] = disputed[key]
        elif key in own:
            report.transcripts[name] = own[key]
        elif len(index.texts.get(key, [])) == 1:
            report.transcripts[name] = Path(index.texts[key][0].path).read_text(encoding="utf-8").strip()
        else:
            report.missing_transcripts.append(name)


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"  {len(items)} {title}:"] + [f"    {x}" for x in items[:SHOW]]
    if len(items) > SHOW:
        lines.append(f"    ... and {len(items) - SHOW} more")
    return lines


def summary(spec: DatasetSpec, report: MatchReport, index: RawIndex, hints: RawHints, n: int) -> str:
    lines = [
        f"{spec.key}: {n} samples listed; raw tree {index.root}: {index.files} files in {index.dirs} folders",
        f"  found {len(report.found)}, missing {len(report.missing)}, ambiguous {len(report.ambiguous)}",
    ]
    if spec.layout.transcript_dir:
        src = ", ".join(report.transcript_files) or "per-sample .txt files"
        lines.append(f"  transcripts: {len(report.transcripts)} from {src}")
    lines += _listing("missing samples", report.missing)
    amb = [f"{k}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}" for k, v in report.ambiguous.items()]
    lines += _listing("ambiguous samples (one name, several files)", amb)
    lines += _listing("samples without a transcript", report.missing_transcripts)
    clash = [f"{k}: {', '.join(v[:3])}" for k, v in report.conflicting_transcripts.items()]
    lines += _listing("samples given different transcripts (pick the files with source_exclude=...)", clash)
    if report.ambiguous:
        hint = f" (this set's test split: {', '.join(hints.folders)})" if hints.folders else ""
        lines.append(f"  narrow the search with source_include='<folder>/**'{hint} or source_exclude=...")
    if report.missing and hints.note:
        lines.append(f"  note: {hints.note}")
    return "\n".join(lines)


def _place(src: Entry, dest: Path, copy: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        os.symlink(src.path, dest, target_is_directory=src.is_dir)
    elif src.is_dir:
        shutil.copytree(src.path, dest)
    else:
        shutil.copy2(src.path, dest)


def _write_label_list(path: Path, rows: list[tuple[str, str]]) -> None:
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "gt"])
        writer.writerows(rows)


def write_layout(
    spec: DatasetSpec,
    rows: list[tuple[str, str]],
    report: MatchReport,
    target: Path,
    copy: bool,
    overwrite: bool,
    source: Path,
) -> None:
    """Build the layout beside `target` and rename it into place: a reader never sees half of it."""
    if target.exists() and not overwrite:
        raise UserError(f"{target} exists; pass overwrite=true to replace it, or another data_root=")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the layout is an ordinary folder
    try:
        _write_label_list(tmp / spec.layout.label_file, rows)
        if not copy:  # the links lead into the raw download: record it so the checks accept them
            (tmp / LAYOUT_SOURCES).write_text(f"{source.resolve()}\n", encoding="utf-8")
        (tmp / spec.layout.media_dir).mkdir(parents=True, exist_ok=True)
        for name, entry in report.found.items():
            _place(entry, media_path(spec, tmp, name), copy)
        for name, text in report.transcripts.items():
            write_transcript(transcript_path(spec, tmp, name), text)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _patterns(value: Any) -> list[str]:
    """A path pattern or a list of them (`source_include=Test/**` or `source_include=[A/**,B/**]`)."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def prepare_from_raw(cfg: DictConfig) -> int:
    """`ger prepare dataset=KEY source=RAW_DIR`: lay out the test set and check it; the exit status.

    Bad input raises (UserError, ValueError, FileNotFoundError): ger/cli.py prints it as one line."""
    data = plain(cfg.dataset)
    spec = spec_from_dict(data)
    hints = RawHints.from_dict(data.get("raw"), spec.key)
    if spec.reference is None:
        raise ValueError(
            f"dataset {spec.key} has no release label list; `source=` works for the 21 test sets"
        )
    from ger.report.reference import find_release

    release = find_release(cfg.get("reference_dir"), download=True)  # the release's label list names the set
    labels = release / spec.reference.folder / spec.layout.label_file
    rows = read_label_list(labels)
    names = [n for n, _ in rows]
    kind = spec.layout.media_kind
    index = build_index(
        Path(str(cfg.source)).expanduser(),
        extensions=KIND_EXTENSIONS[kind],
        frames=kind == "frames",
        key_rule=hints.key,
        include=_patterns(cfg.get("source_include")),
        exclude=_patterns(cfg.get("source_exclude")),
        source_files=hints.transcripts.files if hints.transcripts else [],
    )
    report = match(names, index, kind)
    if spec.layout.transcript_dir:
        match_transcripts(report, names, index, hints)
    print(summary(spec, report, index, hints, len(names)))
    allow = bool(cfg.get("allow_missing"))
    if report.problems and not allow:
        print("nothing written; pass allow_missing=true to lay out what was found anyway", file=sys.stderr)
        return 1
    data_root = Path(str(cfg.data_root)).expanduser()
    target = spec.root(data_root)
    write_layout(spec, rows, report, target, bool(cfg.get("copy")), bool(cfg.get("overwrite")), index.root)
    print(
        f"laid out {len(report.found)} samples under {target} ({'copies' if cfg.get('copy') else 'symlinks'})"
    )
    checked = check_dataset(
        spec,
        load_samples(spec, data_root),
        media=True,
        progress=cfg.progress,
        transcripts=bool(spec.layout.transcript_dir),
    )
    print(checked.summary())
    # with allow_missing the absent samples stay listed (scored as wrong by `ger run`, never dropped)
    hard = checked.problems - (len(checked.missing) if allow else 0)
    return 1 if hard else 0
