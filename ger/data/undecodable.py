"""Media that failed to decode, remembered by content hash, so a cached rerun decodes nothing.

A file that only fails when decoded (a truncated JPEG, a clip cut short) was decoded again by every
rerun to find out, and in batch mode with the rest of its batch, whose answer is cached under the
key of the samples that did decode. The failure is remembered under the sample's content_hash
(its files' bytes and how they become pixels, ger/data/media.py) and the decoders' versions, since
a newer Pillow, PyAV or decord may read what an older one could not. Only a MediaError is
remembered: an OSError (a permission, a full table of open files) or a file that changed while it
was read may not happen again.

A decoder that hangs on a file is remembered too (HUNG, ger/run/stream.py): each rerun waited out
stream.timeout_s three times for the same error row. It is kept with the timeout it was given, since
a longer one may see the file through: a run with a longer timeout (or none) decodes it again, and
once it decodes, the hang is forgotten.

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
CREATE TABLE IF NOT EXISTS hung (
    content_hash TEXT PRIMARY KEY,
    decoders TEXT NOT NULL,
    timeout_s REAL NOT NULL,
    error TEXT NOT NULL
);
"""  # hangs in a table of their own: a ger before it reads `undecodable` only, so it never applies one
REMEMBERED = "MediaError: "  # the prefix of the error rows that are remembered (ger/run/stream.py _decode)
HUNG = "DecoderHung: "  # the prefix of the error row of a decoder that hung on a file each time


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
    """content_hash -> the error row of a sample whose media failed to decode, with these decoders.

    timeout_s: the run's stream.timeout_s (None: no timeout), which decides the hangs that apply.
    """

    def __init__(self, path: str | Path, timeout_s: float | None = None) -> None:
        self.path = Path(path).expanduser()
        self.decoders = decoder_versions()
        self.timeout_s = timeout_s
        self._retried: set[str] = set()  # hashes of hangs under a shorter timeout, decoded again now
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
        """Of {name: content_hash}, the names whose media failed to decode before, with their error: a
        hang only where it hung for as long as this run would wait."""
        if self._conn is None or not hashes:
            return {}
        try:
            rows = dict(self._conn.execute("SELECT content_hash, error FROM undecodable WHERE decoders = ?",
                                           (self.decoders,)).fetchall())  # fmt: skip
            hangs = self._conn.execute("SELECT content_hash, timeout_s, error FROM hung WHERE decoders = ?",
                                       (self.decoders,)).fetchall()  # fmt: skip
        except sqlite3.Error:
            return {}
        wanted = set(hashes.values())
        for h, timeout_s, error in hangs:
            if h not in wanted or h in rows:
                continue
            if self.timeout_s is not None and self.timeout_s <= timeout_s:
                rows[h] = error  # it hung for as long as this run would wait
            else:
                self._retried.add(h)
        return {name: rows[h] for name, h in hashes.items() if h in rows}

    def remember(self, failed: dict[str, str], decoded: set[str] = frozenset()) -> None:
        """Store {content_hash: error row} for the errors that decoding would meet again, and forget
        the hangs among `decoded` (content hashes that decoded in this run, under a longer timeout)."""
        rows = [(h, self.decoders, error) for h, error in failed.items() if error.startswith(REMEMBERED)]
        hung = [(h, self.decoders, self.timeout_s, error) for h, error in failed.items()
                if error.startswith(HUNG) and self.timeout_s is not None]  # fmt: skip
        seen_through = [(h,) for h in self._retried & decoded]
        if self._conn is None or not (rows or hung or seen_through):
            return
        try:
            with self._conn:
                self._conn.executemany("INSERT OR REPLACE INTO undecodable VALUES (?, ?, ?)", rows)
                self._conn.executemany("INSERT OR REPLACE INTO hung VALUES (?, ?, ?, ?)", hung)
                self._conn.executemany("DELETE FROM hung WHERE content_hash = ?", seen_through)
        except sqlite3.Error as exc:
            log.warning("table of undecodable media %s not written (%s)", self.path, exc)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
