"""Requests -> answers: serve from the response cache, send the rest, split failed batches.

The backend is created only when something is not cached, so a finished run reruns
without starting an engine. Responses are stored as they arrive by a writer thread that
commits what has queued up (at most `CacheWriter.most` answers, and never older than a few
milliseconds) in one transaction, so the fsync is off the backend's path and a crash loses
at most the requests in flight and the answers queued for that one commit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from ger.answers.parse import BatchParse, LabelMatcher, parse_batch
from ger.backends import Backend
from ger.records import Request, Response
from ger.run.cache import ResponseCache

log = logging.getLogger("ger")


@dataclass
class AskStats:
    cached: int = 0
    sent: int = 0
    failed: int = 0
    splits: int = 0  # batches split in halves and asked again (the reasons: BatchCounts)


@dataclass
class BatchCounts:
    """What batch mode met in the answers; reported in metrics.json's `batching`."""

    split_failed: int = 0  # batches split because the request failed
    split_cut: int = 0  # ... because the answer was cut at max_tokens (finish reason `length`)
    split_missing: int = 0  # ... because some sample had no record in the answer
    duplicate_records: int = 0  # records repeating a sample already answered (the first one counts)
    records_by_position: int = 0  # records without a usable id, matched by position
    unmatched_records: int = 0  # records whose id names no sample of the batch


class CacheWriter:
    """Stores responses from a background thread, committing what queued up in one transaction.

    After the first answer of a batch it lingers a moment for more: against a fast server it would
    otherwise commit (and fsync) each answer on its own, which took twice the CPU (0.18 against
    0.09 ms an answer, 4,000 images against the instant stub). An answer received in that moment is
    still in flight: a kill -9 loses at most those, never one committed.
    """

    most = 64  # answers per commit at most
    linger = 0.01  # seconds a batch waits for more answers after its first

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache
        self._queue: queue.Queue[Response | None] = queue.Queue()
        self._error: BaseException | None = None
        self.context_cut = 0  # answers put that the cache does not keep (Response.context_cut)
        self._thread = threading.Thread(target=self._run, name="ger-cache-writer", daemon=True)
        self._thread.start()

    def put(self, response: Response) -> None:
        if self._error is not None:
            raise self._error
        self.context_cut += response.context_cut
        self._queue.put(response)

    def flush(self) -> None:
        """Return once everything put so far is committed (or raise what the writer met)."""
        self._queue.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            if first is not None and self._queue.qsize() < self.most:
                time.sleep(self.linger)
            while first is not None and len(batch) < self.most:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            answers = [r for r in batch if r is not None]
            try:
                if self._error is None:
                    self.cache.put_many(answers)
            except BaseException as exc:  # raised in the asking thread at its next put or flush
                self._error = exc
            for _ in batch:
                self._queue.task_done()
            if None in batch:
                return


class Unsent:
    """The requests of a feed (ger/run/stream.py Feed) that go to the backend: `sendable` answers the
    others on the spot. An iterator, plus poll(): the next one only if it is ready now (None if not;
    StopIteration at the end), which the server backend reads first, in its own thread.

    No local keeps a request (and its pixels) past its return: the feed counts them alive."""

    def __init__(self, feed: Any, sendable: Callable[[Request], bool]) -> None:
        self._feed, self._sendable = feed, sendable

    def __iter__(self) -> Unsent:
        return self

    def __next__(self) -> Request:
        while not self._sendable(request := next(self._feed)):
            pass
        return request

    def poll(self) -> Request | None:
        while (request := self._feed.poll()) is not None and not self._sendable(request):
            pass
        return request


