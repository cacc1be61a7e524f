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
  the samples that shared its task decode as if nothing happened;
- a hang is remembered with its timeout (a death is not): a rerun gives its row without waiting, a
  rerun with a longer timeout tries it again, and once it decodes the hang is forgotten;
- a sample that runs out of memory while decoding gets an error row; the run goes on.

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
from ger.data.undecodable import HUNG, REMEMBERED, Undecodable
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


def run_out_of_memory() -> None:
    raise MemoryError("Unable to allocate 10.1 GiB for an array with shape (3, 60000, 60000, 1)")


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


def faces_with_a_bad_reader(tmp_path: Path, how: Callable[[], None]) -> list:
    """The shells of 11 still faces; reading face_05 in a worker does `how`."""
    shells = []
    for i in range(11):
        path = tmp_path / f"face_{i:02d}.png"
        draw(path, LABELS[i % len(LABELS)], i)
        media = EndsItsReader(path, how) if i == 5 else path
        shells.append(describe_sample(Sample("demo", path.stem, "happy", media=media), "image"))
    return shells


@pytest.mark.parametrize(
    ("how", "timeout", "says"), [(die, None, "(signal 9)"), (hang, 1.0, "killed after 1 s without progress")]
)
def test_a_sample_that_ends_its_worker_gets_an_error_row_and_its_task_mates_decode(
    how, timeout, says, tmp_path
):
    """face_05's decoding kills its worker, or hangs it past stream.timeout_s, each time it is tried."""
    from PIL import Image

    from ger.run.stream import WORKER_DIED, Decoder, DecodeSpec, StreamStats

    shells = faces_with_a_bad_reader(tmp_path, how)
    stats = StreamStats(window=64, workers=2, timeout_s=timeout)
    decoder = Decoder(DecodeSpec("image", 1, "paper", False), stats, progress=False)
    try:
        handles = decoder.start(shells, len(shells))
        assert len({id(h[0]) for h in handles}) == 2  # face_05 shares its task with 7 others
        results = decoder.collect(handles)
    finally:
        decoder.close()
    for i, got in enumerate(results):
        if i == 5 and how is die:  # not held against the file in later runs: the system may have done it
            assert got.startswith(WORKER_DIED) and "face_05.png" in got and says in got, got
            continue
        if i == 5:  # the pool killed it for hanging each time: remembered (ger/data/undecodable.py)
            assert got.startswith(HUNG) and "face_05.png" in got and "no progress for 1 s" in got, got
            continue
        assert got.sample.name == f"face_{i:02d}"
        with Image.open(tmp_path / f"face_{i:02d}.png") as im:  # PIL's own decode of the file
            assert got.images[0].tobytes() == im.convert("RGB").tobytes()
    assert stats.workers_lost == 3  # in its task, then twice alone
    assert stats.decoded == 11
    assert decoder.decoded_names == {f"face_{i:02d}" for i in range(11) if i != 5}


def test_a_sample_that_runs_out_of_memory_gets_an_error_row_and_the_run_goes_on(tmp_path):
    """A MemoryError decoding one sample (numpy refusing the frames of a corrupt header's size) failed
    its whole worker task, and collect() raised it: the run ended. It is now that sample's error row,
    not remembered; its task mates decode and no worker dies."""
    from ger.run.stream import Decoder, DecodeSpec, StreamStats

    shells = faces_with_a_bad_reader(tmp_path, run_out_of_memory)
    stats = StreamStats(window=64, workers=2, timeout_s=None)
    decoder = Decoder(DecodeSpec("image", 1, "paper", False), stats, progress=False)
    try:
        results = decoder.collect(decoder.start(shells, len(shells)))
    finally:
        decoder.close()
    oom = results.pop(5)
    assert oom.startswith("MemoryError: decoding sample face_05 ran out of memory (Unable to allocate"), oom
    assert not oom.startswith((REMEMBERED, HUNG))
    assert [r.sample.name for r in results] == [f"face_{i:02d}" for i in range(11) if i != 5]
    assert all(r.images for r in results) and stats.workers_lost == 0


def test_a_hang_applies_while_a_run_would_wait_as_long_and_is_forgotten_once_decoded(tmp_path):
    """Undecodable's hangs: kept with the timeout they were given and these decoders, applied to a
    run whose timeout is no longer; a longer timeout (or none) decodes again, and what decodes then
    is forgotten. A truncated file's MediaError applies whatever the timeout; a death is not kept."""
    import sqlite3

    db = tmp_path / "undecodable.sqlite"
    with sqlite3.connect(db) as conn:  # a table written before hangs were kept: it gains the new one
        conn.execute("CREATE TABLE undecodable (content_hash TEXT PRIMARY KEY, decoders TEXT NOT NULL, "
                     "error TEXT NOT NULL)")  # fmt: skip
    hashes = {"hangs": "h1", "cut": "h2", "died": "h3", "fine": "h4"}

    def known(timeout):
        table = Undecodable(db, timeout)
        return table, table.known(hashes)

    table, got = known(10.0)
    assert got == {}
    table.remember({"h1": f"{HUNG}hung 10 s", "h2": f"{REMEMBERED}cut short", "h3": "WorkerDied: died"})
    table.close()
    for timeout, applies in [(10.0, True), (5.0, True), (10.5, False), (None, False)]:
        table, got = known(timeout)
        assert got.pop("cut") == f"{REMEMBERED}cut short", timeout
        assert got == ({"hangs": f"{HUNG}hung 10 s"} if applies else {}), timeout
        table.close()
    table, _ = known(20.0)  # tried again under 20 s, and it hung again: kept with 20 s
    table.remember({"h1": f"{HUNG}hung 20 s"}, decoded={"h4"})
    table.close()
    assert known(15.0)[1]["hangs"] == f"{HUNG}hung 20 s" and "hangs" not in known(30.0)[1]
    table, _ = known(None)  # no timeout: it decoded after all
    table.remember({}, decoded={"h1", "h4"})
    table.close()
    table, got = known(1.0)
    assert got == {"cut": f"{REMEMBERED}cut short"}
    table.close()


