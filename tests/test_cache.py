"""The response cache: keys, round trips, failures, crashes and concurrent writers."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ger
from ger.records import Response
from ger.run.cache import ResponseCache, request_key

REPO = Path(ger.__file__).resolve().parent.parent

BASE = {
    "model": "Qwen/Qwen2.5-VL-7B-Instruct",
    "revision": "abc123",
    "backend": {"name": "vllm", "dtype": "bfloat16", "max_model_len": 32768},
    "sampling": {"temperature": 0.0, "seed": 0},
    "messages": [{"role": "user", "content": [{"type": "text", "text": "Sort: happy, sad"}]}],
    "choices": None,
    "max_tokens": 256,
}


def _changed(path: tuple[str, ...], value: object) -> dict:
    import copy

    parts = copy.deepcopy(BASE)
    target = parts
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return parts


@pytest.mark.parametrize(
    "path,value",
    [
        (("model",), "Qwen/Qwen2-VL-2B-Instruct"),
        (("revision",), "def456"),
        (("backend", "dtype"), "float16"),
        (("backend", "name"), "hf"),
        (("sampling", "temperature"), 0.7),
        (("sampling", "seed"), 1),
        (("choices",), ["happy", "sad"]),
        (("max_tokens",), 512),
        (("messages",), [{"role": "user", "content": [{"type": "text", "text": "Sort: sad, happy"}]}]),
    ],
)
def test_key_changes_with_everything_that_changes_the_answer(path, value):
    assert request_key(_changed(path, value)) != request_key(BASE)


def test_key_ignores_dict_order():
    reordered = {k: BASE[k] for k in reversed(list(BASE))}
    reordered["backend"] = dict(reversed(list(BASE["backend"].items())))
    assert request_key(reordered) == request_key(BASE)
    assert len(request_key(BASE)) == 64


def test_key_rejects_values_that_are_not_json():
    with pytest.raises(TypeError):
        request_key({"image": object()})
    with pytest.raises(ValueError):
        request_key({"temperature": float("nan")})


def test_round_trip_and_persistence(tmp_path):
    path = tmp_path / "sub" / "cache.sqlite"
    identity = {"model": "tiny", "backend": "vllm"}
    with ResponseCache(path, identity=identity) as cache:
        assert cache.get("k1") is None
        assert cache.put(Response(key="k1", text='["happy", "sad"]', seconds=1.5)) is True
        got = cache.get("k1")
        assert got == Response(key="k1", text='["happy", "sad"]', cached=True, seconds=1.5)
        assert "k1" in cache and "k2" not in cache
    with ResponseCache(path) as cache:  # reopened: still there
        assert cache.get("k1").text == '["happy", "sad"]'
        assert cache.stats()["answers"] == 1
    conn = sqlite3.connect(path)
    stored = conn.execute("SELECT identity FROM answers WHERE key='k1'").fetchone()[0]
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    assert stored == '{"backend": "vllm", "model": "tiny"}'
    assert mode == "wal"


def test_put_overrides_identity_and_latest_answer_wins(tmp_path):
    with ResponseCache(tmp_path / "c.sqlite", identity={"a": 1}) as cache:
        cache.put(Response(key="k", text="first"))
        cache.put(Response(key="k", text="second"), identity={"b": 2})
        assert cache.get("k").text == "second"
    conn = sqlite3.connect(tmp_path / "c.sqlite")
    assert conn.execute("SELECT identity FROM answers").fetchall() == [('{"b": 2}',)]
    conn.close()


def test_failures_are_recorded_never_served(tmp_path):
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        assert cache.put(Response(key="bad", error="timeout")) is False
        assert cache.put(Response(key="bad", error="CUDA out of memory")) is False
        assert cache.put(Response(key="blank", text="   \n")) is False
        assert cache.get("bad") is None and cache.get("blank") is None
        assert "bad" not in cache
        failures = {f["key"]: f for f in cache.failures()}
        assert failures["bad"]["count"] == 2
        assert failures["bad"]["last_error"] == "CUDA out of memory"
        assert failures["blank"]["last_error"] == "empty answer"
        stats = cache.stats()
        assert (stats["answers"], stats["failures"], stats["hits"], stats["misses"]) == (0, 2, 0, 2)
        # A later success resolves the failure.
        cache.put(Response(key="bad", text='["sad"]'))
        assert cache.get("bad").text == '["sad"]'
        assert [f["key"] for f in cache.failures()] == ["blank"]


def test_get_many(tmp_path):
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        for i in range(1200):
            if i % 3:
                cache.put(Response(key=f"k{i}", text=f"t{i}"))
        found = cache.get_many(f"k{i}" for i in range(1200))
        assert set(found) == {f"k{i}" for i in range(1200) if i % 3}
        assert found["k1"] == Response(key="k1", text="t1", cached=True)
        assert cache.stats()["misses"] == 400


def test_closed_cache_refuses(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    cache.close()
    cache.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        cache.get("k")


# A writer process: `count` puts, printing each key only after its put returned.
_WRITER = """
import sys, time
from ger.run.cache import ResponseCache
from ger.records import Response
path, prefix, count, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
cache = ResponseCache(path, identity={"writer": prefix})
while time.time() < start:
    time.sleep(0.005)
