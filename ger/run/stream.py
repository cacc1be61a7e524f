"""The streaming stage of `ger run`: keys first, then decode -> request -> engine -> parse, continuously.

Every sample is first described without decoding (ger/data/media.py describe_sample: file digests,
frame count, transcript), which is enough to build its request's cache key. Groups (a sample in
single mode, a batch in batch mode) whose answers are all cached are answered from the shells:
a fully cached rerun decodes nothing and starts no engine. The others flow through a Feed: their
samples decode in a pool of worker processes (several to a task), ahead of the engine as far as
the window allows (at most `window` decoded samples alive at once, whatever the size of the test
set), and each request is built as soon as its samples are decoded. The server backend reads the
feed as room frees up, so requests stream out as they are built; engines that take lists get it in
chunks of half the window while the next chunk decodes. Answers are cached as they arrive
(ger/run/ask.py), so a kill loses only what is in flight.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tqdm import tqdm

from ger.answers.parse import LabelMatcher, parse_batch
from ger.backends.chat_format import wire_image
from ger.data.media import DECODED_FIELDS, MediaError, decode
from ger.data.undecodable import HUNG
from ger.records import LoadedSample, Request
from ger.run.cache import ResponseCache
from ger.run.workers import WorkerDied, WorkerPool, beat

log = logging.getLogger("ger")
Group = tuple[str, ...]
# one sample being decoded: (its worker task, its place in the task's results, its shell), or the shell
# itself when decoding runs in this process
Handle = tuple[Future, int, LoadedSample] | LoadedSample
_END = object()  # a feed with nothing more to give
WORKER_DIED = "WorkerDied: "  # the error row of a sample whose decoding ended its worker each time alone
_ALONE_TRIES = 2  # an unrelated kill (the OOM killer choosing that process) is not held against a sample


@dataclass
class StreamStats:
    """What the streaming stage did; metrics.json's `stream`."""

    window: int
    workers: int
    timeout_s: float | None = None  # most seconds a worker may spend on one sample before it is killed
    nice: int = 0  # how much lower the workers' scheduling priority is than ger's (stream.nice)
    from_cache: int = 0  # samples answered from cached answers without decoding
    decoded: int = 0  # samples whose media were decoded
    peak_decoded: int = 0  # most decoded samples alive at once (from submission until their pixels are freed)
    workers_lost: int = 0  # decoding workers that died (killed, or crashed in a decoder) and were replaced
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
    # JPEG quality of a backend that sends images over HTTP (BackendSettings.wire_quality): the worker
    # then hands back the images as sent (EncodedImage), never their pixels; None: PIL images
    wire: int | None = None


