"""The persistent response store, keyed on everything that changes an answer.

A run over a few thousand samples takes hours on a GPU; an answer that arrived
must survive a crash, a pre-empted Slurm job or Ctrl-C, and a rerun must only ask
for what is missing. SQLite in WAL mode with `synchronous=FULL` gives exactly
that: every `put` is its own committed, fsynced transaction, and several
processes (Hydra multirun, data-parallel shards) can write the same file. WAL
needs shared memory between the writers, so keep the file on a local disk, not
on NFS (use one cache per node there), and open one ResponseCache per process
(a connection must not cross a fork).

Failures (an error, or an empty answer) go to a separate table with a count and
the last error: they are kept for inspection and never served as answers.

A cache file (or its folder) that is not writable, e.g. a finished run's cache shared
read-only, is opened read-only and immutable: answers are served, new ones are not stored
(with a warning). A file that is not a usable SQLite database raises CacheError naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from ger.errors import UserError
from ger.records import Response

T = TypeVar("T")
log = logging.getLogger("ger")


class CacheError(UserError):
    """The response cache file cannot be opened or read (not a database, corrupt, unwritable folder)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    seconds REAL NOT NULL,
    identity TEXT NOT NULL,   -- the key's parts outside the prompt (JSON), for inspection only
    created REAL NOT NULL,
    finish_reason TEXT        -- "length": the answer was cut at max_tokens (batch mode splits it)
);
CREATE TABLE IF NOT EXISTS failures (
    key TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    identity TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
"""


def request_key(parts: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of `parts` (canonical_json).

    Only JSON values are accepted (no PIL images, no paths): a value that silently
    stringified differently across runs would break cache hits.
    """
    return hashlib.sha256(canonical_json(parts).encode("utf-8")).hexdigest()


def canonical_json(parts: dict[str, Any]) -> str:
    """The text request_key hashes: JSON with sorted keys and fixed separators, not ASCII-escaped."""
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _is_busy(exc: sqlite3.Error) -> bool:
    msg = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in msg or "busy" in msg)


def _says_read_only(exc: BaseException | None) -> bool:
    return isinstance(exc, sqlite3.Error) and "readonly" in str(exc).lower()


def _read_only(path: Path) -> bool:
    """An existing cache we may not write: the file, or its folder (WAL needs -wal/-shm files beside it)."""
    return path.exists() and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))


