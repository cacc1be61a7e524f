"""The streamed run (ger/run/stream.py), end to end through `ger run backend=server` against the
loopback stub server (tests/stub_server.py):

- a run of a few hundred images with a tiny window never holds more decoded samples than the
  window (the loader's own counter, reported in metrics.json), single and batch mode, decoding
  in worker processes;
- a fully cached rerun decodes nothing and sends nothing (its server is unreachable) and gives
  the same predictions; changing one file's bytes sends and decodes exactly that sample again;
- file digests persist in the cache folder, so an unchanged file is not read again;
- a run whose decoding workers are SIGKILLed midway gives the predictions of an undisturbed one.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO, rows, run_on_stub, stub_run_args
from stub_server import PerfectModel

from ger.data import digests
from ger.data.media import describe_sample
from ger.records import Sample

LABELS = ["anger", "disgust", "fear", "happy", "neutral", "sad", "surprise"]  # demo.yaml's label set


def draw(path: Path, label: str, variant: int) -> None:
    from ger.data.demo import draw_face

    draw_face((32, 32), label, 1.0, variant=variant).save(path)


@pytest.fixture(scope="module")
def many_faces(tmp_path_factory) -> Path:
    """300 small face images, label list sorted by class."""
    root = tmp_path_factory.mktemp("faces")
    (root / "images").mkdir()
    pairs = []
    for i in range(300):
        label = LABELS[i % len(LABELS)]
        draw(root / "images" / f"face_{i:03d}.png", label, i)
        pairs.append((f"face_{i:03d}", label))
    with (root / "label.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("name", "gt"), *sorted(pairs, key=lambda p: (p[1], p[0]))])
    return root


def truth(root: Path) -> dict[str, str]:
    """Image payload digest -> label, as the stub receives the images (the PNG files as they are)."""
    table = {}
    with (root / "label.csv").open() as f:
        for row in csv.DictReader(f):
            table[file_payload(root / "images" / f"{row['name']}.png")] = row["gt"]
    return table


@pytest.mark.parametrize("mode", ["single", "batch"])
def test_a_tiny_window_bounds_the_decoded_samples_alive(mode, many_faces, stub_server, tmp_path):
    stub_server.model = PerfectModel(LABELS, truth(many_faces))
    extra = ["stream.window=8", "stream.workers=2", f"mode={mode}"]
    if mode == "batch":
        extra.append("batch_size=4")  # chunks of 4 samples: one batch
    metrics = run_on_stub(stub_server.url, "demo", many_faces, tmp_path / "cache", tmp_path / "run", *extra)

    stream = metrics["stream"]
    assert stream["window"] == 8 and stream["workers"] == 2
    assert stream["decoded"] == 300 and stream["from_cache"] == 0
    assert 4 <= stream["peak_decoded"] <= 8, stream  # two chunks of 4 at most, never the whole set
    assert metrics["n"] == 300 and metrics["requests"]["failed"] == 0
    predictions = rows(tmp_path / "run")
    assert len(predictions) == 300 and sum(r["status"] == "ok" for r in predictions) >= 285


def test_a_cached_rerun_decodes_nothing_and_a_changed_file_is_asked_again(many_faces, stub_server, tmp_path):
    root = tmp_path / "faces"  # a copy of this test's own: one file is changed below
    (root / "images").mkdir(parents=True)
    (root / "label.csv").write_bytes((many_faces / "label.csv").read_bytes())
    for f in (many_faces / "images").iterdir():
        (root / "images" / f.name).write_bytes(f.read_bytes())
    stub_server.model = PerfectModel(LABELS, truth(root))
    cache = tmp_path / "cache"
    first = run_on_stub(stub_server.url, "demo", root, cache, tmp_path / "r1", "stream.workers=0")
    assert first["stream"]["decoded"] == 300 and first["requests"]["sent"] == 300

    received = len(stub_server.bodies)
    rerun = run_on_stub(stub_server.url, "demo", root, cache, tmp_path / "r2")
    assert len(stub_server.bodies) == received  # the server heard nothing
    assert rerun["stream"]["decoded"] == 0 and rerun["stream"]["from_cache"] == 300
    assert rerun["requests"] == {"cached": 300, "sent": 0, "failed": 0, "splits": 0}
    assert rows(tmp_path / "r2") == rows(tmp_path / "r1")

    # new bytes in one file (same name, same label): only that sample is decoded and asked again
    draw(root / "images" / "face_007.png", LABELS[0], 10_007)
    stub_server.model = PerfectModel(LABELS, truth(root))
    changed = run_on_stub(stub_server.url, "demo", root, cache, tmp_path / "r3")
    assert changed["stream"]["decoded"] == 1 and changed["stream"]["from_cache"] == 299
    assert changed["requests"]["sent"] == 1 and changed["requests"]["cached"] == 299


@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_rewritten_before_it_is_decoded_is_an_error_not_a_stale_answer(workers, stub_server, tmp_path):
    """The key names the bytes hashed when the run began; a file rewritten before its turn to be decoded
    (a dataset re-extracted under a running evaluation) must not have the new pixels' answer cached under
    the old bytes' key, to be served for them once the old file is back."""
    root = tmp_path / "faces"
    (root / "images").mkdir(parents=True)
    pairs = [(f"face_{i:02d}", LABELS[i % len(LABELS)]) for i in range(24)]
    for i, (name, label) in enumerate(pairs):
        draw(root / "images" / f"{name}.png", label, i)
    (root / "label.csv").write_text("name,gt\n" + "".join(f"{n},{g}\n" for n, g in pairs))
    target = root / "images" / "face_23.png"  # last in the label file: decoded long after the first answer
    original, truth_label = target.read_bytes(), pairs[-1][1]
    other = LABELS[(LABELS.index(truth_label) + 1) % len(LABELS)]
    perfect = PerfectModel(LABELS, truth_of(root, pairs))

    rewrite = threading.Lock()  # the stub answers on several threads; the first request rewrites

    def rewriting_model(body: dict) -> tuple[str, str]:
        if rewrite.acquire(blocking=False):  # new pixels, another face
            draw(tmp_path / "new.png", other, 999)
            perfect.truth[file_payload(tmp_path / "new.png")] = other
            os.replace(tmp_path / "new.png", target)
        return perfect(body)

    stub_server.model = rewriting_model
    cache, extra = tmp_path / "cache", ("stream.window=2", f"stream.workers={workers}")
    first = run_on_stub(stub_server.url, "demo", root, cache, tmp_path / "r1", *extra)
    got = {r["name"]: r for r in rows(tmp_path / "r1")}
    assert got["face_23"]["status"] == "error"
    assert "changed while the run was reading it" in got["face_23"]["detail"]
    assert all(r["status"] == "ok" and r["top1"] == r["gt"] for n, r in got.items() if n != "face_23")
    assert first["requests"]["sent"] == 23

    target.write_bytes(original)  # the old file back: its answer is asked for, not taken from the cache
    stub_server.model = perfect
    rerun = run_on_stub(stub_server.url, "demo", root, cache, tmp_path / "r2", *extra)
    assert rerun["requests"]["sent"] == 1 and rerun["requests"]["cached"] == 23
    assert {r["name"]: r["top1"] for r in rows(tmp_path / "r2")}["face_23"] == truth_label


