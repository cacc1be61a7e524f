"""API keys: read from the environment only, rotated on rate limits, scrubbed from text.

Keys never pass through the config tree: configs name the environment variable
(`api_key_env: OPENAI_API_KEY`), code reads its value. So a saved Hydra config,
a log line, a cache row or a report can hold the variable's name but never the
key. Error messages from the SDK can echo a (partly masked) key or an
Authorization header; `scrub` removes both before a message is recorded.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# What a key looks like in text we did not write ourselves (masked forms included).
_KEY_PATTERNS = (
    re.compile(r"\bsk-[A-Za-z0-9_\-*]{6,}"),  # OpenAI keys, also "sk-test-****abcd"
    re.compile(r"(?i)(bearer\s+)[^\s'\",}]+"),
    re.compile(r"(?i)(api[-_]?key['\"]?\s*[:=]\s*['\"]?)[^\s'\",}]+"),
)
REDACTED = "[REDACTED]"


def read_keys(key_env: str | None, keys_env: str | None = None) -> list[str]:
    """Keys from the environment: the comma-separated list in `keys_env` if set, else `key_env`."""
    for name in (keys_env, key_env):
        if name and os.environ.get(name, "").strip():
            return [k.strip() for k in os.environ[name].split(",") if k.strip()]
    return []


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with the given secrets and anything key-shaped replaced by [REDACTED]."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _KEY_PATTERNS[0].sub(REDACTED, text)
    for pattern in _KEY_PATTERNS[1:]:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def find_secret(folder: str | Path, secret: str, min_fragment: int = 12) -> list[str]:
    """Files under `folder` holding `secret`, or any `min_fragment`-long piece of it (relative paths).

    Reads every file as bytes, so binary files (SQLite caches, pickles) are
    searched too. Fragments catch a key cut in two by a log formatter.
    """
    needles = {secret.encode()}
    if len(secret) > min_fragment:
        needles |= {secret[i : i + min_fragment].encode() for i in range(len(secret) - min_fragment + 1)}
    hits = []
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if any(n in data for n in needles):
            hits.append(str(path.relative_to(root)))
    return hits


@dataclass
class KeyPool:
    """Several keys used in turn: one that hits its rate limit rests while the others work.

    The paper spread its GPT-4V calls over several keys to stay under per-key
    limits; this does the same. `current()` gives the key to use now (the least
    recently rate-limited when all rest), `rate_limited(key)` benches it.
    """

    keys: list[str]
    rest_seconds: float = 20.0
    _resting_until: dict[str, float] = field(default_factory=dict)
    _index: int = 0
    rotations: int = 0

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("KeyPool needs at least one key")

    def current(self) -> str:
        now = time.monotonic()
        for step in range(len(self.keys)):
            key = self.keys[(self._index + step) % len(self.keys)]
            if self._resting_until.get(key, 0.0) <= now:
                self._index = (self._index + step) % len(self.keys)
                return key
        return min(self.keys, key=lambda k: self._resting_until.get(k, 0.0))

    def rate_limited(self, key: str) -> None:
        self._resting_until[key] = time.monotonic() + self.rest_seconds
        if self.keys[self._index] == key and len(self.keys) > 1:
            self._index = (self._index + 1) % len(self.keys)
            self.rotations += 1

    def __repr__(self) -> str:  # never print the keys themselves
        return f"KeyPool({len(self.keys)} keys, rotations={self.rotations})"
