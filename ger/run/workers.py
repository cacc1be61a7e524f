"""Worker processes for decoding that outlive a worker's death, each with a pipe of its own.

A decoder may abort the process on a corrupt file (decord's threaded decoder does on some broken
H.264), and the kernel's OOM killer picks a large process, often one holding a long clip's frames.
concurrent.futures.ProcessPoolExecutor then fails every task it holds and takes no more; worse,
its workers share one result pipe under one lock, so a worker killed while writing its result
leaves half a message there: the pool's reader waits for the rest for ever (`ger run` hung with no
error), and the other workers wait for the lock for ever (they outlived the run). Here each worker
has its own pipe, so a death shows as that pipe's end of file or the process's sentinel, never as
a stall; the task it was running fails with WorkerDied (the one that may have killed it), the task
queued behind it goes to another worker, and a new process takes its place.

One thread in the parent owns the workers and their pipes: submit() only queues a task and wakes
that thread, so a caller holding the feed's lock never waits for a worker.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from typing import Any

log = logging.getLogger("ger")

_DEPTH = 2  # tasks sent to a worker at once: the next one waits in its pipe, so it never idles between tasks
_FAILED_STARTS = 3  # workers in a row that exit before they start: they cannot; the pool stops
_BEAT = "beat"  # a worker's word that its task is making progress (beat())
_BEAT_EVERY = 1.0  # seconds: a worker says so at most this often, so fast tasks send nothing extra


class WorkerDied(RuntimeError):
    """The worker process running a task died before it answered (killed, or crashed in native code).

    hung_after: the timeout it was killed for, when the pool killed it for making no progress; None
    when it died of anything else (a crash, a signal from outside, the system's OOM killer).
    """

    def __init__(self, message: str, hung_after: float | None = None) -> None:
        super().__init__(message)
        self.hung_after = hung_after


class WorkersCannotStart(RuntimeError):
    """Worker processes exit as they start, before running anything: no task's doing, so the pool stops."""


@dataclass
class _Task:
    future: Future
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    timeout: float | None  # most seconds without progress (a beat) before its worker is killed


@dataclass
class _Worker:
    process: Any  # multiprocessing.Process (spawned)
    conn: Connection
    sent: deque[_Task] = field(default_factory=deque)  # in the order the worker runs them
    ready: bool = False  # it said it started: a death from then on is a task's doing
    since: float = 0.0  # when its running task started or last said it was making progress
    overdue: float | None = None  # the timeout it was killed for


_conn: Connection | None = None  # in a worker: its pipe to the pool (beat())
_last_beat = 0.0


def beat() -> None:
    """Tell the pool the running task is making progress; a task that works through several items
    calls it after each, so its timeout measures one item, not the whole task. A no-op outside a
    worker."""
    global _last_beat
    now = time.monotonic()
    if _conn is not None and now - _last_beat >= _BEAT_EVERY:
        _last_beat = now
        _conn.send(_BEAT)


def _serve(conn: Connection, nice: int = 0) -> None:
    """A worker: say it started (None), then run each task sent and answer (True, result) or
    (False, exception), until None."""
    global _conn, _last_beat
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it closes the pool
    if nice:
        os.nice(nice)  # lower priority only, which needs no privilege
    _conn = conn
    conn.send(None)
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        fn, args = task
        _last_beat = time.monotonic()
        try:
            answer: tuple[bool, Any] = (True, fn(*args))
        except Exception as exc:  # handed to the caller, as a pool would
            answer = (False, exc)
        try:
            conn.send(answer)
        except OSError:  # the parent is gone
            return
        except Exception as exc:  # a result or an error that does not pickle
            conn.send((False, RuntimeError(f"the worker's answer could not be sent back: {exc!r}")))


class WorkerPool:
    """`size` spawned worker processes running submitted calls; a worker that dies is replaced.

    Spawned, never forked: the parent may hold an engine's threads. `nice`: how much lower the
    workers' scheduling priority is than the parent's (os.nice), so that work waiting on the parent
    is not kept waiting by work the pool does ahead of need.
    """

    def __init__(self, size: int, name: str = "ger-workers", nice: int = 0) -> None:
        if size < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {size}")
        if not 0 <= nice <= 19:
            raise ValueError(f"a worker pool's nice must be 0 to 19 (lower priority only), got {nice}")
        self.size, self.nice = size, nice
        self.deaths = 0  # workers that died while the pool was open
        self._failed_starts = 0  # workers in a row that exited before they started
        self._ctx = get_context("spawn")
        self._inbox: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)  # a full pipe already wakes the managing thread
        self._closed = False
        self._stopped = False  # the managing thread takes no more tasks (closed, or failed)
        self._failed: BaseException | None = None  # what stopped the managing thread, if not close()
        # held only to read or set _stopped: a task is either taken by the managing thread or refused
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._manage, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Future:
        """`fn(*args)` in a worker; the future fails with WorkerDied if its worker dies running it, or
        is killed after `timeout` seconds without progress (from the start, or from its last beat())."""
        future: Future = Future()
        task = _Task(future, fn, args, timeout)
        with self._lock:
            if self._closed or self._stopped:
                raise RuntimeError(f"submit() on a stopped WorkerPool ({self._failed or 'closed'})")
            self._inbox.put(task)
        self._wake()
        return future

    def close(self) -> None:
        """Stop the workers and wait for them; tasks not finished yet are cancelled."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._inbox.put(None)
        self._wake()
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass

    # ------------------------------------------------------------ the managing thread

    def _manage(self) -> None:
        workers: list[_Worker] = []
        waiting: deque[_Task] = deque()
        try:
            while self._take_inbox(waiting):
                self._dispatch(workers, waiting)
                self._wait_once(workers, waiting)
        except BaseException as exc:  # every caller gets it: a fault here would leave them waiting forever
            self._failed = exc
            if not isinstance(exc, WorkersCannotStart):
                log.exception("the decoding workers' managing thread stopped")
        finally:
            self._stop(workers, waiting)

    def _take_inbox(self, waiting: deque[_Task]) -> bool:
        """Move submitted tasks to `waiting`; False once close() was called."""
        while True:
            try:
                task = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if task is None:
                return False
            waiting.append(task)

    def _dispatch(self, workers: list[_Worker], waiting: deque[_Task]) -> None:
        """Send waiting tasks to workers with room, starting workers up to `size` while there is work."""
        while waiting and len(workers) < self.size:
            workers.append(self._start_worker())
        for worker in workers:
            while waiting and len(worker.sent) < _DEPTH:
                task = waiting.popleft()
                # running already: sent before to a worker that died with it queued
                if not task.future.running() and not task.future.set_running_or_notify_cancel():
                    continue  # cancelled while it waited
                try:
                    worker.conn.send((task.fn, task.args))
                except (OSError, ValueError):  # its pipe is closed: the worker died; _wait_once sees it
                    waiting.appendleft(task)
                    break
                except Exception as exc:  # the task's arguments do not pickle
                    task.future.set_exception(exc)
                    continue
                if not worker.sent:
                    worker.since = time.monotonic()
                worker.sent.append(task)

    def _start_worker(self) -> _Worker:
        ours, theirs = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_serve, args=(theirs, self.nice), daemon=True)
        process.start()
        theirs.close()  # the worker holds the only other end: its death closes the pipe
        return _Worker(process, ours)

    def _wait_once(self, workers: list[_Worker], waiting: deque[_Task]) -> None:
        """Wait for an answer, a death, a wake-up or a task's timeout, and handle what came."""
        conns = {w.conn: w for w in workers}
        sentinels = {w.process.sentinel: w for w in workers}
        ready = set(wait([self._wake_r, *conns, *sentinels], self._next_timeout(workers)))
        if self._wake_r in ready:
            os.read(self._wake_r, 4096)
        self._kill_overdue(workers)
        dead: list[_Worker] = []
        for conn in ready & conns.keys():
            worker = conns[conn]
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the worker died, maybe halfway through its answer
                dead.append(worker)
                continue
            worker.since = time.monotonic()  # it started, made progress, or its next task starts
            if message is None:
                worker.ready, self._failed_starts = True, 0
                continue
            if message == _BEAT:
                continue
            ok, value = message
            task = worker.sent.popleft()
            task.future.set_result(value) if ok else task.future.set_exception(value)
        for sentinel in ready & sentinels.keys():
            worker = sentinels[sentinel]
            if worker not in dead and not worker.conn.poll():
                dead.append(worker)  # answers it left in its pipe are read first, in the next rounds
        for worker in dead:
            workers.remove(worker)
            self._bury(worker, waiting)

    @staticmethod
    def _timed(worker: _Worker) -> float | None:
        """The timeout of the task a started worker is running, if it has one and was not killed yet."""
        if worker.ready and worker.sent and worker.overdue is None:
            return worker.sent[0].timeout
        return None

    def _next_timeout(self, workers: list[_Worker]) -> float | None:
        """Seconds until the first running task's timeout, None when none has one."""
        ends = [w.since + t for w in workers if (t := self._timed(w))]
        return max(0.0, min(ends) - time.monotonic()) if ends else None

    def _kill_overdue(self, workers: list[_Worker]) -> None:
        """Kill each worker whose running task went past its timeout without progress (a decoder that
        hangs in native code holding the GIL answers no signal but SIGKILL); _bury takes it from there."""
        now = time.monotonic()
        for worker in workers:
            timeout = self._timed(worker)
            if timeout and now - worker.since >= timeout:
                worker.overdue = timeout
                worker.process.kill()

    def _bury(self, worker: _Worker, waiting: deque[_Task]) -> None:
        """A worker died: the task it was running fails, the ones queued behind it wait for another.
        One that died before it started ran nothing: its tasks all wait for another."""
        self.deaths += 1
        _reap(worker.process)  # still running only if its pipe was closed under it (a library closing files)
        code = worker.process.exitcode
        worker.conn.close()
        how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        if worker.overdue is not None:
            how = f"killed after {worker.overdue:g} s without progress: a decoder that hangs"
        if worker.sent and worker.ready:
            running = worker.sent.popleft()
            died = WorkerDied(f"the worker process running this task died ({how})", worker.overdue)
            running.future.set_exception(died)
        waiting.extendleft(reversed(worker.sent))
        if not worker.ready and code is not None and code > 0:
            self._failed_starts += 1
            if self._failed_starts >= _FAILED_STARTS:
                raise WorkersCannotStart(
                    f"{_FAILED_STARTS} decoding workers in a row exited as they started ({how}); their "
                    "error is printed above (a script that starts a run needs `if __name__ == '__main__':`)"
                )
        log.warning("a decoding worker died (%s); a new one takes its place", how)

    def _stop(self, workers: list[_Worker], waiting: deque[_Task]) -> None:
        """Cancel what is left, then stop the workers: the idle ones are asked to, the busy ones killed
        (their answers would go unread; Ctrl-C should not wait for a long clip to decode)."""
        with self._lock:
            self._stopped = True
        while not self._take_inbox(waiting):  # what was submitted until then
            pass
        why = self._failed or RuntimeError("the worker pool was closed")
        for task in [*waiting, *(t for w in workers for t in w.sent)]:
            if not task.future.cancel() and not task.future.done():
                task.future.set_exception(why)
        for worker in workers:
            try:
                worker.process.kill() if worker.sent else worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in workers:
            _reap(worker.process)
            worker.conn.close()


def _reap(process: Any) -> None:
    """Wait for a worker process that should be ending; one still running after 5 s is killed."""
    process.join(timeout=5)
    if process.is_alive():
        process.kill()
        process.join()
