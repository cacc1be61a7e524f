"""Decoding workers that outlive a worker's death (ger/run/workers.py), and a run around them:

- a worker killed halfway through writing its answer (where ProcessPoolExecutor's shared pipe left
  its reader waiting forever) fails only the task it ran; the tasks queued behind it finish;
- a task whose worker dies fails with WorkerDied, an ordinary exception reaches the caller as it
  was (an answer or argument that does not pickle fails its own task), and the pool goes on with
  new processes; close() stops them all;
- workers that exit as they start (a script that starts a pool without a main guard) stop the
  pool with an error instead of being started again for ever;
- a task that makes no progress for longer than its timeout (a decoder hanging in native code) has
  its worker killed; a long task that says it is making progress (beat()) is left alone;
- a sample whose decoding kills or hangs its worker every time gets an error row of its own, and
  the samples that shared its task decode as if nothing happened.

A run whose workers are killed midway: tests/test_stream.py.

The functions the workers run live here, at module level: the spawned workers import this module.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from pathlib import Path

import pytest
from conftest import REPO
from test_stream import LABELS, draw

from ger.data.media import describe_sample
from ger.data.undecodable import REMEMBERED
from ger.records import Sample
from ger.run.workers import WorkerDied, WorkerPool, beat

TIMEOUT = 60  # a hung pool fails the test instead of hanging it


def square(x: int) -> int:
    return x * x


def slow_square(x: int) -> int:
    time.sleep(0.3)
    return x * x


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hang() -> None:
    time.sleep(3600)


def beating(steps: int) -> int:
    """A long task that says it is making progress after each step."""
    for _ in range(steps):
        time.sleep(0.4)
        beat()
    return steps


def refuse(x: int) -> None:
    raise ValueError(f"no {x}")


def unsendable() -> object:
    return lambda: None  # a lambda does not pickle


def die_halfway_through_the_answer() -> None:
    """What a kill while a large answer is being written leaves in the pipe: the header of a 1 MiB
    message, 1 KiB of it, then the process gone."""
    conn = sys._getframe(1).f_locals["conn"]  # the worker loop's own pipe (ger/run/workers.py _serve)
    os.write(conn.fileno(), struct.pack("!i", 1 << 20) + b"x" * 1024)
    die()


class EndsItsReader(os.PathLike):
    """A media path whose reading ends the process reading it, as a decoder aborting on a corrupt file
    does (`die`), or never returns, as decord's get_batch on some H.264 files (dmlc/decord#375, `hang`);
    only in a worker process (describe_sample reads it in the test's own)."""

    def __init__(self, path: Path, how: Callable[[], None]) -> None:
        self.path, self.how = str(path), how

    def __fspath__(self) -> str:
        if multiprocessing.parent_process() is not None:
            self.how()
        return self.path


def test_a_worker_killed_halfway_through_its_answer_fails_its_task_only():
    pool = WorkerPool(1)
    try:
        futures = [pool.submit(square, 3), pool.submit(die_halfway_through_the_answer)]
        futures += [pool.submit(square, x) for x in (4, 5)]  # queued behind it, on the same worker
        assert futures[0].result(TIMEOUT) == 9
        with pytest.raises(WorkerDied, match="signal 9"):
            futures[1].result(TIMEOUT)
        assert [f.result(TIMEOUT) for f in futures[2:]] == [16, 25]
        assert pool.deaths == 1
    finally:
        pool.close()


def test_a_dead_worker_fails_its_task_and_the_pool_goes_on_with_new_ones():
    pool = WorkerPool(2)
    try:
        calls = [(die,) if x % 5 == 2 else (refuse, x) if x == 8 else (square, x) for x in range(20)]
        futures = [pool.submit(*call) for call in calls]
        for x, future in enumerate(futures):
            if x % 5 == 2:
                with pytest.raises(WorkerDied):
                    future.result(TIMEOUT)
            elif x == 8:
                with pytest.raises(ValueError, match="no 8"):
                    future.result(TIMEOUT)
            else:
                assert future.result(TIMEOUT) == x * x
        assert pool.deaths == 4
        assert pool.submit(square, 9).result(TIMEOUT) == 81  # after four deaths, still two workers
    finally:
        pool.close()


def test_a_task_without_progress_past_its_timeout_is_killed_and_one_that_beats_is_not():
    pool = WorkerPool(1)
    try:
        started = time.monotonic()
        stuck, after = pool.submit(hang, timeout=1), pool.submit(square, 7, timeout=1)
        with pytest.raises(WorkerDied, match="killed after 1 s without progress"):
            stuck.result(TIMEOUT)
        assert after.result(TIMEOUT) == 49  # queued behind it: run by the next worker
        assert time.monotonic() - started < 20 and pool.deaths == 1
        # 3.2 s in all, past a 2 s timeout, but never 2 s without a beat
        assert pool.submit(beating, 8, timeout=2).result(TIMEOUT) == 8 and pool.deaths == 1
    finally:
        pool.close()


def test_what_does_not_pickle_fails_its_own_task_only():
    pool = WorkerPool(1)
    try:
        bad_answer, bad_argument = pool.submit(unsendable), pool.submit(square, lambda: 2)
        with pytest.raises(RuntimeError, match="could not be sent back"):
            bad_answer.result(TIMEOUT)
        with pytest.raises(Exception, match="pickle"):
            bad_argument.result(TIMEOUT)
        assert pool.submit(square, 6).result(TIMEOUT) == 36 and pool.deaths == 0
    finally:
        pool.close()


def test_closing_the_pool_cancels_what_is_left_and_stops_its_processes():
    before = set(multiprocessing.active_children())
    pool = WorkerPool(2)
    running = [pool.submit(slow_square, x) for x in range(2)]
    queued = [pool.submit(slow_square, x) for x in range(2, 12)]
    assert running[0].result(TIMEOUT) == 0  # the workers are up
    started = time.monotonic()
    pool.close()
    assert time.monotonic() - started < 0.3 * 2  # the busy workers were stopped, not waited for
    assert all(f.done() for f in running + queued)
    assert any(f.cancelled() for f in queued)
    with pytest.raises((CancelledError, RuntimeError)):
        queued[-1].result(0)
    assert set(multiprocessing.active_children()) <= before
    with pytest.raises(RuntimeError, match="stopped"):
        pool.submit(square, 2)


def test_workers_that_cannot_start_stop_the_pool_with_an_error(tmp_path):
    """A spawned worker runs the parent's main script again; without a main guard it fails to start."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from ger.run.workers import WorkerPool\n"
        "pool = WorkerPool(1)\n"
        "print('answer', pool.submit(abs, -3).result(60))\n"
        "pool.close()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "answer" not in proc.stdout
    assert "3 decoding workers in a row exited as they started (exit status 1)" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("how", "timeout", "says"), [(die, None, "(signal 9)"), (hang, 1.0, "killed after 1 s without progress")]
)
def test_a_sample_that_ends_its_worker_gets_an_error_row_and_its_task_mates_decode(
    how, timeout, says, tmp_path
):
    """face_05's decoding kills its worker, or hangs it past stream.timeout_s, each time it is tried."""
    from PIL import Image

    from ger.run.stream import WORKER_DIED, Decoder, DecodeSpec, StreamStats

    shells = []
    for i in range(11):
        path = tmp_path / f"face_{i:02d}.png"
        draw(path, LABELS[i % len(LABELS)], i)
        media = EndsItsReader(path, how) if i == 5 else path
        shells.append(describe_sample(Sample("demo", path.stem, "happy", media=media), "image"))
    stats = StreamStats(window=64, workers=2, timeout_s=timeout)
    decoder = Decoder(DecodeSpec("image", 1, "paper", False), stats, progress=False)
    try:
        handles = decoder.start(shells, len(shells))
        assert len({id(h[0]) for h in handles}) == 2  # face_05 shares its task with 7 others
        results = decoder.collect(handles)
    finally:
        decoder.close()
    for i, got in enumerate(results):
        if i == 5:
            assert got.startswith(WORKER_DIED) and "face_05.png" in got and says in got, got
            assert not got.startswith(REMEMBERED)  # not held against the file in later runs
            continue
        assert got.sample.name == f"face_{i:02d}"
        with Image.open(tmp_path / f"face_{i:02d}.png") as im:  # PIL's own decode of the file
            assert got.images[0].tobytes() == im.convert("RGB").tobytes()
    assert stats.workers_lost == 3  # in its task, then twice alone
    assert stats.decoded == 11


@pytest.mark.parametrize(("value", "expected"), [(None, None), (300, 300.0), ("2.5", 2.5)])
def test_stream_timeout_reads_seconds_or_none(value, expected):
    from ger.run.stream import sample_timeout

    assert sample_timeout({"timeout_s": value}) == expected


@pytest.mark.parametrize("value", [0, -1])
def test_stream_timeout_refuses_what_no_run_can_use(value):
    from ger.run.stream import sample_timeout

    with pytest.raises(ValueError, match="stream.timeout_s must be > 0 or null"):
        sample_timeout({"timeout_s": value})
