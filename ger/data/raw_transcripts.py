"""Transcripts of the multimodal sets, read from the files each dataset ships them in.

Formats (the `raw.transcripts` block of conf/dataset/<key>.yaml says which one a set uses):
- `csv`: one row per clip; the sample name is built from columns with a Python format string
  (`name`), the text is the first non-empty of the `text` columns.
  CH-SIMS ships `label.csv` with columns video_id, clip_id, text, label, label_T, label_A, label_V,
  annotation, mode; clip `clip_id` of `video_id` is `Raw/<video_id>/<clip_id:04>.mp4` (as read by
  the MMSA loaders of thuiar, the dataset's authors), so the release name is `{video_id}_{clip_id:0>4}`.
  MER2023: the challenge's baseline (zeroQiaoba/MERTools, MER2023/feature_extraction/text) reads a
  transcription CSV with columns `name, sentence`; later MER releases name the columns
  `name, chinese, english`. ger takes `english`, then `sentence`, then `chinese` (configurable).
- `annotprocessed`: CMU-MOSI's `Transcript/Segmented/<video>.annotprocessed`, one line per opinion
  segment, `<segment>_DELIM_<text>`; the release names the segment `<video>_<segment>` (the same
  split used by the public MOSI preprocessing scripts that write `<video>_<segment>.txt`).
- the fallback for any set: one `<name>.txt` per sample anywhere in the raw tree.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ger.data.raw_index import Entry, name_key

FORMATS = ("csv", "annotprocessed", "txt")


@dataclass(frozen=True)
class TranscriptSource:
    """How a dataset ships its transcripts (the `raw.transcripts` block)."""

    format: str = "txt"
    files: list[str] = field(default_factory=list)  # file-name patterns, e.g. ["*.annotprocessed"]
    name: str = "{name}"  # csv: the sample name from the row's columns
    text: list[str] = field(default_factory=lambda: ["text"])  # csv: text columns, first non-empty wins

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, key: str) -> TranscriptSource | None:
        if not data:
            return None
        src = cls(**data)
        if src.format not in FORMATS:
            raise ValueError(
                f"dataset {key}: unknown raw.transcripts.format {src.format!r}; expected {FORMATS}"
            )
        return src


Texts = dict[str, list[tuple[int, str]]]  # name key -> (rank of the column it came from, text) per row


def _read_csv(path: Path, src: TranscriptSource) -> Texts:
    """Rows whose columns fill the name template; rows of another table shape are skipped whole."""
    out: Texts = {}
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = {c.strip().lower(): c for c in reader.fieldnames or []}
        text_cols = [(rank, columns[c.lower()]) for rank, c in enumerate(src.text) if c.lower() in columns]
        if not text_cols:
            return out
        for row in reader:
            values = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            try:
                name = src.name.format(**values)
            except (KeyError, ValueError):
                return {}
            rank, text = next(((i, row[c].strip()) for i, c in text_cols if (row[c] or "").strip()), (0, ""))
            out.setdefault(name_key(name), []).append((rank, text))
    return out


def _read_annotprocessed(path: Path) -> Texts:
    out: Texts = {}
    video = path.stem
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        segment, sep, text = line.partition("_DELIM_")
        if sep:
            out.setdefault(name_key(f"{video}_{segment.strip()}"), []).append((0, text.strip()))
    return out


def read_sources(
    src: TranscriptSource, files: list[Entry]
) -> tuple[dict[str, str], dict[str, list[str]], list[str]]:
    """Name key -> transcript from the dataset's own files; the keys given different texts (with the
    files that give them); and the files that were read.

    A sample's text comes from the column the dataset prefers (`text:`), across files too (an
    English CSV beside a Chinese one); two different texts from equally preferred columns, in one
    file or in two (a duplicated row, an older copy of the CSV), are a conflict for the user to
    settle with source_exclude=, never a silent pick of whichever was read last."""
    best: dict[str, tuple[int, str]] = {}
    givers: dict[str, set[str]] = {}
    conflicts: set[str] = set()
    used = []
    for entry in sorted(files, key=lambda e: e.rel):
        path = Path(entry.path)
        got = _read_csv(path, src) if src.format == "csv" else _read_annotprocessed(path)
        if got:
            used.append(entry.rel)
        for key, rows in got.items():
            for rank, text in rows:
                held = best.get(key)
                if held is None or rank < held[0]:  # a better column: earlier conflicts no longer matter
                    best[key], givers[key] = (rank, text), {entry.rel}
                    conflicts.discard(key)
                elif rank == held[0]:
                    givers[key].add(entry.rel)
                    if text != held[1]:
                        conflicts.add(key)
    texts = {key: text for key, (_, text) in best.items() if key not in conflicts}
    return texts, {key: sorted(givers[key]) for key in sorted(conflicts)}, used


def write_transcript(path: Path, text: str) -> None:
    """A transcript in the layout's format: `.npy` holds one unicode string (readable without pickle)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".npy":
        import numpy as np

        with open(path, "wb") as f:
            np.save(f, np.array(text))
    else:
        path.write_text(text + os.linesep, encoding="utf-8")