def test_decoding_checks_the_clip_is_still_the_file_keyed(tmp_path):
    from test_reliability import write_clip

    from ger.data.media import MediaError, decode

    clip = tmp_path / "clip.mp4"
    write_clip(clip, "happy", 0)
    sample = Sample("demo_video", "clip", "happy", media=clip)
    shell = describe_sample(sample, "video", frames=3)
    assert shell.stamp == digests.stamp_of(clip.stat())
    assert len(decode(describe_sample(sample, "video", frames=3), "video", frames=3, sampler="paper",
                      greyscale=False).images) == 3  # fmt: skip
    write_clip(clip, "sad", 1)
    with pytest.raises(MediaError, match="video changed while the run was reading it"):
        decode(shell, "video", frames=3, sampler="paper", greyscale=False)


@contextmanager
def fresh_table(db: Path) -> Iterator[digests.DigestTable]:
    """As a new process sees the digests: nothing remembered in memory, `db` as its table."""
    digests._MEMORY.clear()
    table = digests.DigestTable(db)
    digests.use_table(table)
    try:
        yield table
    finally:
        digests.use_table(None)
        table.close()


def age(path: Path, seconds: int) -> None:
    """Give a file the mtime it would have had `seconds` ago."""
    when = time.time() - seconds
    os.utime(path, (when, when))


def test_a_file_modified_moments_ago_is_hashed_again(tmp_path):
    """A file system that keeps mtimes to the second (FAT: two) would let a file rewritten within that
    second, at the same size, keep its mtime: a digest is only remembered once the mtime is settled,
    as git does with its index, so the stale one is never served."""
    f = tmp_path / "face.png"
    f.write_bytes(b"a" * 1000)
    fresh = time.time_ns() + 60_000_000_000  # "moments ago" however slowly this test runs
    os.utime(f, ns=(fresh, fresh))
    db = tmp_path / "cache" / "file_digests.sqlite"

    def digest_twice() -> tuple[str, int]:
        with fresh_table(db) as table:
            first = digests.file_digest(f)
            assert digests.file_digest(f) == first  # the second call of the same process
        return first, table.hashed

    assert digest_twice() == (hashlib.sha256(b"a" * 1000).hexdigest(), 2)  # fresh: kept nowhere
    f.write_bytes(b"b" * 1000)  # same size, and the same mtime, as a coarse clock would leave it
    os.utime(f, ns=(fresh, fresh))
    assert digest_twice() == (hashlib.sha256(b"b" * 1000).hexdigest(), 2)  # the new bytes, not the old digest
    age(f, 3600)
    assert digest_twice()[1] == 1  # settled: hashed once, then remembered
    assert digest_twice()[1] == 0  # and the next process reads it from the table


def test_file_digests_persist_across_processes_and_follow_changes(tmp_path):
    files = []
    for i in range(5):
        draw(tmp_path / f"f{i}.png", "happy", i)
        age(tmp_path / f"f{i}.png", 3600)  # settled: see test_a_file_modified_moments_ago_is_hashed_again
        files.append(Sample("demo", f"f{i}", "happy", media=tmp_path / f"f{i}.png"))

    def keys() -> tuple[list[str], int]:
        with fresh_table(tmp_path / "cache" / "file_digests.sqlite") as table:
            return [describe_sample(s, "image").content_hash for s in files], table.hashed

    before, hashed = keys()
    assert hashed == 5
    assert keys() == (before, 0)  # served from the table, no file read

    draw(tmp_path / "f2.png", "sad", 99)  # new bytes: a new size or mtime, so hashed again
    age(tmp_path / "f2.png", 60)
    after, hashed = keys()
    assert hashed == 1 and after[2] != before[2] and after[:2] + after[3:] == before[:2] + before[3:]