SITE_HANG = """
import multiprocessing, os, time
if os.environ.get("GER_TEST_HANG"):  # a decoder that never returns on one file, in the workers only
    import ger.data.media as media
    load_still = media.load_still

    def hanging(path, greyscale=False):
        if os.environ["GER_TEST_HANG"] in os.fspath(path) and multiprocessing.parent_process() is not None:
            time.sleep(3600)
        return load_still(path, greyscale)

    media.load_still = hanging
"""


def test_a_rerun_does_not_wait_again_for_a_file_that_hung_its_decoder(stub_server, tmp_path):
    """`ger run` where decoding face_05 never returns: the first run kills its worker three times
    (stream.timeout_s each) for a DecoderHung row; a rerun gives the same row at once, decoding and
    killing nothing; with a longer timeout, the file now decoding, it is asked, and a rerun at the
    first timeout answers it from the cache instead of giving the old row."""
    import json

    from conftest import rows, run_ger, stub_run_args
    from test_stream import twelve_faces

    root = twelve_faces(tmp_path, stub_server)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE_HANG)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)

    def run(out: str, timeout: float, hang: bool) -> tuple[dict, dict[str, dict]]:
        env = {"PYTHONPATH": path, "GER_TEST_HANG": "face_05.png" if hang else ""}
        args = stub_run_args(stub_server.url, "demo", root, tmp_path / out, f"stream.timeout_s={timeout}",
                             "stream.workers=1")  # fmt: skip
        run_ger(args, tmp_path / "cache", REPO, env=env)
        metrics = json.loads((tmp_path / out / "metrics.json").read_text())
        return metrics, {r["name"]: r for r in rows(tmp_path / out)}

    first, got = run("r1", 1, hang=True)
    assert first["stream"]["workers_lost"] == 3 and first["stream"]["decoded"] == 12
    assert got["face_05"]["status"] == "error" and got["face_05"]["detail"].startswith(HUNG), got["face_05"]
    again, got_again = run("r2", 1, hang=True)  # no worker killed: no timeout waited out
    assert again["stream"]["workers_lost"] == 0 and again["stream"]["decoded"] == 0
    assert again["requests"]["sent"] == 0 and got_again == got  # the same row, word for word
    longer, got = run("r3", 2, hang=False)
    assert longer["stream"]["decoded"] == 1 and longer["requests"]["sent"] == 1
    assert got["face_05"]["status"] == "ok" and got["face_05"]["top1"] == got["face_05"]["gt"]
    back, got = run("r4", 1, hang=True)  # it would hang again, but it decoded: its answer is cached
    assert back["stream"]["decoded"] == 0 and back["requests"]["sent"] == 0
    assert all(r["status"] == "ok" for r in got.values())


@pytest.mark.parametrize(("value", "expected"), [(None, None), (300, 300.0), ("2.5", 2.5)])
def test_stream_timeout_reads_seconds_or_none(value, expected):
    from ger.run.stream import sample_timeout

    assert sample_timeout({"timeout_s": value}) == expected


@pytest.mark.parametrize("value", [0, -1])
def test_stream_timeout_refuses_what_no_run_can_use(value):
    from ger.run.stream import sample_timeout

    with pytest.raises(ValueError, match="stream.timeout_s must be > 0 or null"):
        sample_timeout({"timeout_s": value})


def test_workers_run_at_lower_priority_and_so_do_their_replacements():
    here = os.getpriority(os.PRIO_PROCESS, 0)
    pool = WorkerPool(1, nice=5)
    try:
        assert pool.submit(os.getpriority, os.PRIO_PROCESS, 0).result(TIMEOUT) == min(19, here + 5)
        with pytest.raises(WorkerDied):
            pool.submit(die).result(TIMEOUT)
        assert pool.submit(os.getpriority, os.PRIO_PROCESS, 0).result(TIMEOUT) == min(19, here + 5)
    finally:
        pool.close()
    assert os.getpriority(os.PRIO_PROCESS, 0) == here  # the parent's own priority is left as it was
    with pytest.raises(ValueError, match="0 to 19"):
        WorkerPool(1, nice=-1)  # raising a priority needs privileges no run should ask for


@pytest.mark.parametrize(("value", "expected"), [(None, 0), (0, 0), (10, 10), ("19", 19)])
def test_stream_nice_reads_a_niceness(value, expected):
    from ger.run.stream import worker_nice

    assert worker_nice({"nice": value}) == expected


@pytest.mark.parametrize("value", [-1, 20])
def test_stream_nice_refuses_a_higher_priority_or_past_the_lowest(value):
    from ger.run.stream import worker_nice

    with pytest.raises(ValueError, match="stream.nice must be 0 to 19"):
        worker_nice({"nice": value})
