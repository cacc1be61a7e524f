"""A finished run served again from the response cache vs the run itself.

Run by hand:  python benchmarks/bench_rerun.py [--quick] [--max-tokens 32]

In a fresh GER_CACHE_DIR (the tiny model and the demo data are built first, untimed), runs
`ger run dataset=demo model=tiny-random-qwen2vl backend=hf` twice as subprocesses, as a user
would: the first starts the engine and asks every sample, the second finds every answer in
the cache and starts no engine. Prints both wall times and their ratio (target >= 50x).
A cached rerun is mostly Python start-up and imports, so a third, cached run under
`python -X importtime` splits its time into interpreter start, imports (the largest named)
and the rest, and the ratio is printed again with start-up and imports taken off both runs.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 50.0


def ger(args: list[str], cache: Path, cwd: Path, python_flags: tuple[str, ...] = ()) -> tuple[float, str]:
    """Wall time of `python -m ger.cli ARGS` and its stderr; raises when it fails."""
    env = {**os.environ, "GER_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *python_flags, "-m", "ger.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"ger {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc.stderr


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def import_times(stderr: str) -> tuple[float, list[tuple[float, str]]]:
    """Total seconds of top-level imports in `-X importtime` output, and the largest of them."""
    top = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = (x for x in line.split(":", 1)[1].split("|"))
        if not name.startswith("  "):  # one space after the bar: imported by the program itself
            top.append((int(cumulative) / 1e6, name.strip()))
    return sum(s for s, _ in top), sorted(top, reverse=True)


def prepare(cache: Path) -> None:
    """The tiny model and the demo data, built before any timing (a one-off cost, not a run's)."""
    from ger.data.demo import ensure_demo
    from ger.testing.tiny_models import ensure_tiny_model

    ensure_tiny_model("qwen2_vl", cache)
    ensure_demo(cache / "demo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 images instead of all 14")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    # ger's modules byte-compiled, as an installed package has them: a run under PYTHONDONTWRITEBYTECODE
    # (as on this project's machines) would compile them all again each time
    compileall.compile_dir(str(REPO / "ger"), quiet=1)

    with tempfile.TemporaryDirectory(prefix="ger-bench-rerun-") as tmp:
        tmp_path = Path(tmp)
        cache = tmp_path / "cache"
        os.environ["GER_CACHE_DIR"] = str(cache)
        t0 = time.perf_counter()
        prepare(cache)
        print(f"prepared tiny model and demo data in {time.perf_counter() - t0:.1f} s (not timed below)")
        run = [
            "run",
            "dataset=demo",
            "model=tiny-random-qwen2vl",
            "backend=hf",
            "progress=false",
            f"sampling.max_tokens={args.max_tokens}",
            *(["limit=4"] if args.quick else []),
        ]
        first, _ = ger([*run, f"hydra.run.dir={tmp_path / 'first'}"], cache, tmp_path)
        cached, _ = ger([*run, f"hydra.run.dir={tmp_path / 'cached'}"], cache, tmp_path)
        meta = json.loads((tmp_path / "cached" / "metrics.json").read_text())
        requests = meta["requests"]
        assert requests["sent"] == 0, f"the rerun sent {requests['sent']} requests; expected all cached"
        _, trace = ger([*run, f"hydra.run.dir={tmp_path / 'traced'}"], cache, tmp_path, ("-X", "importtime"))
        startup = min(wall([sys.executable, "-c", "pass"]) for _ in range(3))
        imports, largest = import_times(trace)

    n = meta["n"]
    print(f"first run    ({n} samples, max_tokens {args.max_tokens}, engine + {n} requests): {first:7.2f} s")
    print(f"cached rerun (sent {requests['sent']}, cached {requests['cached']}, no engine): {cached:7.2f} s")
    ratio = first / cached
    print(f"ratio: {ratio:.1f}x (target >= {TARGET:.0f}x: {'met' if ratio >= TARGET else 'NOT met'})")
    rest = max(cached - startup - imports, 0.01)
    print(
        f"cached rerun = interpreter start {startup:.2f} s + imports {imports:.2f} s "
        f"(under -X importtime) + the rest {rest:.2f} s"
    )
    print("largest imports: " + ", ".join(f"{name} {s:.2f} s" for s, name in largest[:6]))
    net = max(first - startup - imports, 0.01) / rest
    print(f"ratio with interpreter start and imports taken off both runs: {net:.1f}x")


if __name__ == "__main__":
    main()