class Asker:
    """Answers requests through the cache and a lazily created backend."""

    def __init__(self, cache: ResponseCache, make_backend: Callable[[], Backend], progress: bool = True):
        self.cache = cache
        self._make_backend = make_backend
        self._backend: Backend | None = None
        self.progress = progress
        self.stats = AskStats()
        self.batch = BatchCounts()
        self._writer: CacheWriter | None = None
        self._known: Any = None  # answers fetched already (looking_up()), else None: ask() queries the cache

    @contextmanager
    def looking_up(self, known: Any) -> Iterator[None]:
        """Within: ask() takes answers from `known` (ger/run/stream.py Prefetched, fetched with the keys)
        rather than query the cache for them a second time: a fully cached rerun asked every answer twice."""
        self._known = known
        try:
            yield
        finally:
            self._known = None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = self._make_backend()
        return self._backend

    def ask(
        self, requests: list[Request], desc: str = "requests", call: str = "generate"
    ) -> dict[str, Response]:
        """Answer every request (by key); failures come back as Response.error, never raised.

        `call` is the backend method that answers (the answer mode's: `generate`, `label_logprobs`)."""
        unique = list({r.key: r for r in requests}.values())
        answers = (self._known or self.cache).get_many([r.key for r in unique])
        self.stats.cached += len(answers)
        todo = [r for r in unique if r.key not in answers]
        if todo:
            bar = tqdm(total=len(todo), desc=desc, unit="req", disable=not self.progress)
            if self._writer is None:
                self._writer = CacheWriter(self.cache)
            try:
                for response in getattr(self.backend, call)(todo):
                    self._writer.put(response)  # committed within milliseconds, off this thread
                    answers[response.key] = response
                    self.stats.sent += 1
                    self.stats.failed += not response.ok
                    bar.update()
            finally:
                self._writer.flush()
            bar.close()
        for r in todo:  # a backend that drops a request must not lose the sample
            answers.setdefault(r.key, Response(r.key, error="the backend returned no response"))
        return answers

    def answer_feed(
        self,
        feed: Any,
        on_answer: Callable[[Request, Response], None],
        chunk: int,
        fresh: frozenset[str] = frozenset(),
        call: str = "generate",
    ) -> None:
        """Answer a Feed's requests (ger/run/stream.py) as they are built, calling on_answer for each.

        A backend that takes a stream (the server backend) reads the feed as room frees up; any
        other gets chunks of at most `chunk` requests through ask(). Cached answers (a batch's
        halves, say) are served without the backend; keys in `fresh` are known not to be cached
        and are not looked up (a lookup waits for the cache writer's commit). on_answer runs in one
        thread at a time.
        """
        if call != "generate" or not getattr(self.backend, "takes_stream", False):
            while self._answer_chunk(feed.take(chunk), on_answer, call):
                pass  # a chunk's requests are let go of before the next one is taken
            return
        lock = threading.Lock()  # cached answers are handed over from the thread reading the feed
        flying: dict[str, list[Request]] = {}
        if self._writer is None:
            self._writer = CacheWriter(self.cache)
        bar = tqdm(desc="requests", unit="req", disable=not self.progress)

        def sendable(req: Request) -> bool:
            """Whether to send `req`; else it is answered here (from the cache) or rides on its twin."""
            with lock:
                if req.key in flying:  # the same request already on its way: one answer for both
                    flying[req.key].append(req)
                    return False
                hit = None if req.key in fresh else self.cache.get_many([req.key]).get(req.key)
                if hit is not None:
                    self.stats.cached += 1
                    on_answer(req, hit)
                    return False
                flying[req.key] = [req]
                return True

        def answered(response: Response) -> None:
            with lock:
                for req in flying.pop(response.key, []):
                    on_answer(req, response)

        try:
            for response in self.backend.generate(Unsent(feed, sendable)):
                self._writer.put(response)  # committed within milliseconds, off this thread
                self.stats.sent += 1
                self.stats.failed += not response.ok
                bar.update()
                answered(response)
        finally:
            self._writer.flush()
            bar.close()
        for key, reqs in flying.items():  # a backend that drops a request must not lose the sample
            for req in reqs:
                on_answer(req, Response(key, error="the backend returned no response"))

    def _answer_chunk(
        self, requests: list[Request], on_answer: Callable[[Request, Response], None], call: str
    ) -> bool:
        answers = self.ask(requests, call=call)
        for req in requests:
            on_answer(req, answers[req.key])
        return bool(requests)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            if self._writer.context_cut:
                log.warning(
                    "%d answer(s) were cut by the engine's context limit before their max_tokens: used in "
                    "this run, not cached; raise max_model_len (the model's, or vllm serve --max-model-len)",
                    self._writer.context_cut,
                )
            self._writer = None
        if self._backend is not None:
            self._backend.close()


def ask_batches(
    asker: Asker,
    requests: list[Request],
    labels: list[str] | LabelMatcher,
    rebuild: Callable[[tuple[str, ...]], Request],
) -> dict[str, tuple[Request, Response, BatchParse]]:
    """The paper's batch mode: a batch that failed, was cut, or left a sample unanswered is split.

    Splitting halves each segment (20 -> 10 -> 5 -> 3/2 -> 1), as the paper's back-off
    did, so a bad batch never loses samples; a single-sample request is final.
    Returns, per sample name, the request that answered it, its response and parse.
    """
    out: dict[str, tuple[Request, Response, BatchParse]] = {}
    pending, round_no = requests, 0
    while pending:
        round_no += 1
        answers = asker.ask(pending, desc=f"batches (round {round_no})")
        retry: list[Request] = []
        for req in pending:
            resp = answers[req.key]
            parsed, halves = settle_batch(asker, req, resp, labels)
            retry += [rebuild(h) for h in halves]
            for name in req.names if not halves else ():
                out[name] = (req, resp, parsed)
        pending = retry
    return out


def settle_batch(
    asker: Asker, req: Request, resp: Response, labels: list[str] | LabelMatcher
) -> tuple[BatchParse, list[tuple[str, ...]]]:
    """One batch answer's parse, and the halves to ask again when it must be split (else none).

    Counts the split and its reason, or what the final answer met, in asker.stats and asker.batch.
    """
    parsed = parse_batch(resp.text if resp.ok else "", list(req.names), labels, list(req.ids) or None)
    reason = split_reason(resp, parsed)
    if len(req.names) > 1 and reason:
        half = (len(req.names) + 1) // 2
        asker.stats.splits += 1
        setattr(asker.batch, reason, getattr(asker.batch, reason) + 1)
        return parsed, [req.names[:half], req.names[half:]]
    asker.batch.duplicate_records += parsed.duplicates
    asker.batch.records_by_position += parsed.by_position
    asker.batch.unmatched_records += len(parsed.unmatched)
    return parsed, []


def split_reason(resp: Response, parsed: BatchParse) -> str | None:
    """Why a batch answer cannot be used as it is (the BatchCounts counter to raise), or None."""
    if not resp.ok:
        return "split_failed"
    if resp.finish_reason == "length":  # a cut answer may hold a fragment of its last record
        return "split_cut"
    if parsed.missing:
        return "split_missing"
    return None