def test_files_that_swap_names_or_are_copied_over_with_their_times_are_hashed_again(tmp_path):
    """Size and mtime alone cannot tell: same-size files renamed into each other's names keep both, and a
    copy that keeps its times (cp -p, rsync -a, tar) lands with the old size and mtime. The inode (kept by
    a rename) and the ctime (set by any write) can."""
    a, b, c = (tmp_path / f"{x}.bmp" for x in "abc")
    for f, fill in ((a, b"a"), (b, b"b"), (c, b"c")):
        f.write_bytes(fill * 1000)
        os.utime(f, ns=(10**18, 10**18))  # the one old mtime an archive gives its files
    sha = {fill: hashlib.sha256(fill * 1000).hexdigest() for fill in (b"a", b"b", b"c")}
    db = tmp_path / "cache" / "file_digests.sqlite"
    with fresh_table(db) as table:
        assert [digests.file_digest(a), digests.file_digest(b), table.hashed] == [sha[b"a"], sha[b"b"], 2]

    os.rename(a, tmp_path / "t.bmp"), os.rename(b, a), os.rename(tmp_path / "t.bmp", b)  # a swap
    assert (a.stat().st_size, a.stat().st_mtime_ns) == (b.stat().st_size, b.stat().st_mtime_ns)
    with fresh_table(db) as table:  # the next run
        assert [digests.file_digest(a), digests.file_digest(b), table.hashed] == [sha[b"b"], sha[b"a"], 2]
    assert digests.file_digest(a) == sha[b"b"]  # and this process, from its memory

    shutil.copy2(c, a)  # over a, as cp -p does: same inode, same size, the same mtime as before
    assert (a.stat().st_size, a.stat().st_mtime_ns) == (b.stat().st_size, b.stat().st_mtime_ns)
    assert digests.file_digest(a) == sha[b"c"]
    with fresh_table(db) as table:  # b as the table has it; a hashed again
        assert [digests.file_digest(a), digests.file_digest(b), table.hashed] == [sha[b"c"], sha[b"a"], 1]


def test_after_two_same_size_files_swap_names_each_gets_its_own_answer(stub_server, tmp_path):
    root = tmp_path / "faces"
    (root / "images").mkdir(parents=True)
    pairs = [(f"face_{i}", LABELS[i]) for i in range(6)]
    for i, (name, label) in enumerate(pairs):
        from ger.data.demo import draw_face

        draw_face((32, 32), label, 1.0, variant=i).save(root / "images" / f"{name}.png", compress_level=0)
        os.utime(root / "images" / f"{name}.png", ns=(10**18, 10**18))
    assert len({(root / "images" / f"{n}.png").stat().st_size for n, _ in pairs}) == 1  # stored: one size
    stub_server.model = PerfectModel(LABELS, truth_of(root, pairs))
    (root / "label.csv").write_text("name,gt\n" + "".join(f"{n},{g}\n" for n, g in pairs))
    cache = tmp_path / "cache"
    assert run_on_stub(stub_server.url, "demo", root, cache, tmp_path / "r1")["requests"]["sent"] == 6

    img = root / "images"
    os.rename(img / "face_0.png", img / "t.png"), os.rename(img / "face_1.png", img / "face_0.png")
    os.rename(img / "t.png", img / "face_1.png")
    pairs[0], pairs[1] = ("face_0", pairs[1][1]), ("face_1", pairs[0][1])  # the label list follows the faces
    (root / "label.csv").write_text("name,gt\n" + "".join(f"{n},{g}\n" for n, g in pairs))
    rerun = run_on_stub(stub_server.url, "demo", root, cache, tmp_path / "r2")
    assert rerun["requests"]["cached"] == 6  # each face's answer, found by its bytes under its new name
    assert all(r["status"] == "ok" and r["top1"] == r["gt"] for r in rows(tmp_path / "r2"))


def test_a_digest_table_of_the_old_schema_is_replaced(tmp_path):
    import sqlite3

    db = tmp_path / "file_digests.sqlite"
    with sqlite3.connect(db) as conn:  # version 1: size and mtime only
        conn.execute("CREATE TABLE file_digests (path TEXT PRIMARY KEY, size INTEGER NOT NULL, "
                     "mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL)")  # fmt: skip
        conn.execute("INSERT INTO file_digests VALUES ('/x/a.png', 1000, 10, 'stale')")
    f = tmp_path / "a.png"
    f.write_bytes(b"a" * 1000)
    age(f, 3600)
    with fresh_table(db) as table:
        assert digests.file_digest(f) == hashlib.sha256(b"a" * 1000).hexdigest() and table.hashed == 1
    with fresh_table(db) as table:
        assert digests.file_digest(f) == hashlib.sha256(b"a" * 1000).hexdigest() and table.hashed == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM file_digests WHERE sha256 = 'stale'").fetchone() == (0,)


