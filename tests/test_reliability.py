"""`ger run` under crashes and bad input, end to end (transformers backend, tiny random model).

Crashes: a run is SIGKILLed while decoding media, while answers arrive and while it writes
its results; after each, the cache passes SQLite's integrity check, no half-written file is
visible, and a restart answers every sample exactly once, sending only what was not cached.
Bad input: unreadable media become per-sample `error` rows; a broken label list stops the
run before any request; `ger prepare` lists what is missing or unreadable.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import cached_answers, rows, run_ger

pytest.importorskip("transformers")

BASE = ["model=tiny-random-qwen2vl", "backend=hf", "sampling.max_tokens=8"]
QUIET = [*BASE, "progress=false"]
LABELS = ["anger", "disgust", "fear", "happy", "neutral", "sad", "surprise"]


# ---------------------------------------------------------------- helpers


def write_labels(root: Path, rows: list[tuple[str, str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "label.csv").open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("name", "gt"), *rows])


def write_big_images(folder: Path, n: int, side: int = 2000) -> list[tuple[str, str]]:
    """Large noisy faces (~0.1-0.2 s each to decode and hash), so loading media takes long enough
    to be killed in; the model sees them downscaled to a few tokens."""
    import numpy as np
    from PIL import Image

    from ger.data.demo import draw_face

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        face = np.asarray(draw_face((side, side), label, variant=i), dtype=np.int16)
        noisy = np.clip(face + rng.integers(-40, 40, face.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"big_{i:03d}.jpg", quality=90)
        rows.append((f"big_{i:03d}.jpg", label))
    return rows


def write_clip(path: Path, label: str, variant: int, n_frames: int = 16) -> None:
    import cv2
    import numpy as np

    from ger.data.demo import draw_face

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (64, 48))
    base = np.asarray(draw_face((64, 48), label, variant=variant))[:, :, ::-1]
    for k in range(n_frames):
        writer.write(np.ascontiguousarray(np.roll(base, k, axis=1)))
    writer.release()


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def assert_cache_intact(cache: Path) -> None:
    db = cache / "responses.sqlite"
    if db.exists():
        with sqlite3.connect(db, timeout=5) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


class Ger:
    """`ger ARGS` in the background, its stderr collected as it comes (tqdm writes \\r, not lines)."""

    def __init__(self, args: list[str], cache: Path, cwd: Path):
        env = {**os.environ, "GER_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ger.cli", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.err = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stderr.fileno(), 65536):
            self.err += chunk

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")

    def wait_for(self, done, timeout: float = 300, poll: float = 0.05) -> None:
        deadline = time.time() + timeout
        while not done() and self.proc.poll() is None and time.time() < deadline:
            time.sleep(poll)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(timeout=10)


def check_visible_files(run: Path, n: int) -> set[str]:
    """Parse every result file present: each is either absent or complete, never half-written."""
    seen = set()
    if (run / "predictions.csv").exists():
        preds = rows(run)
        assert len(preds) == n and len({r["name"] for r in preds}) == n
        seen.add("predictions.csv")
    if (run / "metrics.json").exists():
        assert metrics(run)["n"] == n
        seen.add("metrics.json")
    if (run / "report.md").exists():
        assert "parse failures" in (run / "report.md").read_text()
        seen.add("report.md")
    return seen


# ---------------------------------------------------------------- crashes


def test_killed_at_every_stage_the_restart_answers_each_sample_once(cache, tmp_path):
    n = 12
    data = tmp_path / "data"
    samples = write_big_images(data / "demo" / "images", n)
    write_labels(data / "demo", samples)
    names = [name for name, _ in samples]
    args = ["run", "dataset=demo", f"data_root={data}"]

    # 1. while loading media: nothing asked, nothing written, nothing cached
    ger = Ger([*args, *BASE, f"hydra.run.dir={tmp_path / 'r1'}"], cache, tmp_path)
    ger.wait_for(lambda: "loading media" in ger.stderr, poll=0.005)
    ger.kill()
    assert "loading media" in ger.stderr, ger.stderr[-2000:]
    assert f"{n}/{n}" not in ger.stderr and "requests" not in ger.stderr  # killed inside the loop
    assert cached_answers(cache) == 0 and not (tmp_path / "r1" / "predictions.csv").exists()
    assert_cache_intact(cache)

    # 2. mid-way through the requests (the hf backend answers 4 at a time)
    ger = Ger([*args, *QUIET, f"hydra.run.dir={tmp_path / 'r2'}"], cache, tmp_path)
    ger.wait_for(lambda: cached_answers(cache) >= 1, poll=0.1)
    ger.kill()
    cached = cached_answers(cache)
    assert 0 < cached < n, f"expected to kill mid-way, found {cached} answers\n{ger.stderr[-2000:]}"
    assert not (tmp_path / "r2" / "predictions.csv").exists()
    assert_cache_intact(cache)

    # the restart sends exactly what was not cached and answers every sample once
    run_ger([*args, *QUIET, f"hydra.run.dir={tmp_path / 'r3'}"], cache, tmp_path)
    assert [r["name"] for r in rows(tmp_path / "r3")] == names
    assert metrics(tmp_path / "r3")["requests"] == {
        "cached": cached,
        "sent": n - cached,
        "failed": 0,
        "splits": 0,
    }
    assert cached_answers(cache) == n
    assert_cache_intact(cache)

    # 3. while writing the results: watch the folder and kill as soon as predictions.csv appears
    out = tmp_path / "r4"
    ger = Ger([*args, *QUIET, f"hydra.run.dir={out}"], cache, tmp_path)
    seen: set[str] = set()

    def written() -> bool:
        seen.update(check_visible_files(out, n))
        return "predictions.csv" in seen

    ger.wait_for(written, poll=0)
    ger.kill()
    assert "predictions.csv" in seen, ger.stderr[-2000:]
    check_visible_files(out, n)
    assert_cache_intact(cache)

    # the restart in the same folder is served from the cache and replaces every file
    run_ger([*args, *QUIET, f"hydra.run.dir={out}"], cache, tmp_path)
    assert check_visible_files(out, n) == {"predictions.csv", "metrics.json", "report.md"}
    assert metrics(out)["requests"]["sent"] == 0 and metrics(out)["requests"]["cached"] == n
    assert rows(out) == rows(tmp_path / "r3")
    assert not list(out.glob("*.tmp"))
    assert cached_answers(cache) == n
    assert_cache_intact(cache)


# ---------------------------------------------------------------- bad input


def assert_error_row(row: dict, *words: str) -> None:
    assert row["status"] == "error" and row["prediction"] == "" and row["top1"] == ""
    detail = row["detail"]
    assert all(w in detail for w in words), detail
    assert "Traceback" not in detail and "\n" not in detail and len(detail) < 600, detail


def test_unreadable_video_and_transcript_are_error_rows_and_the_run_finishes(cache, tmp_path):
    import numpy as np

    root = tmp_path / "data" / "demo_multimodal"
    (root / "transcripts").mkdir(parents=True)
    for i, name in enumerate(("good", "truncated", "zero", "badtext")):
        write_clip(root / "videos" / f"{name}.mp4", "happy", variant=i)
        if name != "badtext":
            np.save(root / "transcripts" / f"{name}.npy", np.array("We won, I cannot stop smiling."))
    clip = (root / "videos" / "truncated.mp4").read_bytes()
    (root / "videos" / "truncated.mp4").write_bytes(clip[: len(clip) // 2])
    (root / "videos" / "zero.mp4").write_bytes(b"")
    (root / "transcripts" / "badtext.npy").write_bytes(b"\x93NUMPY garbage, not an array")
    names = ["good", "truncated", "zero", "missing", "badtext"]
    write_labels(root, [(n, "happy") for n in names])
    run = tmp_path / "run"
    args = ["dataset=demo_multimodal", f"data_root={tmp_path / 'data'}", "frames=2"]

    proc = run_ger(["run", *args, *QUIET, f"hydra.run.dir={run}"], cache, tmp_path)
    assert proc.returncode == 0
    by_name = {r["name"]: r for r in rows(run)}
    assert list(by_name) == names
    assert by_name["good"]["status"] != "error" and by_name["good"]["response_key"]
    assert_error_row(by_name["truncated"], "truncated.mp4", "cannot open video")
    assert_error_row(by_name["zero"], "zero.mp4", "empty (0 bytes)")
    assert_error_row(by_name["missing"], "missing.mp4", "not found")
    assert_error_row(by_name["badtext"], "badtext.npy", "cannot read transcript")
    meta = metrics(run)
    assert meta["n"] == 5 and meta["parse_failures"] >= 4 and meta["parse_failure_rate"] >= 80.0
    assert meta["requests"]["sent"] == 1  # only the readable sample is asked
    assert f"parse failures: {meta['parse_failures']}" in (run / "report.md").read_text()

    proc = run_ger(["prepare", *args, "progress=false"], cache, tmp_path, check=False)
    assert proc.returncode != 0
    for expected in ("missing files", "missing.mp4", "unreadable files", "truncated", "zero", "badtext"):
        assert expected in proc.stdout, proc.stdout


def test_unreadable_images_are_error_rows_and_prepare_lists_them(cache, tmp_path):
    from ger.data.demo import draw_face

    root = tmp_path / "data" / "demo"
    (root / "images").mkdir(parents=True)
    buf = root / "images" / "truncated.png"
    draw_face((160, 160), "happy").save(buf)
    buf.write_bytes(buf.read_bytes()[: buf.stat().st_size // 2])
    (root / "images" / "zero.png").write_bytes(b"")
    (root / "images" / "notanimage.png").write_text("this is text, not a PNG")
    names = ["truncated", "zero", "notanimage", "missing"]
    write_labels(root, [(n, "happy") for n in names])
    run = tmp_path / "run"
    args = ["dataset=demo", f"data_root={tmp_path / 'data'}"]

    # every sample fails before any request, so no engine starts; the run still finishes and scores
    proc = run_ger(["run", *args, *QUIET, f"hydra.run.dir={run}"], cache, tmp_path)
    assert proc.returncode == 0
    by_name = {r["name"]: r for r in rows(run)}
    assert list(by_name) == names
    assert_error_row(by_name["truncated"], "truncated.png", "cannot decode image")
    assert_error_row(by_name["zero"], "zero.png", "empty (0 bytes)")
    assert_error_row(by_name["notanimage"], "notanimage.png", "cannot decode image")
    assert_error_row(by_name["missing"], "missing.png", "not found")
    meta = metrics(run)
    assert meta["n"] == 4 and meta["parse_failures"] == 4 and meta["parse_failure_rate"] == 100.0
    assert meta["scores"][0]["value"] == 0.0 and meta["requests"]["sent"] == 0

    proc = run_ger(["prepare", *args, "progress=false"], cache, tmp_path, check=False)
    assert proc.returncode != 0
    assert (
        "4 problems" in proc.stdout
        and "1 missing files" in proc.stdout
        and "3 unreadable files" in proc.stdout
    )
    for name in names:
        assert name in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    "label_rows, message",
    [
        ([("a.png", "anger"), ("b.png", "joyful")], ["labels outside the label set", "joyful"]),
        (
            [("a.png", "anger"), ("b.png", "sad"), ("a.png", "happy")],
            ["names listed more than once", "a.png"],
        ),
        ([("a.png", "anger"), ("../../etc/passwd", "sad")], ["../../etc/passwd", "points outside"]),
    ],
    ids=["unknown-label", "duplicate-name", "path-escape"],
)
def test_broken_label_list_stops_before_the_run(cache, tmp_path, label_rows, message):
    from ger.data.demo import draw_face

    root = tmp_path / "data" / "demo"
    write_labels(root, label_rows)
    (root / "images").mkdir()
    for name, label in label_rows:
        if "/" not in name:
            draw_face((64, 64), label if label in LABELS else "happy").save(root / "images" / name)
    run = tmp_path / "run"
    proc = run_ger(
        ["run", "dataset=demo", f"data_root={tmp_path / 'data'}", *QUIET, f"hydra.run.dir={run}"],
        cache,
        tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert all(m in proc.stderr for m in message), proc.stderr[-3000:]
    assert not (run / "predictions.csv").exists() and not (cache / "responses.sqlite").exists()
