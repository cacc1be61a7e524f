"""Media that failed to decode, remembered by content hash, so a cached rerun decodes nothing.

A file that only fails when decoded (a truncated JPEG, a clip cut short) was decoded again by every
rerun to find out, and in batch mode with the rest of its batch, whose answer is cached under the
key of the samples that did decode. The failure is remembered under the sample's content_hash
(its files' bytes and how they become pixels, ger/data/media.py) and the decoders' versions, since
a newer Pillow, PyAV or decord may read what an older one could not. Only a MediaError is
remembered: an OSError (a permission, a full table of open files) or a file that changed while it
was read may not happen again.

A table that cannot be opened or written only costs the decoding again.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sqlite3
from pathlib import Path

log = logging.getLogger("ger")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS undecodable (
    content_hash TEXT PRIMARY KEY,
    decoders TEXT NOT NULL,
    error TEXT NOT NULL
);
"""
REMEMBERED = "MediaError: "  # the prefix of the error rows that are remembered (ger/run/stream.py _decode)


def decoder_versions() -> str:
    """The installed versions of the libraries that turn files into pixels and sound."""
    found = []
    for name in ("pillow", "av", "decord", "decord2"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


class Undecodable:
    """content_hash -> the error row of a sample whose media failed to decode, with these decoders."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.decoders = decoder_versions()
        self._conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            log.warning("table of undecodable media %s unusable (%s): they are decoded again", self.path, exc)
            self._conn = None

    def known(self, hashes: dict[str, str]) -> dict[str, str]:
        """Of {name: content_hash}, the names whose media failed to decode before, with their error."""
        if self._conn is None or not hashes:
            return {}
        try:
            rows = dict(self._conn.execute("SELECT content_hash, error FROM undecodable WHERE decoders = ?",
                                           (self.decoders,)).fetchall())  # fmt: skip
        except sqlite3.Error:
            return {}
        return {name: rows[h] for name, h in hashes.items() if h in rows}

    def remember(self, failed: dict[str, str]) -> None:
        """Store {content_hash: error row} for the errors that decoding would meet again."""
        rows = [(h, self.decoders, error) for h, error in failed.items() if error.startswith(REMEMBERED)]
        if self._conn is None or not rows:
            return
        try:
            with self._conn:
                self._conn.executemany("INSERT OR REPLACE INTO undecodable VALUES (?, ?, ?)", rows)
        except sqlite3.Error as exc:
            log.warning("table of undecodable media %s not written (%s)", self.path, exc)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
