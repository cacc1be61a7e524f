"""The streaming stage of `ger run`: keys first, then decode -> ask -> parse a window at a time.

Every sample is first described without decoding (ger/data/media.py describe_sample: file digests,
frame count, transcript), which is enough to build its request's cache key. Groups (a sample in
single mode, a batch in batch mode) whose answers are all cached are answered from the shells:
a fully cached rerun decodes nothing and starts no engine. The others are cut into chunks of at
most half the window; while one chunk is being asked, the next one decodes in a pool of worker
processes, so the engine starts as soon as the first chunk is decoded and at most `window`
decoded samples (two chunks; at least two whole batches) are alive at once, whatever the size of
the test set. Answers are cached as they arrive (ger/run/ask.py), so a kill loses only what is in flight.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from typing import Any

from tqdm import tqdm

from ger.answers.parse import LabelMatcher, parse_batch
from ger.data.media import MediaError, decode
from ger.records import LoadedSample
from ger.run.cache import ResponseCache

log = logging.getLogger("ger")
Group = tuple[str, ...]


@dataclass
class StreamStats:
    """What the streaming stage did; metrics.json's `stream`."""

    window: int
    workers: int
    from_cache: int = 0  # samples answered from cached answers without decoding
    decoded: int = 0  # samples whose media were decoded
    peak_decoded: int = 0  # most decoded samples alive at once (from submission until their pixels are freed)
    _alive: int = field(default=0, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


@dataclass(frozen=True)
class DecodeSpec:
    """How shells become pixels (the arguments of ger/data/media.py decode)."""

    media_kind: str
    frames: int
    sampler: str
    greyscale: bool


def _decode(shell: LoadedSample, spec: DecodeSpec) -> LoadedSample | str:
    """A decoded sample, or the error message its prediction row will carry (runs in a worker)."""
    try:  # decoded into a copy: the shell itself never holds pixels
        return decode(replace(shell), spec.media_kind, frames=spec.frames, sampler=spec.sampler,
                      greyscale=spec.greyscale)  # fmt: skip
    except (MediaError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"


def window_size(stream_cfg: Any, backend_cfg: Any) -> int:
    """stream.window, or twice what keeps the backend busy: 2 x concurrency, chunk_size or 4 x batch_size."""
    if stream_cfg.get("window"):
        window = int(stream_cfg.get("window"))
        if window < 1:
            raise ValueError(f"stream.window must be >= 1 or null, got {window}")
        return window
    concurrency, chunk, batch = (backend_cfg.get(k) for k in ("concurrency", "chunk_size", "batch_size"))
    unit = 2 * int(concurrency) if concurrency else int(chunk or 0) or 4 * int(batch or 0)
    return 2 * max(16, unit)


def worker_count(stream_cfg: Any) -> int:
    """stream.workers, or one decoding process per core; 0 decodes in this process."""
    workers = stream_cfg.get("workers")
    workers = len(os.sched_getaffinity(0)) if workers is None else int(workers)
    if workers < 0:
        raise ValueError(f"stream.workers must be >= 0 or null, got {workers}")
    return workers


class Decoder:
    """Decodes shells in worker processes (started on first use), counting decoded samples alive.

    A sample counts from the moment it is submitted until the garbage collector frees its first
    image (a weakref finalizer), so anything that keeps pixels past their chunk (a request held
    for the report, a backend's buffer) shows in peak_decoded, not only the loop's own bound.
    """

    def __init__(self, spec: DecodeSpec, stats: StreamStats, progress: bool = True) -> None:
        self.spec, self.stats, self.progress = spec, stats, progress
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self.bar: tqdm | None = None

    def _freed(self) -> None:
        with self._lock:
            self.stats._alive -= 1

    def start(self, shells: list[LoadedSample], total: int) -> list[Future | LoadedSample | str]:
        """Begin decoding `shells` (in order); counted as alive from now until their pixels are freed."""
        if self.bar is None:
            self.bar = tqdm(total=total, desc="loading media", unit="sample", disable=not self.progress)
        with self._lock:
            self.stats._alive += len(shells)
            self.stats.peak_decoded = max(self.stats.peak_decoded, self.stats._alive)
        if not self.stats.workers:
            return list(shells)  # decoded in collect(), in this process
        if self._pool is None:
            ctx = get_context("spawn")  # never fork a process that may hold an engine's threads
            self._pool = ProcessPoolExecutor(self.stats.workers, mp_context=ctx)
        return [self._pool.submit(_decode, s, self.spec) for s in shells]

    def collect(self, handles: list[Future | LoadedSample | str]) -> list[LoadedSample | str]:
        """The decoded samples (or error messages) of start(), in its order."""
        out = []
        for h in handles:
            result = h.result() if isinstance(h, Future) else _decode(h, self.spec)  # type: ignore[arg-type]
            if isinstance(result, LoadedSample) and result.images:
                weakref.finalize(result.images[0], self._freed)
            else:
                self._freed()  # nothing decoded to keep
            out.append(result)
            self.stats.decoded += 1
            if self.bar is not None:
                self.bar.update()
        return out

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def answered_from_cache(
    group: Group,
    key_for: Callable[[Group], Any],
    cache: ResponseCache,
    matcher: LabelMatcher,
    batch: bool,
) -> bool:
    """Whether `group` is answered by cached answers alone, splits included (no decoding needed)."""
    req = key_for(group)
    resp = cache.get_many([req.key]).get(req.key)
    if resp is None:
        return False
    if not batch or len(group) == 1:
        return True
    from ger.run.ask import split_reason

    parsed = parse_batch(resp.text if resp.ok else "", list(req.names), matcher, list(req.ids) or None)
    if not split_reason(resp, parsed):
        return True
    half = (len(group) + 1) // 2
    return all(answered_from_cache(g, key_for, cache, matcher, batch) for g in (group[:half], group[half:]))


def chunks(groups: list[Group], size: int) -> list[list[Group]]:
    """Consecutive groups, at most `size` samples a chunk (but at least one group)."""
    out: list[list[Group]] = []
    count = 0
    for g in groups:
        if not out or count + len(g) > size:
            out.append([])
            count = 0
        out[-1].append(g)
        count += len(g)
    return out


def decoded_chunks(
    groups: list[Group], shells: dict[str, LoadedSample], decoder: Decoder, window: int
) -> Iterator[tuple[list[Group], dict[str, LoadedSample], dict[str, str]]]:
    """Each chunk's groups (decode failures dropped from them), decoded samples and errors, while
    the next chunk decodes; the caller must drop a chunk's samples before it asks for the next one."""
    parts = chunks(groups, max(1, window // 2))
    total = sum(len(g) for g in groups)
    handles = decoder.start([shells[n] for g in parts[0] for n in g], total) if parts else []
    for i, part in enumerate(parts):
        names = [n for g in part for n in g]
        results = decoder.collect(handles)
        handles = (
            decoder.start([shells[n] for g in parts[i + 1] for n in g], total) if i + 1 < len(parts) else []
        )
        loaded = {n: r for n, r in zip(names, results, strict=True) if isinstance(r, LoadedSample)}
        errors = {n: r for n, r in zip(names, results, strict=True) if isinstance(r, str)}
        kept = [tuple(n for n in g if n in loaded) for g in part]
        del results
        yield [g for g in kept if g], loaded, errors
        del loaded