def twelve_faces(tmp_path: Path, stub_server) -> Path:
    """12 faces (face_00 ... face_11) and their label list; the stub a perfect model for them."""
    root = tmp_path / "faces"
    (root / "images").mkdir(parents=True)
    pairs = [(f"face_{i:02d}", LABELS[i % len(LABELS)]) for i in range(12)]
    for i, (name, label) in enumerate(pairs):
        draw(root / "images" / f"{name}.png", label, i)
    stub_server.model = PerfectModel(LABELS, truth_of(root, pairs))
    with (root / "label.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("name", "gt"), *pairs])
    return root


def faces_with_a_truncated_one(tmp_path: Path, stub_server) -> tuple[Path, bytes]:
    """twelve_faces with face_05 truncated (found only by decoding); (root, its bytes)."""
    root = twelve_faces(tmp_path, stub_server)
    broken = root / "images" / "face_05.png"
    good = broken.read_bytes()
    broken.write_bytes(good[:200])
    return root, good


def test_batch_mode_drops_an_undecodable_sample_from_its_batch(stub_server, tmp_path):
    """A file that only fails when decoded (truncated) is found after batches were cut: it becomes
    an error row, the rest of its batch is still asked, and order.csv keeps the batches as cut."""
    root, _ = faces_with_a_truncated_one(tmp_path, stub_server)
    metrics = run_on_stub(
        stub_server.url, "demo", root, tmp_path / "cache", tmp_path / "run", "mode=batch", "batch_size=4"
    )

    by_name = {r["name"]: r for r in rows(tmp_path / "run")}
    assert by_name["face_05"]["status"] == "error" and "face_05.png" in by_name["face_05"]["detail"]
    assert all(r["status"] == "ok" for n, r in by_name.items() if n != "face_05")
    assert metrics["stream"]["decoded"] == 12 and metrics["batching"]["batches"] == 3
    with (tmp_path / "run" / "order.csv").open() as f:
        assert "face_05" in {r["name"] for r in csv.DictReader(f)}


@pytest.mark.parametrize("mode", ["single", "batch"])
def test_a_cached_rerun_decodes_nothing_even_where_a_file_does_not_decode(mode, stub_server, tmp_path):
    """A file that fails only when decoded was decoded again by every rerun (in batch mode with its
    batch, whose answer is cached under the key of the samples that did decode); its failure is now
    remembered by content hash, and the batch keyed without it, as the first run asked it."""
    root, good = faces_with_a_truncated_one(tmp_path, stub_server)
    broken = root / "images" / "face_05.png"
    cache, extra = tmp_path / "cache", (f"mode={mode}", "batch_size=4")
    first = run_on_stub(stub_server.url, "demo", root, cache, tmp_path / "r1", *extra)
    assert first["stream"]["decoded"] == 12
    rerun = run_on_stub(stub_server.url, "demo", root, cache, tmp_path / "r2", *extra)
    assert rerun["stream"]["decoded"] == 0 and rerun["requests"]["sent"] == 0
    assert rows(tmp_path / "r2") == rows(tmp_path / "r1")  # the error row too, word for word
    assert {r["name"]: r["status"] for r in rows(tmp_path / "r2")}["face_05"] == "error"

    broken.write_bytes(good)  # mended: new bytes, so decoded and asked (with its batch: a new key)
    mended = run_on_stub(stub_server.url, "demo", root, cache, tmp_path / "r3", *extra)
    assert mended["stream"]["decoded"] == (1 if mode == "single" else 4) and mended["requests"]["sent"] == 1
    assert all(r["status"] == "ok" and r["top1"] == r["gt"] for r in rows(tmp_path / "r3"))


def test_the_order_csv_of_a_run_with_a_missing_file_and_a_limit_replays_its_batches(stub_server, tmp_path):
    """order.csv lists the whole shuffle, samples in no batch included (a missing file, those past
    `limit`), so `batch_order=` replays any run's batches; it used to list only the batched samples,
    and replaying it was refused for the samples it did not list."""
    root = tmp_path / "faces"
    (root / "images").mkdir(parents=True)
    pairs = [(f"face_{i:02d}", LABELS[i % len(LABELS)]) for i in range(12)]
    for i, (name, label) in enumerate(pairs):
        if name != "face_03":  # listed, never written: an error row before any batch is cut
            draw(root / "images" / f"{name}.png", label, i)
    stub_server.model = PerfectModel(LABELS, truth_of(root, [p for p in pairs if p[0] != "face_03"]))
    with (root / "label.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("name", "gt"), *pairs])
    cache, batch = tmp_path / "cache", ("mode=batch", "batch_size=4", "limit=10")
    first = run_on_stub(stub_server.url, "demo", root, cache, tmp_path / "r1", *batch)
    with (tmp_path / "r1" / "order.csv").open() as f:
        stored = list(csv.DictReader(f))
    assert sorted(r["name"] for r in stored) == [n for n, _ in pairs]  # all 12, in the shuffle's order
    assert sum(r["batch"] == "" for r in stored) == 3  # past the limit (2), and the missing file
    replay = [*batch, f"batch_order={tmp_path / 'r1' / 'order.csv'}", "batch_seed=7"]  # the file wins
    again = run_on_stub(stub_server.url, "demo", root, cache, tmp_path / "r2", *replay)
    assert first["requests"]["sent"] > 0 and again["requests"]["sent"] == 0  # the same batches, cached
    assert (tmp_path / "r2" / "order.csv").read_text() == (tmp_path / "r1" / "order.csv").read_text()


def truth_of(root: Path, pairs: list[tuple[str, str]]) -> dict[str, str]:
    return {file_payload(root / "images" / f"{name}.png"): label for name, label in pairs}


def file_payload(path: Path) -> str:
    """The stub's digest of an image sent as its file's own bytes (a still PNG is never re-encoded)."""
    return hashlib.sha256(base64.b64encode(path.read_bytes())).hexdigest()


def test_predictions_are_written_as_answers_arrive(many_faces, stub_server, tmp_path):
    """A server that stops answering after 10 requests: their rows are on disk (predictions.partial.csv,
    readable as predictions) while the run still waits; once it answers again the run ends with
    predictions.csv in label-file order, the same rows, and the partial file gone."""
    import os
    import subprocess
    import sys
    import threading
    import time

    from conftest import REPO, STUB_MODEL

    from ger.run.predictions import read_predictions

    gate, lock, count = threading.Event(), threading.Lock(), [0]

    def model(body: dict) -> tuple[str, str]:
        with lock:
            count[0] += 1
            late = count[0] > 10
        if late:
            gate.wait(120)
        return "happy", "stop"

    stub_server.model = model
    out = tmp_path / "run"
    args = ["run", "dataset=demo", f"dataset.layout.root={many_faces}", "dataset.demo=false", "limit=40",
            f"model={STUB_MODEL}", "backend=server", f"backend.base_url={stub_server.url}", "progress=false",
            "backend.concurrency=4", f"hydra.run.dir={out}"]  # fmt: skip
    env = {**os.environ, "GER_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "ger.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    partial = out / "predictions.partial.csv"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if partial.exists() and len(read_predictions(partial)) >= 10:
                break
            time.sleep(0.05)
        early = read_predictions(partial)
        assert proc.poll() is None, proc.stderr.read()
        assert len(early) == 10, early
        assert not (out / "predictions.csv").exists()  # the run's result comes only at its end
    finally:
        gate.set()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    final = rows(out)
    assert len(final) == 40 and not partial.exists()
    by_name = {r["name"]: r for r in final}
    assert all(by_name[p.name]["response_key"] == p.response_key and by_name[p.name]["top1"] == p.top1
               for p in early)  # fmt: skip
    with (many_faces / "label.csv").open() as f:
        assert [r["name"] for r in final] == [r["name"] for r in csv.DictReader(f)][:40]


def test_a_still_travels_as_its_file_only_when_nothing_changes_its_pixels(tmp_path):
    import numpy as np
    from PIL import Image

    from ger.data.media import load_still

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    rgb.save(tmp_path / "a.png")
    rgb.save(tmp_path / "a.jpg", quality=90)
    rgb.save(tmp_path / "a.webp")
    rgb.convert("L").save(tmp_path / "grey.png")
    rgb.convert("RGBA").save(tmp_path / "alpha.png")
    rgb.save(tmp_path / "a.bmp")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": servers differ on whether they apply it
    rgb.save(tmp_path / "turned.jpg", exif=exif)

    for name, mime in [("a.png", "image/png"), ("a.jpg", "image/jpeg"), ("a.webp", "image/webp"),
                       ("grey.png", "image/png")]:  # fmt: skip
        image, source = load_still(tmp_path / name)
        assert source == (mime, (tmp_path / name).read_bytes()), name
        assert np.array_equal(np.asarray(Image.open(tmp_path / name).convert("RGB")), np.asarray(image))
    for name in ["alpha.png", "a.bmp", "turned.jpg"]:
        assert load_still(tmp_path / name)[1] is None, name
    assert load_still(tmp_path / "a.png", greyscale=True)[1] is None  # changed pixels: re-encoded


def _wire_case(tmp_path: Path, name: str):
    """(shell, DecodeSpec without wire, template name, frames_as) of one kind of sample."""
    from ger.data.demo import draw_face
    from ger.run.stream import DecodeSpec

    rgb = draw_face((64, 48), "happy", 1.0, variant=1)
    if name == "clip":
        from test_reliability import write_clip

        write_clip(tmp_path / "clip.mp4", "happy", 1)
        sample = Sample("demo", "clip", "happy", media=tmp_path / "clip.mp4")
        return describe_sample(sample, "video", frames=3), DecodeSpec("video", 3, "paper", False)
    path = tmp_path / f"{name}.{'bmp' if name == 'bmp' else 'png'}"
    rgb.save(path)
    grey = name == "grey"
    shell = describe_sample(Sample("demo", name, "happy", media=path), "image", greyscale=grey)
    return shell, DecodeSpec("image", 1, "paper", grey)


def test_a_worker_task_of_several_samples_hands_each_back_in_its_place(tmp_path):
    """Samples go to the workers 8 to a task (Decoder.per_task); each comes back in its own place,
    with its own name and pixels, a broken or vanished file as that sample's error only."""
    from PIL import Image

    from ger.run.stream import Decoder, DecodeSpec, StreamStats

    shells = []
    for i in range(11):
        path = tmp_path / f"face_{i:02d}.png"
        draw(path, LABELS[i % len(LABELS)], i)
        shells.append(describe_sample(Sample("demo", path.stem, "happy", media=path), "image"))
    data = (tmp_path / "face_03.png").read_bytes()
    (tmp_path / "face_03.png").write_bytes(data[: len(data) // 2])  # truncated after describe
    (tmp_path / "face_09.png").unlink()
    spec = DecodeSpec("image", 1, "paper", False)
    stats = StreamStats(window=64, workers=1)
    decoder = Decoder(spec, stats, progress=False)
    assert decoder.per_task == 8
    try:
        handles = decoder.start(shells, len(shells))
        assert len({id(h[0]) for h in handles}) == 2  # two tasks: 8 samples, then 3
        results = decoder.collect(handles)
    finally:
        decoder.close()
    for i, (shell, got) in enumerate(zip(shells, results, strict=True)):
        if i in (3, 9):
            assert isinstance(got, str) and f"face_{i:02d}.png" in got, got
            continue
        assert got.sample.name == shell.sample.name and got.content_hash == shell.content_hash
        with Image.open(tmp_path / f"face_{i:02d}.png") as im:  # PIL's own decode of the file
            assert got.images[0].tobytes() == im.convert("RGB").tobytes()
    assert stats.decoded == 11


def test_the_feed_polled_gives_only_requests_whose_samples_are_decoded(tmp_path):
    """Feed.poll (what the server backend reads first, in its own thread) never waits for a worker:
    None while a request's samples decode, the requests in order once they are, the end once all are
    answered; and a blocking read still works after a None."""
    from ger.records import Request
    from ger.run.stream import Decoder, DecodeSpec, Feed, StreamStats

    shells = {}
    for i in range(12):
        path = tmp_path / f"face_{i:02d}.png"
        draw(path, LABELS[i % len(LABELS)], i)
        shells[path.stem] = describe_sample(Sample("demo", path.stem, "happy", media=path), "image")
    stats = StreamStats(window=8, workers=1)
    decoder = Decoder(DecodeSpec("image", 1, "paper", False), stats, progress=False)
    build = lambda loaded, group: Request(key="-".join(group), names=group, messages=[])  # noqa: E731
    feed = Feed([(n,) for n in shells], shells, decoder, 8, build)
    got, nones = [], 0
    try:
        assert feed.poll() is None  # submitted now: a worker process is still starting
        deadline = time.monotonic() + 60
        while len(got) < 6 and time.monotonic() < deadline:
            request = feed.poll()
            if request is None:
                nones += 1
                time.sleep(0.01)
                continue
            assert all(name in feed._samples for name in request.names)  # decoded, not waited for
            got.append(request.names)
        got.append(next(feed).names)  # a blocking read after the polls
        for names in got:
            feed.done(names)
        while len(got) < 12:
            request = feed.poll() or next(feed)
            got.append(request.names)
            feed.done(request.names)
        with pytest.raises(StopIteration):
            feed.poll()
    finally:
        feed.close()
        decoder.close()
    assert got == [(n,) for n in shells] and nones >= 1


def test_a_window_of_whole_worker_tasks_still_bounds_the_decoded_samples(many_faces, stub_server, tmp_path):
    """Where the window gives tasks of 8 samples (window 32, one worker), topping up waits for
    room for a whole task: still never more than the window decoded at once."""
    stub_server.model = PerfectModel(LABELS, truth(many_faces))
    extra = ["stream.window=32", "stream.workers=1"]
    metrics = run_on_stub(stub_server.url, "demo", many_faces, tmp_path / "cache", tmp_path / "run", *extra)
    stream = metrics["stream"]
    assert stream["decoded"] == 300 and 8 <= stream["peak_decoded"] <= 32, stream
    predictions = rows(tmp_path / "run")
    assert len(predictions) == 300 and sum(r["status"] == "ok" for r in predictions) >= 285


@pytest.mark.parametrize(
    "case, video_as",
    [("png", "images"), ("grey", "images"), ("bmp", "images"), ("clip", "images"), ("clip", "video")],
)
def test_workers_hand_back_images_as_sent_and_the_body_is_byte_identical(tmp_path, case, video_as):
    """With DecodeSpec.wire a worker returns the images as the server backend sends them (a PNG as
    its file, anything changed as a JPEG): far smaller than the pixels, and the POSTed body is the
    very one the backend builds from the pixels in ger's own process."""
    import pickle
    from dataclasses import replace

    from ger.backends.server import ServerBackend
    from ger.prompting.prompts import build_request
    from ger.prompting.templates import load_template
    from ger.records import EncodedImage
    from ger.run.stream import _decode

    shell, spec = _wire_case(tmp_path, case)
    backend = ServerBackend({"video_as": video_as, "video_metadata": True}, {"name": "tiny"})
    pixels, wired = _decode(shell, spec), _decode(shell, replace(spec, wire=backend.settings.wire_quality()))
    assert not any(isinstance(im, EncodedImage) for im in pixels.images)
    assert all(isinstance(im, EncodedImage) for im in wired.images) and wired.source is None
    assert len(pickle.dumps(wired)) < len(pickle.dumps(pixels)) / 2

    template = load_template("video" if case == "clip" else "facial")

    def body(loaded) -> bytes:
        request = build_request([loaded], template, LABELS, mode="single", frames_as="images",
                                key_parts={}, max_tokens=64)  # fmt: skip
        return backend._payload(request)

    assert body(wired) == body(pixels)
    if case == "png":  # sent as the file itself, not re-encoded
        assert base64.b64encode((tmp_path / "png.png").read_bytes()).decode() in body(wired).decode()


def test_json_payload_is_json_dumps_without_scanning_the_media():
    """Media swapped out and back in give json.dumps' bytes exactly, for every ASCII character and
    for payloads that need escaping (which are left to json.dumps)."""
    import json
    import random

    from ger.backends.chat_format import json_payload

    rng = random.Random(0)
    safe = base64.b64encode(rng.randbytes(3000)).decode()
    for c in [chr(i) for i in range(128)] + ["é", "\u2028"]:
        odd = safe[:1000] + c + safe[1000:]
        body = {
            "model": "m",
            "messages": [
                {"role": "system", "content": f'say {c!r} "quoted"'},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look" + c},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64," + safe, "detail": "low"},
                        },
                        {"type": "image_url", "image_url": {"url": odd}},
                        {
                            "type": "video_url",
                            "video_url": {"url": "data:video/jpeg;base64," + safe + "," + safe},
                        },
                        {"type": "input_audio", "input_audio": {"data": odd, "format": "wav"}},
                    ],
                },  # fmt: skip
            ],
            "max_tokens": 5,
        }
        assert json_payload(body) == json.dumps(body).encode(), repr(c)


@pytest.mark.parametrize("video_as", ["images", "video"])
def test_media_ger_encodes_skip_the_scan_and_still_give_json_dumps_bytes(monkeypatch, video_as):
    """Data URLs and sound that ger base64-encodes itself are marked (Base64Text): json_payload
    takes them without scanning their characters and still writes exactly json.dumps' bytes. A data
    URL of a type ger does not make stays a plain str, which json_payload scans."""
    import io
    import json

    import numpy as np
    from PIL import Image

    from ger.backends import chat_format as cf
    from ger.records import EncodedImage

    image = Image.new("RGB", (64, 48), (10, 200, 30))
    png = io.BytesIO()
    image.save(png, format="PNG")
    frames = [EncodedImage("image/jpeg", cf.jpeg_base64(image), 64, 48) for _ in range(2)]
    content = [
        {"type": "text", "text": 'look "here"'},
        {"type": "image", "image": image},  # sent as a JPEG
        {"type": "image", "image": image, "source": ("image/png", png.getvalue())},  # sent as its file
        {"type": "video", "frames": frames},  # a worker's JPEGs
        {"type": "audio", "audio": np.linspace(-1, 1, 1600), "sampling_rate": 16000},
    ]
    body = {"model": "m", "messages": cf.to_openai_messages([{"role": "user", "content": content}], video_as)}
    parts = body["messages"][0]["content"]
    media = [p[p["type"]].get("url", p[p["type"]].get("data")) for p in parts if p["type"] != "text"]
    assert len(media) == (5 if video_as == "images" else 4)
    assert all(type(m) is cf.Base64Text for m in media), [type(m) for m in media]
    expected = json.dumps(body).encode()
    monkeypatch.setattr(cf, "_json_safe", lambda value: pytest.fail("json_payload scanned ger's own base64"))
    assert cf.json_payload(body) == expected
    assert type(cf.image_data_url(EncodedImage('image/x"y', "AAAA", 1, 1))) is str


def test_real_paths_resolve_as_pathlib_does(tmp_path):
    """RealPaths (each folder resolved once, a file only when it is a link) against Path.resolve()."""
    import os

    from ger.files import RealPaths

    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "data" / "images" / "a.jpg").write_bytes(b"a")
    (tmp_path / "elsewhere" / "b.jpg").write_bytes(b"b")
    os.symlink(tmp_path / "elsewhere" / "b.jpg", tmp_path / "data" / "images" / "abs.jpg")
    os.symlink("../../elsewhere/b.jpg", tmp_path / "data" / "images" / "rel.jpg")
    os.symlink("rel.jpg", tmp_path / "data" / "images" / "chain.jpg")
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "linked")
    os.symlink(tmp_path / "data", tmp_path / "root")
    real = RealPaths()
    for path in [
        tmp_path / "data" / "images" / "a.jpg",
        tmp_path / "data" / "images" / "abs.jpg",
        tmp_path / "data" / "images" / "rel.jpg",
        tmp_path / "data" / "images" / "chain.jpg",
        tmp_path / "data" / "images" / "missing.jpg",
        tmp_path / "data" / "linked" / "b.jpg",
        tmp_path / "root" / "images" / "abs.jpg",
        tmp_path / "root" / "images",
    ]:
        assert real(path) == str(path.resolve()), path
        assert real(str(path)) == str(path.resolve()), path  # again, from the folder cache
        if path.exists():  # status: the same path, and os.stat's own answer for it
            resolved, st = real.status(path)
            assert resolved == str(path.resolve()) and st == os.stat(path), path
    os.symlink(tmp_path / "gone.jpg", tmp_path / "data" / "images" / "dangling.jpg")
    for path in ("missing.jpg", "dangling.jpg"):
        with pytest.raises(FileNotFoundError):
            real.status(tmp_path / "data" / "images" / path)