for i in range(count):
    key = f"{prefix}-{i}"
    cache.put(Response(key=key, text=f"answer {key} " + "x" * 200))
    if i % 7 == 0:
        cache.put(Response(key=f"{prefix}-fail-{i}", error="boom"))
    print(key, flush=True)
cache.close()
"""


def _writer(path: Path, prefix: str, count: int, start: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), prefix, str(count), str(start)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _check_integrity(path: Path) -> None:
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_sigkill_mid_series_loses_no_returned_put(tmp_path):
    path = tmp_path / "c.sqlite"
    proc = _writer(path, "w", 1_000_000, 0.0)
    acknowledged: list[str] = []
    deadline = time.monotonic() + 60
    while len(acknowledged) < 60 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acknowledged.append(line.strip())
    assert len(acknowledged) >= 60, proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)  # most likely in the middle of a put
    rest, _ = proc.communicate(timeout=30)
    # Keys printed before the kill are acknowledged too; a torn last line is not.
    lines = rest.split("\n")
    acknowledged += [ln for ln in lines[:-1] if ln]
    assert proc.returncode == -signal.SIGKILL

    _check_integrity(path)
    with ResponseCache(path) as cache:
        found = cache.get_many(acknowledged)
        assert sorted(found) == sorted(acknowledged)
        assert all(found[k].text.startswith(f"answer {k} ") for k in acknowledged)
        assert cache.put(Response(key="after", text="fine")) is True  # still writable


def test_two_processes_writing_concurrently_lose_nothing(tmp_path):
    path = tmp_path / "c.sqlite"
    count = 150
    start = time.time() + 1.5  # both writers start putting at the same moment
    procs = [_writer(path, prefix, count, start) for prefix in ("a", "b")]
    outs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
        assert len(out.split()) == count
    _check_integrity(path)
    with ResponseCache(path) as cache:
        keys = [f"{p}-{i}" for p in ("a", "b") for i in range(count)]
        assert len(cache.get_many(keys)) == 2 * count
        stats = cache.stats()
        assert stats["answers"] == 2 * count
        assert stats["failures"] == 2 * len(range(0, count, 7))


def test_answers_fetched_with_their_keys_are_not_queried_again(tmp_path):
    from ger.records import Request
    from ger.run.ask import Asker
    from ger.run.stream import Prefetched

    def no_backend():
        raise AssertionError("every answer is cached: no backend may start")

    with ResponseCache(tmp_path / "c.sqlite") as cache:
        for k in ("a", "b"):
            cache.put(Response(key=k, text=f"answer {k}"))
        requests = [Request(key=k, names=(k,), messages=[]) for k in ("a", "b")]
        asker = Asker(cache, no_backend, progress=False)
        known = Prefetched(cache, ["a", "b", "c"])  # "c" is not answered when the keys are fetched
        with asker.looking_up(known):
            answers = asker.ask(requests)
        assert {k: r.text for k, r in answers.items()} == {"a": "answer a", "b": "answer b"}
        assert cache.stats()["hits"] == 2  # the prefetch's: ask() took them from it, not from the cache

        cache.put(Response(key="c", text="answer c"))  # answered since: outside looking_up the cache is asked
        assert asker.ask([Request(key="c", names=("c",), messages=[])])["c"].text == "answer c"
        assert cache.stats()["hits"] == 3
