"""A digest of the model snapshot an engine will load, for cache keys.

A model's name says nothing about which weights answered: a hub repo moves on when its
owner pushes a fix, and a local folder can be overwritten. So the cache key holds a
digest of what is on disk where the engine resolves the model: a local folder as given,
or a hub id in the local Hugging Face cache (local files only, honouring `revision`).

What is hashed: every file's name and size, and the bytes of every file except large
weights. Config, generation config, weight index, processor, tokenizer and chat template
files are small and hashed whole. Weight files (safetensors, bin, ...) are hashed whole
only while all of them together stay under WEIGHT_BYTES_HASHED (tiny models); larger
checkpoints are keyed on their weight index plus each shard's name and size, since
hashing gigabytes on every run would be too slow. Digests are memoised per folder and
file mtimes, so a rerun in one process is a stat walk.

A hub model not on disk yet cannot be hashed: the key then holds the `revision` pin
alone (a warning says so), and the first run after the download keys differently.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
WEIGHT_BYTES_HASHED = 64 * 1024 * 1024  # hash weight bytes whole below this total (tiny models)
CHUNK = 1 << 20

_memo: dict[tuple, str] = {}  # (folder, file stats) -> digest
_warned: set[tuple[str, str | None]] = set()  # hub models already reported as not on disk


@dataclass(frozen=True)
class FileStat:
    rel: str
    size: int
    mtime_ns: int
    weight: bool


def find_snapshot(path: str, revision: str | None) -> Path | None:
    """The folder the engine will load `path` from, or None when a hub model is not on disk yet."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local.resolve()
    try:
        from huggingface_hub import constants

        if not (Path(constants.HF_HUB_CACHE) / f"models--{path.replace('/', '--')}").is_dir():
            return None  # not downloaded: known without importing snapshot_download (~0.25 s)
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id=path, revision=revision, local_files_only=True)
    except Exception as exc:  # not cached, not a valid repo id, no huggingface_hub: nothing to hash
        log.debug("no local snapshot of %s@%s: %s", path, revision, exc)
        return None
    return Path(folder)


def _stats(folder: Path) -> list[FileStat]:
    """Every file under `folder` (following the hub cache's symlinks), hidden folders skipped."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            st = path.stat()  # follows the link to the blob
            rel = path.relative_to(folder).as_posix()
            found.append(FileStat(rel, st.st_size, st.st_mtime_ns, name.endswith(WEIGHT_SUFFIXES)))
    return found


def _hash_file(h: hashlib._Hash, path: Path) -> None:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)


def folder_digest(folder: Path) -> str:
    """sha256 over names, sizes and contents (weights by name and size when large); memoised."""
    stats = _stats(folder)
    memo_key = (str(folder), tuple(stats))
    if memo_key in _memo:
        return _memo[memo_key]
    weight_bytes = sum(s.size for s in stats if s.weight)
    hash_weights = weight_bytes <= WEIGHT_BYTES_HASHED
    h = hashlib.sha256()
    for s in stats:
        h.update(f"{s.rel}\0{s.size}\0".encode())
        if hash_weights or not s.weight:
            _hash_file(h, folder / s.rel)
        h.update(b"\0")
    digest = h.hexdigest()[:16]
    _memo[memo_key] = digest
    return digest


def snapshot_identity(path: str, revision: str | None) -> dict[str, str | None]:
    """`{"snapshot": digest}` for a model on disk; `{"snapshot": None, ...}` with a warning if not."""
    folder = find_snapshot(path, revision)
    if folder is None:
        if (path, revision) not in _warned:  # once per process: identity() is asked several times a run
            _warned.add((path, revision))
            log.warning(
                "model %s (revision %s) is not on disk yet; its cache key holds the revision pin only, "
                "so answers of a changed checkpoint may be reused until it is downloaded "
                "(pin `revision:` in the model config, or download the model first)",
                path,
                revision,
            )
        return {"snapshot": None, "snapshot_note": "not on disk when keyed"}
    return {"snapshot": folder_digest(folder)}
