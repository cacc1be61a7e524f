"""The answer modes side by side on the demo data: the README's answer-mode ablation table.

Run by hand:  python benchmarks/ablate_answer_modes.py [--backend hf|vllm_cpu] [--model tiny-random-qwen2vl]

In a fresh GER_CACHE_DIR (the tiny model and the demo data are built by the first run), runs
`ger run dataset=demo answer=<mode>` for every mode of ger/answers/modes.py as subprocesses, as a
user would, and prints one markdown row per mode from each run's metrics.json and predictions.csv:
top-1 accuracy, top-2 accuracy (the true label among the first two of the ranking), parse failures,
mean negative log-likelihood of the true label (likelihood mode: its probabilities), requests sent
and wall time. With a tiny random model the numbers measure the harness (what each mode costs and
how often its answer can be read), not emotion recognition.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("free", "choice", "batch", "likelihood")


def run_mode(mode: str, args: argparse.Namespace, cache: Path, out: Path) -> dict:
    """One `ger run` in `mode`; its metrics, per-row figures and wall time."""
    env = {**os.environ, "GER_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ger.cli", "run", "dataset=demo", f"answer={mode}", f"model={args.model}",
           f"backend={args.backend}", f"sampling.max_tokens={args.max_tokens}", "progress=false",
           f"hydra.run.dir={out}"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"answer={mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    meta = json.loads((out / "metrics.json").read_text())
    with (out / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    top2 = sum(r["gt"] in r["prediction"].split(",")[:2] for r in rows)
    probs = [(json.loads(r["probs"]), r["gt"]) for r in rows if r.get("probs")]
    nll = -sum(math.log(max(p.get(gt, 0.0), 1e-300)) for p, gt in probs)
    return {
        "mode": mode,
        "n": meta["n"],
        "acc": meta["scores"][0]["value"],
        "top2": 100.0 * top2 / len(rows),
        "parse_failures": meta["parse_failure_rate"],
        "nll": nll / len(probs) if probs else None,
        "sent": meta["requests"]["sent"],
        "seconds": seconds,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| answer | n | top-1 acc % | top-2 acc % | parse failures % | mean NLL | requests | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        nll = f"{r['nll']:.3f}" if r["nll"] is not None else "–"
        lines.append(
            f"| {r['mode']} | {r['n']} | {r['acc']:.2f} | {r['top2']:.2f} | {r['parse_failures']:.2f} | "
            f"{nll} | {r['sent']} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="hf", help="hf | vllm_cpu | vllm (default hf)")
    parser.add_argument("--model", default="tiny-random-qwen2vl")
    parser.add_argument("--max-tokens", type=int, default=32, help="free/choice answer budget")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ger-ablate-") as tmp:
        cache = Path(tmp) / "cache"
        results = [run_mode(m, args, cache, Path(tmp) / m) for m in args.modes.split(",")]
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    n = results[0]["n"]
    print(f"demo data ({n} samples), model {args.model}, backend {args.backend}; {when}, {machine}\n")
    print(table(results))


if __name__ == "__main__":
    main()
