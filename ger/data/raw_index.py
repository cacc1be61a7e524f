"""One walk over a raw dataset download: every media file and frame folder, keyed by its name.

`ger prepare source=RAW_DIR` finds each listed sample by name in this index instead of globbing
the tree once per sample (19 datasets, up to ~8,000 samples and hundreds of thousands of files).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ger.data.media import IMAGE_EXTENSIONS

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".flv", ".mpg", ".mpeg", ".wmv")
TEXT_EXTENSIONS = (".txt",)


@dataclass(frozen=True)
class Entry:
    """A media file or a frame folder found under the raw root."""

    path: str  # absolute path as walked (symlinks not resolved: the user's own links stay links)
    rel: str  # path relative to the raw root, with forward slashes
    is_dir: bool

    @property
    def suffix(self) -> str:
        return "" if self.is_dir else os.path.splitext(self.rel)[1].lower()

    @property
    def parents(self) -> list[str]:
        """Lower-cased folder names from the raw root down to this entry's folder."""
        return [p.lower() for p in self.rel.split("/")[:-1]]


@dataclass
class RawIndex:
    """Name key -> entries, plus the files whose names match the transcript-file patterns."""

    root: Path
    media: dict[str, list[Entry]] = field(default_factory=lambda: defaultdict(list))
    texts: dict[str, list[Entry]] = field(default_factory=lambda: defaultdict(list))
    sources: list[Entry] = field(default_factory=list)
    files: int = 0
    dirs: int = 0


def name_key(stem: str) -> str:
    """Case-insensitive key; an all-digit stem is keyed by its value (DFEW's `1` is `00001.mp4` on disk).

    ASCII digits only: str.isdigit() also takes `²` (which int() refuses) and other scripts' digits."""
    key = stem.strip().lower()
    return str(int(key)) if key.isascii() and key.isdigit() else key


def pattern_regex(patterns: list[str]) -> re.Pattern[str] | None:
    """Path patterns on the relative path: `**` spans folders, `*` and `?` stay inside one name."""
    if not patterns:
        return None
    parts = []
    for pat in patterns:
        pat = pat.strip().strip("/").lower()
        out, i = "", 0
        while i < len(pat):
            if pat.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pat[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pat[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pat[i]), i + 1
        # a bare folder name (`Test`) means everything below it
        parts.append(out + ("(?:/.*)?" if "*" not in pat else ""))
    return re.compile("^(?:" + "|".join(parts) + ")$")


def _scan(root: str):
    """os.scandir walk, depth first; yields (relative folder, files, subfolders) as DirEntry lists.

    Hidden entries and __MACOSX are not data: an archive made on a Mac holds a __MACOSX/ mirror of
    its tree, whose AppleDouble `._` files would make every frame folder ambiguous."""
    stack = [("", root)]
    while stack:
        rel, path = stack.pop()
        files, dirs = [], []
        try:
            with os.scandir(path) as it:
                for e in it:
                    if e.name.startswith(".") or e.name == "__MACOSX":
                        continue
                    try:
                        (dirs if e.is_dir() else files).append(e)
                    except OSError:
                        continue
        except OSError:
            continue
        yield rel, files, dirs
        stack.extend((f"{rel}/{d.name}" if rel else d.name, d.path) for d in dirs)


def build_index(
    root: Path,
    *,
    extensions: tuple[str, ...],
    frames: bool = False,
    key_rule: str = "stem",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    source_files: list[str] | None = None,
) -> RawIndex:
    """Walk `root` once. `frames`: index folders that hold images (FERV39k-style clips) instead of files.

    `key_rule`: `stem` keys a file by its stem; `parent_stem` by `<folder>_<stem>` (CH-SIMS stores
    `video_0001_0002` as `Raw/video_0001/0002.mp4`). `include`/`exclude` are path patterns on the
    relative path; `source_files` are file-name patterns of transcript files to collect.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"source folder not found: {root} (set source= to the raw download)")
    inc, exc = pattern_regex(include or []), pattern_regex(exclude or [])
    wanted = frozenset(e.lower() for e in extensions)
    images = frozenset(IMAGE_EXTENSIONS)
    src = [p.lower() for p in source_files or []]
    index = RawIndex(root)
    abs_root = os.path.abspath(root)

    def keep(rel: str) -> bool:
        if inc is None and exc is None:
            return True
        low = rel.lower()
        return (inc is None or inc.match(low) is not None) and (exc is None or exc.match(low) is None)

    for rel, files, dirs in _scan(abs_root):
        index.files += len(files)
        index.dirs += len(dirs)
        folder = rel.rsplit("/", 1)[-1]
        has_image = False
        for f in files:
            stem, ext = os.path.splitext(f.name)
            ext = ext.lower()
            frel = f"{rel}/{f.name}" if rel else f.name
            if src and keep(frel) and any(fnmatch.fnmatch(f.name.lower(), p) for p in src):
                index.sources.append(Entry(f.path, frel, False))
            if ext in images:
                has_image = True
            if ext in TEXT_EXTENSIONS and keep(frel):
                index.texts[name_key(stem)].append(Entry(f.path, frel, False))
            if not frames and ext in wanted and keep(frel):
                key = f"{folder}_{stem}" if key_rule == "parent_stem" and folder else stem
                index.media[name_key(key)].append(Entry(f.path, frel, False))
        if frames and has_image and rel and keep(rel):
            index.media[name_key(folder)].append(Entry(os.path.join(abs_root, rel), rel, True))
    return index
