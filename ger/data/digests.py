"""Content digests of media files, remembered across runs by path and stamp.

Cache keys name a sample's media by the sha256 of its file bytes (ger/data/media.py), so a rerun
finds its cached answers without decoding a pixel. Hashing 4,000 images still reads every
byte; this table, an SQLite file beside the response cache, lets an unchanged file skip even
that: same resolved path and same stamp, which is, as in git's index, the size and modification
time in nanoseconds, and the inode and status-change time. Size and mtime alone miss files that
change places: two same-size files renamed into each other's names (fixed-size formats such as
BMP, with the mtimes an archive gave them), or a corrected file copied over with its times kept
(cp -p, rsync -a); the rename keeps each file's inode and the copy sets a new ctime.

Except where the clock cannot tell: a file system that keeps modification times to the second (or
two, as FAT does) gives a file rewritten within that second, at the same size, the mtime it had.
As git does with its index, a digest is remembered only for a file whose mtime was already a few
seconds old when it was hashed; a fresher file is hashed again next time.

A table that cannot be opened or written (a read-only cache folder) only costs speed: digests
are then remembered for this process alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from ger.files import RealPaths

log = logging.getLogger("ger")

_SCHEMA_VERSION = 2  # 2: rows carry the whole stamp (1 had size and mtime only); older tables are dropped
_SCHEMA = """
CREATE TABLE IF NOT EXISTS file_digests (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
"""
Stamp = tuple[int, int, int, int]  # (size, mtime_ns, inode, ctime_ns): see the module doc

# (resolved path, stamp) -> sha256 hex, for this process
_MEMORY: dict[tuple[str, Stamp], str] = {}
_SETTLED_NS = 3_000_000_000  # a file modified this recently may change again within its mtime (FAT: 2 s)
_lock = threading.Lock()


class DigestTable:
    """The persistent (path, size, mtime_ns) -> sha256 table; new rows are written by flush()."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._new: list[tuple[str, int, int, int, int, str]] = []
        self._folders: dict[str, dict[str, tuple[Stamp, str]]] = {}  # folder -> path -> (stamp, digest)
        self.hashed = 0  # files read and hashed through this table (not found in it)
        self._conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            _create(conn)
            self._conn = conn
        except (sqlite3.Error, OSError) as exc:
            log.warning("file digest table %s unusable (%s): media files are hashed again", self.path, exc)

    def lookup(self, path: str, stamp: Stamp) -> str | None:
        row = self._folder(os.path.dirname(path)).get(path)
        return row[1] if row and row[0] == stamp else None

    def _folder(self, folder: str) -> dict[str, tuple[Stamp, str]]:
        """The rows of the files directly in `folder`, read in one query the first time it is asked.

        A test set's files share a few folders: one query each instead of one a file (a tenth of
        a cached rerun of 4,000 images)."""
        rows = self._folders.get(folder)
        if rows is not None:
            return rows
        rows = self._folders[folder] = {}
        if self._conn is None or not _storable(folder):
            return rows
        prefix = folder.rstrip(os.sep) + os.sep
        with _lock:  # the primary key's index serves the range; the last clause keeps subfolders out
            found = self._conn.execute(
                "SELECT path, size, mtime_ns, ino, ctime_ns, sha256 FROM file_digests "
                "WHERE path >= ? AND path < ? AND instr(substr(path, ?), ?) = 0",
                (prefix, prefix[:-1] + chr(ord(os.sep) + 1), len(prefix) + 1, os.sep),
            ).fetchall()
        rows.update((path, (tuple(stamp), digest)) for path, *stamp, digest in found)
        return rows

    def remember(self, path: str, stamp: Stamp, digest: str) -> None:
        self.hashed += 1
        if _storable(path) and _settled(stamp):
            self._new.append((path, *stamp, digest))
        if len(self._new) >= 1000:
            self.flush()

    def flush(self) -> None:
        """Write the digests computed since the last flush, in one transaction."""
        rows, self._new = self._new, []
        if self._conn is None or not rows:
            return
        try:
            with _lock:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany(
                    "INSERT OR REPLACE INTO file_digests (path, size, mtime_ns, ino, ctime_ns, sha256) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
                self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.warning("file digest table %s not written (%s)", self.path, exc)
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")

    def close(self) -> None:
        self.flush()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _create(conn: sqlite3.Connection) -> None:
    """The table at this schema version; a table of an older one holds rows it cannot check: dropped."""
    conn.execute("BEGIN IMMEDIATE")  # two runs starting at once: one creates, the other then finds it
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
            conn.execute("DROP TABLE IF EXISTS file_digests")
            conn.execute(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def stamp_of(st: os.stat_result) -> Stamp:
    """A file version's stamp (see the module doc); the inode folded into SQLite's signed 64 bits."""
    return st.st_size, st.st_mtime_ns, st.st_ino & 0x7FFF_FFFF_FFFF_FFFF, st.st_ctime_ns


def _storable(path: str) -> bool:
    """Whether SQLite can hold `path` (UTF-8 text); one with undecodable bytes in a name (a surrogate
    escape) is hashed again each run instead of failing it."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_TABLE: DigestTable | None = None
_REAL = RealPaths()  # a run's folders are resolved once (use_table starts afresh)


def use_table(table: DigestTable | None) -> None:
    """Make `table` the persistent store file_digest() consults (None: memory only)."""
    global _TABLE, _REAL
    _TABLE, _REAL = table, RealPaths()


def file_status(path: Path | str) -> tuple[str, os.stat_result]:
    """(resolved path, os.stat) of a media file, as file_digest() needs it: one lstat for a plain file."""
    return _REAL.status(path)


def file_digest(path: Path | str, status: tuple[str, os.stat_result] | None = None) -> str:
    """sha256 of a file's bytes, remembered per resolved path and stamp.

    `status`: the file's file_status(), when the caller has already taken it."""
    p, st = status or _REAL.status(path)
    key = (p, stamp_of(st))
    digest = _MEMORY.get(key)
    if digest is None and _TABLE is not None:
        digest = _TABLE.lookup(*key)
    if digest is None:
        with open(p, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()  # reads in chunks
        if _TABLE is not None:
            _TABLE.remember(*key, digest)
        if not _settled(key[1]):
            return digest  # neither remembered here nor in the table (see the module doc)
    _MEMORY[key] = digest
    return digest


def _settled(stamp: Stamp) -> bool:
    """Whether a file with this stamp can no longer change without its mtime changing too."""
    return stamp[1] < time.time_ns() - _SETTLED_NS