def _decode(shell: LoadedSample, spec: DecodeSpec) -> LoadedSample | str:
    """A decoded sample, or the error message its prediction row will carry (runs in a worker)."""
    try:  # decoded into a copy: the shell itself never holds pixels
        loaded = decode(replace(shell), spec.media_kind, frames=spec.frames, sampler=spec.sampler,
                        greyscale=spec.greyscale)  # fmt: skip
    except (MediaError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    except MemoryError as exc:  # frames no memory holds (a corrupt header's size): a row, not the run's end
        why, name = str(exc) or "no detail", shell.sample.name
        return f"MemoryError: decoding sample {name} ran out of memory ({why}); a rerun tries again"
    if spec.wire is not None and loaded.images:
        source, loaded.source = loaded.source, None  # a still's file is now its EncodedImage
        loaded.images = [wire_image(im, spec.wire, source) for im in loaded.images]
    return loaded


def _decode_task(shells: list[LoadedSample], spec: DecodeSpec) -> list[dict[str, Any] | str]:
    """_decode of several shells in one worker task, each handed back as what decoding added to it
    (media.DECODED_FIELDS) or its error message. A task and a result message per sample, the shell
    and its paths pickled both ways, cost the pool's threads in the main process 0.51 ms a sample
    (640x480 JPEGs); 8 to a task and only the decoded fields back, 0.19 ms."""
    out: list[dict[str, Any] | str] = []
    for shell in shells:
        loaded = _decode(shell, spec)
        out.append(loaded if isinstance(loaded, str) else {f: getattr(loaded, f) for f in DECODED_FIELDS})
        beat()  # the task's timeout is one sample's: a hung decoder is told from a long task
    return out


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


def sample_timeout(stream_cfg: Any) -> float | None:
    """stream.timeout_s: the most seconds a decoding worker may spend on one sample, or None."""
    timeout = stream_cfg.get("timeout_s")
    if timeout is None:
        return None
    if float(timeout) <= 0:
        raise ValueError(f"stream.timeout_s must be > 0 or null, got {timeout}")
    return float(timeout)


def worker_nice(stream_cfg: Any) -> int:
    """stream.nice: how much lower the decoding workers' priority is than ger's (0 to 19)."""
    nice = int(stream_cfg.get("nice") or 0)
    if not 0 <= nice <= 19:
        raise ValueError(f"stream.nice must be 0 to 19 (decoding at lower priority only), got {nice}")
    return nice


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
        self._pool: WorkerPool | None = None
        self._lock = threading.Lock()
        self.bar: tqdm | None = None
        self.on_free: Callable[[], None] | None = None
        self.decoded_names: set[str] = set()  # decoded in this run: a hang remembered for one is forgotten
        # samples per worker task: up to 8, fewer where the window is small, so every worker still
        # gets work while a window's worth decodes
        self.per_task = max(1, min(8, stats.window // (4 * max(1, stats.workers))))

    def _freed(self) -> None:
        with self._lock:
            self.stats._alive -= 1
        if self.on_free is not None:
            self.on_free()  # a feed waiting for room

    def start(self, shells: list[LoadedSample], total: int) -> list[Handle]:
        """Begin decoding `shells` (in order, per_task to a worker task); counted as alive from now
        until their pixels are freed."""
        if self.bar is None:
            self.bar = tqdm(total=total, desc="loading media", unit="sample", disable=not self.progress)
        with self._lock:
            self.stats._alive += len(shells)
            self.stats.peak_decoded = max(self.stats.peak_decoded, self.stats._alive)
        if not self.stats.workers:
            return list(shells)  # decoded in collect(), in this process
        if self._pool is None:
            self._pool = WorkerPool(self.stats.workers, "ger-decoders", self.stats.nice)
        handles: list[Handle] = []
        for i in range(0, len(shells), self.per_task):
            task = self._submit(shells[i : i + self.per_task])
            handles += [(task, j, shell) for j, shell in enumerate(shells[i : i + self.per_task])]
        return handles

    def _submit(self, shells: list[LoadedSample]) -> Future:
        assert self._pool is not None
        return self._pool.submit(_decode_task, shells, self.spec, timeout=self.stats.timeout_s)

    @staticmethod
    def ready(handles: list[Handle]) -> bool:
        """Whether collect(handles) returns without waiting for a worker (a sample whose worker died
        is decoded again there, so it is not)."""
        return all(not isinstance(h, tuple) or (h[0].done() and not _lost(h[0])) for h in handles)

    def collect(self, handles: list[Handle]) -> list[LoadedSample | str]:
        """The decoded samples (or error messages) of start(), in its order."""
        out = []
        for h in handles:
            if isinstance(h, tuple):
                task, j, shell = h
                try:
                    results = task.result()
                    result, results[j] = results[j], None  # the task's list lets go of the pixels
                except WorkerDied:
                    result = self._decode_alone(shell)
                result = result if isinstance(result, str) else replace(shell, **result)
            else:
                result = _decode(h, self.spec)
            if isinstance(result, LoadedSample):
                self.decoded_names.add(result.sample.name)
            if isinstance(result, LoadedSample) and result.images:
                weakref.finalize(result.images[0], self._freed)
            else:
                self._freed()  # nothing decoded to keep
            out.append(result)
            self.stats.decoded += 1
            if self.bar is not None:
                self.bar.update()
        return out

    def _decode_alone(self, shell: LoadedSample) -> dict[str, Any] | str:
        """What decoding `shell` adds to it, decoded as a task of its own: its task was running when
        its worker died or was killed for hanging, so the sample that ended it (a decoder aborting or
        hanging on a corrupt file, a clip too large for memory) may be this one. Alone, an ended
        worker is the sample's own doing: after _ALONE_TRIES it gets an error row; any other sample of
        the task decodes as if nothing happened.

        A death is not remembered (the system may have killed the process for memory others were
        using), so a rerun tries again. A hang each time is: the pool itself killed the worker for
        making no progress, and a rerun would wait out the timeout _ALONE_TRIES + 1 times again for
        the same row (ger/data/undecodable.py keeps it with the timeout it was given)."""
        deaths = []
        for _ in range(_ALONE_TRIES):
            try:
                return self._submit([shell]).result()[0]
            except WorkerDied as exc:
                deaths.append(exc)
        media = os.fspath(shell.sample.media or shell.sample.name)
        log.warning("decoding %s ended its worker each of %d times alone: an error row", media, _ALONE_TRIES)
        if all(d.hung_after is not None for d in deaths):
            waited = deaths[-1].hung_after
            return (f"{HUNG}decoding {media} made no progress for {waited:g} s (stream.timeout_s) each of "
                    f"the {_ALONE_TRIES} times it was tried alone, and its worker was killed; a rerun gives "
                    "this row without decoding it, unless stream.timeout_s is longer")  # fmt: skip
        return (f"{WORKER_DIED}decoding {media} ended its worker each of the {_ALONE_TRIES} times it was "
                f"tried alone, the last: {deaths[-1]} (a decoder that crashes or hangs on the file, or the "
                "system killing the process for memory); a rerun tries again")  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._pool is not None:
            self._pool.close()
            self.stats.workers_lost = self._pool.deaths
            self._pool = None


def _lost(task: Future) -> bool:
    """Whether a finished task failed because its worker died."""
    return not task.cancelled() and isinstance(task.exception(), WorkerDied)


class Prefetched:
    """A ResponseCache's answers to many keys fetched at once (one query per 500 keys, not one per
    key: a tenth of a fully cached rerun); keys not among them are looked up in the cache."""

    def __init__(self, cache: ResponseCache, keys: list[str]) -> None:
        self.cache, self._asked, self._found = cache, set(keys), cache.get_many(keys)

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        out = {k: self._found[k] for k in keys if k in self._found}
        missing = [k for k in keys if k not in self._asked]
        return {**out, **self.cache.get_many(missing)} if missing else out


def answered_from_cache(
    group: Group,
    key_for: Callable[[Group], Any],
    cache: ResponseCache | Prefetched,
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


class Feed:
    """The requests of `groups`, built as their samples decode, never more than `window` decoded alive.

    An iterator (the server backend polls it for requests ready now and waits for the next one in a
    thread of its own, as room frees up) that also hands out chunks (take(), for engines that take
    lists). Decoding runs ahead in the worker pool as far
    as the window allows: a group is submitted only while the decoded samples alive (Decoder's
    count, until the garbage collector frees their pixels) leave room for it, so answered requests
    must be dropped by whoever holds them. The consumer reports each answered request with done(),
    and a batch it splits with retry() before that, so the iterator ends only when nothing it gave
    out can come back. Samples whose media fail to decode end up in `errors`.
    """

    def __init__(
        self,
        groups: list[Group],
        shells: dict[str, LoadedSample],
        decoder: Decoder,
        window: int,
        build: Callable[[dict[str, LoadedSample], Group], Request],
    ) -> None:
        self._groups, self._shells, self.decoder, self.window = deque(groups), shells, decoder, window
        self._build = build
        self._total = self._waiting = sum(len(g) for g in groups)  # all; those not yet submitted
        self._decoding: deque[tuple[Group, list]] = deque()
        self._retries: deque[Request] = deque()
        self._samples: dict[str, LoadedSample] = {}  # decoded, held until their answers are final
        self._outstanding = 0  # requests given out or queued for retry, not yet done()
        self._closed = False
        self._cond = threading.Condition(threading.RLock())  # re-entrant: a finalizer may run inside
        decoder.on_free = self._wake
        self.errors: dict[str, str] = {}

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _top_up(self, force: bool = False) -> None:
        """Submit the next groups for decoding while the window leaves room (one anyway when `force`).

        While others are still decoding, it waits until there is room for a whole worker task
        (Decoder.per_task samples, or all that is left), so the workers get full tasks, not one
        sample each time an answer frees one."""
        alive = self.decoder.stats._alive
        if not force and self._decoding and self.window - alive < min(self.decoder.per_task, self._waiting):
            return
        batch: list[Group] = []
        size = 0
        while self._groups:
            after = size + len(self._groups[0])
            if not (force or alive + after <= self.window or (not alive and not batch)):
                break
            batch.append(self._groups.popleft())
            size, force = after, False
        if not batch:
            return
        self._waiting -= size
        handles = self.decoder.start([self._shells[n] for g in batch for n in g], self._total)
        for group in batch:
            self._decoding.append((group, handles[: len(group)]))
            handles = handles[len(group) :]

    def _pull(self, block: bool, decoded_only: bool = False) -> Request | None | object:
        """The next request; None when one would have to wait (block=False; with decoded_only, also
        when its samples are still decoding); _END when all are done."""
        while True:
            with self._cond:
                head = None
                while head is None:
                    if self._closed:
                        return _END
                    if self._retries:
                        return self._retries.popleft()
                    self._top_up()
                    if self._decoding:
                        if decoded_only and not self.decoder.ready(self._decoding[0][1]):
                            return None
                        head = self._decoding.popleft()
                        self._top_up()
                    elif not self._groups and not self._outstanding:
                        return _END
                    elif decoded_only and not self._outstanding and self._groups:
                        return None  # the blocking read waits for pixels to be freed
                    elif not self._outstanding and self._groups:
                        # only pixels not yet freed block (the consumer is letting go of its last answer):
                        # give them a moment, then go on anyway (a holder that never lets go shows in
                        # peak_decoded), so the feed never stalls
                        if not self._cond.wait(0.2):
                            self._top_up(force=True)
                    elif not block:
                        return None
                    else:
                        self._cond.wait(0.5)
            group, handles = head
            results = self.decoder.collect(handles)  # waits for the workers, outside the lock
            with self._cond:
                kept = []
                for name, result in zip(group, results, strict=True):
                    if isinstance(result, str):
                        self.errors[name] = result
                    else:
                        self._samples[name] = result
                        kept.append(name)
                del results
                if kept:
                    self._outstanding += 1
                    return self._build(self._samples, tuple(kept))

    def __iter__(self) -> Feed:
        return self

    def __next__(self) -> Request:
        request = self._pull(block=True)
        if request is _END:
            raise StopIteration
        return request  # type: ignore[return-value]

    def poll(self) -> Request | None:
        """The next request if it is ready now (its samples decoded), else None; StopIteration at the end.

        The server backend reads the feed here first, in its own thread: handing each request over
        from a reading thread cost 0.15 ms of CPU a request."""
        request = self._pull(block=False, decoded_only=True)
        if request is _END:
            raise StopIteration
        return request  # type: ignore[return-value]

    def take(self, most: int) -> list[Request]:
        """At most `most` requests, at least one unless all are done (a chunk for list-taking engines)."""
        first = self._pull(block=True)
        out: list[Request] = []
        while first is not _END and first is not None:
            out.append(first)  # type: ignore[arg-type]
            first = self._pull(block=False) if len(out) < most else None
        return out

    def retry(self, names: Group) -> None:
        """Ask again for `names` (half of a split batch), before done() of the request they were in."""
        with self._cond:
            self._retries.append(self._build(self._samples, names))
            self._outstanding += 1
            self._cond.notify_all()

    def done(self, final: Group) -> None:
        """One request given out is answered; the samples of `final` are answered for good."""
        with self._cond:
            for name in final:
                self._samples.pop(name, None)
            self._outstanding -= 1
            self._cond.notify_all()

    def close(self) -> None:
        """Stop: a reader waiting in the feed returns, and nothing more is built."""
        with self._cond:
            self._closed = True
            self._samples.clear()
            self._decoding.clear()
            self._cond.notify_all()
        self.decoder.on_free = None