def test_digest_table_hashes_again_a_file_whose_name_is_not_utf8(tmp_path):
    """A folder named with bytes that are not UTF-8 (an old archive's Latin-1 name) reaches Python
    as a surrogate escape, which SQLite cannot store: the file is hashed each run, and no run fails."""
    folder = os.fsencode(tmp_path) + b"/caf\xe9"
    os.mkdir(folder)
    with open(folder + b"/a.jpg", "wb") as f:
        f.write(b"face" * 100)
    path = os.fsdecode(folder + b"/a.jpg")
    db = tmp_path / "cache" / "file_digests.sqlite"
    for _ in range(2):
        with fresh_table(db) as table:
            assert digests.file_digest(path) == hashlib.sha256(b"face" * 100).hexdigest()
        assert table.hashed == 1


def test_a_test_set_in_a_folder_named_in_latin1_runs_and_reruns_from_the_cache(stub_server, tmp_path):
    """The images folder is a link into a folder whose name is not UTF-8 (an old archive unpacked as
    it was): the run answers every sample and its rerun sends nothing (it failed on SQLite before)."""
    elsewhere = os.fsencode(tmp_path) + b"/caf\xe9/images"
    os.makedirs(elsewhere)
    root = tmp_path / "faces"
    root.mkdir()
    os.symlink(elsewhere, os.fsencode(root / "images"))
    pairs = [(f"face_{i}", LABELS[i]) for i in range(5)]
    for i, (name, label) in enumerate(pairs):
        draw(root / "images" / f"{name}.png", label, i)
    (root / "label.csv").write_text("name,gt\n" + "".join(f"{n},{g}\n" for n, g in pairs))
    stub_server.model = PerfectModel(LABELS, truth(root))
    cache = tmp_path / "cache"
    first = run_on_stub(stub_server.url, "demo", root, cache, tmp_path / "r1")
    assert first["requests"]["sent"] == 5 and first["requests"]["failed"] == 0
    assert [r["status"] for r in rows(tmp_path / "r1")] == ["ok"] * 5
    rerun = run_on_stub(stub_server.url, "demo", root, cache, tmp_path / "r2")
    assert rerun["requests"]["cached"] == 5 and rerun["stream"]["decoded"] == 0
    assert rows(tmp_path / "r2") == rows(tmp_path / "r1")


