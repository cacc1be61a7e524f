"""Scoring every released GPT-4V file against the 2 s target.

Run by hand:  python benchmarks/bench_scoring.py [--quick] [--reference-dir DIR] [--profile]

The release folder comes from --reference-dir, else $GER_REFERENCE_DIR, else
../shared/reference/gpt4v-emotion/results beside the repository. Prints:
  - in-process: `ger.report.reference.score_release(ref_dir)` timed after the imports (best of 3,
    1 with --quick), and once more writing the run folders as `ger reproduce` does;
  - cold: wall time of a `ger reproduce` subprocess (interpreter start, imports, scoring,
    writing the tables);
each with its ratio to the 2 s target. When the in-process time is over the target (or with
--profile) a cProfile of one call shows where the time goes. Then the report's confidence intervals:
`ger.scoring.stats.bootstrap_ci` for acc, uar and wf1, 2,000 resamples of 8,000 predictions, against
the textbook bootstrap of accuracy alone (resampled index rows, each row's mean) in the same run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 2.0


def reference_dir(arg: Path | None) -> Path:
    path = arg or Path(
        os.environ.get("GER_REFERENCE_DIR") or REPO.parent / "shared/reference/gpt4v-emotion/results"
    )
    if not path.is_dir():
        raise SystemExit(f"reference folder not found: {path}; pass --reference-dir or set GER_REFERENCE_DIR")
    return path


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def line(what: str, seconds: float) -> str:
    return f"{what:<52} {seconds:6.3f} s  ({seconds / TARGET_S:.2f}x the {TARGET_S:.0f} s target)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-dir", type=Path)
    parser.add_argument("--quick", action="store_true", help="one timed call instead of the best of 3")
    parser.add_argument("--profile", action="store_true", help="print a profile even when under the target")
    args = parser.parse_args()
    ref = reference_dir(args.reference_dir)

    t_import, _ = timed(lambda: __import__("ger.report.reference"))
    from ger.report.reference import discover, score_release

    files = discover(ref)
    rows = sum(max(0, len(f.path.read_text(encoding="utf-8").splitlines()) - 1) for f in files)
    runs = [timed(lambda: score_release(ref)) for _ in range(1 if args.quick else 3)]
    best, scores = min(runs, key=lambda r: r[0])
    with tempfile.TemporaryDirectory(prefix="ger-bench-scoring-") as tmp:
        t_write, _ = timed(lambda: score_release(ref, Path(tmp) / "out"))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        cmd = [
            sys.executable,
            "-m",
            "ger.cli",
            "reproduce",
            "--reference-dir",
            str(ref),
            "--out",
            str(Path(tmp) / "cold"),
        ]
        t_cold, proc = timed(lambda: subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp))
        if proc.returncode != 0:
            raise SystemExit(f"ger reproduce failed:\n{proc.stderr[-3000:]}")

    print(f"{len(files)} released files, {rows} predictions, {len(scores)} scored ({ref})")
    print(f"import ger.report.reference: {t_import:.3f} s (not counted below)")
    print(line(f"score_release in-process ({'1 call' if args.quick else 'best of 3'})", best))
    print(line("score_release in-process, writing run folders", t_write))
    print(line("ger reproduce, cold subprocess (wall)", t_cold))
    if best > TARGET_S or args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        score_release(ref)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(18)
        print(out.getvalue())
    bootstrap_vs_textbook()


def bootstrap_vs_textbook(n: int = 8000, n_boot: int = 2000) -> None:
    """ger's intervals for three metrics vs the plain index-resampling bootstrap of one (best of 3 each)."""
    import numpy as np

    from ger.scoring.stats import bootstrap_ci

    rng = np.random.default_rng(0)
    labels = np.array(["a", "b", "c", "d", "e", "f", "g"])
    yt = labels[rng.integers(0, 7, n)]
    yp = np.where(rng.random(n) < 0.6, yt, labels[rng.integers(0, 7, n)])

    def ours() -> None:
        for metric in ("acc", "uar", "wf1"):
            bootstrap_ci(yt, yp, metric, n_boot=n_boot)

    def textbook() -> None:
        hits = yt == yp
        idx = np.random.default_rng(0).integers(0, n, size=(n_boot, n))
        np.percentile(100 * hits[idx].mean(axis=1), [2.5, 97.5])

    t_ours = min(timed(ours)[0] for _ in range(3))
    t_plain = min(timed(textbook)[0] for _ in range(3))
    print(
        f"bootstrap_ci acc+uar+wf1, {n_boot} resamples of {n}: {t_ours:.3f} s; the textbook bootstrap of "
        f"acc alone: {t_plain:.3f} s; ratio {t_ours / t_plain:.2f} (three metrics vs one)"
    )


if __name__ == "__main__":
    main()