class ResponseCache:
    """A crash-safe, multi-process store of successful responses by request key.

    `identity` is stored beside each answer unless `put` is given its own; it is for people
    inspecting the file, the key already covers it. `ger run` stores the key's parts outside the
    prompt (ger/run/pipeline.py key_parts: engine versions, model, the backend's answer-changing
    settings, sampling, answer mode), so a cached answer says what produced it.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        identity: dict[str, Any] | None = None,
        busy_timeout_s: float = 30.0,
        retries: int = 50,
    ) -> None:
        self.path = Path(path).expanduser()
        self.identity = identity or {}
        self._identity_json = _as_json(self.identity)  # once: every stored answer carries it
        self._retries = retries
        self._busy_ms = int(1000 * busy_timeout_s)
        self._lock = threading.Lock()  # one connection, possibly used from backend threads
        self._hits = 0
        self._misses = 0
        self.read_only = _read_only(self.path)
        self.skipped_puts = 0  # answers not stored because the cache is read-only
        self._conn: sqlite3.Connection | None = None
        try:
            if not self.read_only:
                try:
                    self._open_writable(busy_timeout_s)
                except CacheError as exc:
                    if not (self.path.exists() and _says_read_only(exc.__cause__)):
                        raise
                    self.close()  # a read-only mount that os.access did not reveal
                    self.read_only = True
            if self.read_only:
                self._open_read_only(busy_timeout_s)
        except CacheError:
            self.close()
            raise
        except (sqlite3.Error, OSError) as exc:
            self.close()
            raise self._error(exc) from exc

    def _open_writable(self, busy_timeout_s: float) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: each write below opens and commits its own transaction.
            self._conn = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except (sqlite3.Error, OSError) as exc:
            raise self._error(exc) from exc
        self._retry(self._setup)

    def _open_read_only(self, busy_timeout_s: float) -> None:
        """immutable=1: SQLite takes no locks and writes no -shm file, which a read-only folder needs."""
        wal = Path(f"{self.path}-wal")
        if wal.exists() and wal.stat().st_size > 0:  # answers not yet checkpointed into the file
            log.warning("read-only response cache %s has a -wal file: its newest answers may be missing",
                        self.path)  # fmt: skip
        uri = f"{self.path.resolve().as_uri()}?mode=ro&immutable=1"
        self._conn = sqlite3.connect(
            uri, uri=True, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._connection().execute("SELECT key, text, seconds FROM answers LIMIT 1").fetchall()
        log.warning("response cache %s is read-only: cached answers are used, new ones are not stored",
                    self.path)  # fmt: skip

    def _error(self, exc: BaseException) -> CacheError:
        """A CacheError that names the file and the fix."""
        return CacheError(
            f"response cache {self.path} cannot be used ({type(exc).__name__}: {exc}); "
            "move the file away (its answers will be asked again) or set cache_dir to another folder"
        )

    def _setup(self) -> None:
        conn = self._connection()
        conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        conn.execute("PRAGMA synchronous=FULL")  # fsync the WAL on every commit
        conn.executescript(_SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(answers)")}
        if "finish_reason" not in columns:  # a cache written before answers kept their finish reason
            conn.execute("ALTER TABLE answers ADD COLUMN finish_reason TEXT")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"response cache {self.path} is closed")
        return self._conn

    def _retry(self, fn: Callable[[], T]) -> T:
        """Run `fn`, retrying with jittered back-off while another process holds the lock."""
        for attempt in range(self._retries):
            try:
                with self._lock:
                    return fn()
            except sqlite3.DatabaseError as exc:
                if not _is_busy(exc):
                    raise self._error(exc) from exc  # corrupt file, disk full, ...: name the file
                if attempt == self._retries - 1:
                    raise
                time.sleep(min(1.0, 0.01 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def _write(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Run `statements` in one immediate transaction, committed (and fsynced) before returning."""

        def run() -> None:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")  # take the write lock now, not half-way through
            try:
                for sql, args in statements:
                    conn.execute(sql, args)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        self._retry(run)

    def get(self, key: str) -> Response | None:
        """The stored answer for `key` (with cached=True), or None; failures are never returned."""
        row = self._retry(
            lambda: (
                self._connection()
                .execute("SELECT text, seconds, finish_reason FROM answers WHERE key=?", (key,))
                .fetchone()
            )
        )
        if row is None:
            self._misses += 1
            return None
        self._hits += 1
        return Response(key=key, text=row[0], cached=True, seconds=row[1], finish_reason=row[2])

    def get_many(self, keys: Iterable[str]) -> dict[str, Response]:
        """Stored answers for those of `keys` that have one; one query per 500 keys, not per key."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Response] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT key, text, seconds, finish_reason FROM answers WHERE key IN ({marks})"
            rows = self._retry(lambda sql=sql, chunk=chunk: self._connection().execute(sql, chunk).fetchall())
            for key, text, seconds, finish in rows:
                found[key] = Response(key=key, text=text, cached=True, seconds=seconds, finish_reason=finish)
        self._hits += len(found)
        self._misses += len(wanted) - len(found)
        return found

    def __contains__(self, key: str) -> bool:
        row = self._retry(
            lambda: self._connection().execute("SELECT 1 FROM answers WHERE key=?", (key,)).fetchone()
        )
        return row is not None

    def put(self, response: Response, identity: dict[str, Any] | None = None) -> bool:
        """Store a successful answer, or record a failure; True when an answer was stored.

        Returns only after the transaction is committed and fsynced, so an answer
        whose put returned survives any later crash.
        """
        if self.read_only:
            self.skipped_puts += 1  # warned once when opened
            return False
        try:
            return self._put(response, identity)
        except CacheError as exc:
            if not _says_read_only(exc.__cause__):
                raise
            log.warning("response cache %s became read-only: new answers are not stored", self.path)
            self.read_only = True
            self.skipped_puts += 1
            return False

    def put_many(self, responses: list[Response], identity: dict[str, Any] | None = None) -> int:
        """Store several responses in one committed, fsynced transaction; how many answers were stored."""
        if not responses:
            return 0
        if self.read_only:
            self.skipped_puts += len(responses)
            return 0
        statements = [st for r in responses for st in self._statements(r, identity)]
        try:
            self._write(statements)
        except CacheError as exc:
            if not _says_read_only(exc.__cause__):
                raise
            log.warning("response cache %s became read-only: new answers are not stored", self.path)
            self.read_only = True
            self.skipped_puts += len(responses)
            return 0
        return sum(r.ok and not r.context_cut for r in responses)

    def _put(self, response: Response, identity: dict[str, Any] | None) -> bool:
        self._write(self._statements(response, identity))
        return response.ok

    def _statements(self, response: Response, identity: dict[str, Any] | None) -> list[tuple[str, tuple]]:
        """The SQL that stores one answer (and clears its failure), or records one failure."""
        if response.context_cut:  # the answer depends on the engine's context limit: asked again next time
            return []
        ident = _as_json(identity) if identity is not None else self._identity_json
        now = time.time()
        if response.ok:
            return [
                (
                    "INSERT INTO answers (key, text, seconds, identity, created, finish_reason) "
                    "VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET text=excluded.text, seconds=excluded.seconds, "
                    "identity=excluded.identity, created=excluded.created, "
                    "finish_reason=excluded.finish_reason",
                    (response.key, response.text, float(response.seconds), ident, now)
                    + (response.finish_reason,),
                ),
                ("DELETE FROM failures WHERE key=?", (response.key,)),  # resolved now
            ]
        error = response.error if response.error is not None else "empty answer"
        return [
            (
                "INSERT INTO failures (key, count, last_error, identity, first_seen, last_seen) "
                "VALUES (?, 1, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET count=count+1, "
                "last_error=excluded.last_error, identity=excluded.identity, "
                "last_seen=excluded.last_seen",
                (response.key, error, ident, now, now),
            )
        ]

    def failures(self) -> list[dict[str, Any]]:
        """Keys that failed and have no answer yet, most recent first."""
        rows = self._retry(
            lambda: (
                self._connection()
                .execute(
                    "SELECT key, count, last_error, identity, first_seen, last_seen FROM failures "
                    "WHERE key NOT IN (SELECT key FROM answers) ORDER BY last_seen DESC"
                )
                .fetchall()
            )
        )
        return [
            {
                "key": key,
                "count": count,
                "last_error": error,
                "identity": json.loads(ident),
                "first_seen": first,
                "last_seen": last,
            }
            for key, count, error, ident, first, last in rows
        ]

    def stats(self) -> dict[str, Any]:
        """Sizes of the store and this session's hit/miss counts."""

        def count() -> tuple[int, int]:
            conn = self._connection()
            answers = conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
            failed = conn.execute(
                "SELECT COUNT(*) FROM failures WHERE key NOT IN (SELECT key FROM answers)"
            ).fetchone()[0]
            return answers, failed

        answers, failed = self._retry(count)
        return {
            "path": str(self.path),
            "answers": answers,
            "failures": failed,
            "hits": self._hits,
            "misses": self._misses,
        }

    def close(self) -> None:
        """Close the connection (idempotent); the data is already on disk."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_json(identity: dict[str, Any]) -> str:
    return json.dumps(identity, sort_keys=True, default=str)