def test_digest_table_reads_each_folder_once_and_only_that_folder(tmp_path):
    """Digests are looked up a folder at a time: a folder, its subfolder and a folder whose name it
    begins share no rows, and every file still gets its own digest back."""
    folders = [tmp_path / "imgs", tmp_path / "imgs" / "sub", tmp_path / "imgs2", tmp_path / "imgs-b"]
    files = []
    for k, folder in enumerate(folders):
        folder.mkdir(parents=True)
        for i in range(3):
            f = folder / f"{i}.bin"
            f.write_bytes(bytes([k, i]) * (k + i + 1))
            age(f, 3600)
            files.append(f)
    db = tmp_path / "cache" / "file_digests.sqlite"
    for round_ in range(2):
        with fresh_table(db) as table:
            got = [digests.file_digest(f) for f in files]
        assert got == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
        assert table.hashed == (len(files) if round_ == 0 else 0)
        if round_:
            read = {folder: set(rows) for folder, rows in table._folders.items()}
            assert read == {str(folder): {str(f) for f in files if f.parent == folder} for folder in folders}


def test_grids_are_drawn_from_pixels_when_workers_hand_back_sent_images(tmp_path, stub_server, cache):
    """frames_as=grid through the server backend: the workers keep pixels for grids (DecodeSpec.wire
    is off), and each sample travels as one JPEG mosaic of its 3 frames side by side."""
    import io

    from PIL import Image
    from test_batch_mode import ravdess_name, write_labels

    from ger.data.demo import _write_clip

    (tmp_path / "clips" / "videos").mkdir(parents=True)
    pairs = []
    for k, label in enumerate(["happy", "sad", "anger", "fear"]):
        name = ravdess_name(label, k)
        _write_clip(tmp_path / "clips" / "videos" / f"{name}.mp4", label, 12, k, size=(64, 48))
        pairs.append((name, label))
    write_labels(tmp_path / "clips", pairs)
    stub_server.model = lambda body: ("happy", "stop")
    metrics = run_on_stub(stub_server.url, "demo_video", tmp_path / "clips", cache, tmp_path / "run",
                          "frames_as=grid", "frames=3")  # fmt: skip
    assert metrics["stream"]["decoded"] == 4 and len(stub_server.bodies) == 4
    for body in stub_server.bodies:
        urls = [p["image_url"]["url"] for m in body["messages"] if isinstance(m["content"], list)
                for p in m["content"] if p["type"] == "image_url"]  # fmt: skip
        assert len(urls) == 1 and urls[0].startswith("data:image/jpeg;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1]))).size == (3 * 64, 48)


def _decoding_workers(pid: int) -> list[int]:
    """The spawned worker processes of process `pid` (not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == pid and b"spawn_main" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_a_run_whose_workers_are_killed_midway_gives_the_undisturbed_predictions(
    many_faces, stub_server, tmp_path
):
    """SIGKILL the decoding workers three times while `ger run` streams 120 images one request at a time
    (as the OOM killer would; ger/run/workers.py): the run ends as an undisturbed one does."""
    perfect = PerfectModel(LABELS, truth(many_faces))
    stub_server.model = lambda body: (time.sleep(0.01), perfect(body))[1]
    extra = ["backend.concurrency=1", "limit=120", "stream.workers=2", "stream.window=8"]
    run_on_stub(stub_server.url, "demo", many_faces, tmp_path / "c1", tmp_path / "calm", *extra)

    sent_before = len(stub_server.bodies)
    args = stub_run_args(stub_server.url, "demo", many_faces, tmp_path / "killed", *extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GER_CACHE_DIR": str(tmp_path / "c2")}
    proc = subprocess.Popen([sys.executable, "-m", "ger.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    killed = []
    try:
        for after in (10, 40, 70):  # requests answered before each round of kills
            deadline = time.monotonic() + 120
            while len(stub_server.bodies) - sent_before < after and proc.poll() is None:
                assert time.monotonic() < deadline, "the run stopped asking"
                time.sleep(0.01)
            for pid in _decoding_workers(proc.pid):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        err = proc.communicate(timeout=300)[1]
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert len(killed) >= 3, killed
    metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert metrics["stream"]["workers_lost"] >= 3 and metrics["stream"]["decoded"] == 120
    assert "a decoding worker died (signal 9)" in (tmp_path / "killed" / "cli.log").read_text()
    assert rows(tmp_path / "killed") == rows(tmp_path / "calm")
    assert all(r["status"] == "ok" for r in rows(tmp_path / "killed"))


def test_the_benchmarks_instant_server_answers_every_request_of_a_run(many_faces, tmp_path):
    """benchmarks/bench_stream.py times ger against tests/instant_server.py: a run through it must be a
    real run, every sample sent over HTTP and answered, not a run that fails fast."""
    import re
    import socket

    from instant_server import InstantServer

    server = InstantServer("surprise").start()
    try:
        metrics = run_on_stub(server.url, "demo", many_faces, tmp_path / "cache", tmp_path / "run",
                              "stream.workers=2")  # fmt: skip
        assert server.requests == 300
        assert metrics["n"] == 300 and metrics["requests"]["failed"] == 0
        assert metrics["stream"]["nice"] == 10  # conf/config.yaml's: decoding below ger's own priority
        predictions = rows(tmp_path / "run")
        assert {(r["prediction"], r["status"]) for r in predictions} == {("surprise", "ok")}
        assert len(predictions) == 300

        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            body = b'{"messages": []}'
            post = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            sock.sendall(post + post + b"GET /v1/nothing HTTP/1.1\r\n\r\n")  # kept alive, pipelined
            chunked = b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            sock.sendall(chunked)
            received = b""
            while chunk := sock.recv(65536):  # the server closes after refusing the chunked body
                received += chunk
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", received) == [b"200", b"200", b"404", b"411"]
        assert server.requests == 302
    finally:
        server.stop()
