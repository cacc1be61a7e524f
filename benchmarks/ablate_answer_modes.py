"""The answer modes side by side on the demo data: the README's answer-mode ablation tables.

Run by hand:  python benchmarks/ablate_answer_modes.py [--backend hf|vllm_cpu] [--model tiny-random-qwen2vl]

In a fresh GER_CACHE_DIR (the tiny model and the demo data are built by the first run), runs
`ger run dataset=demo answer=<mode>` once per mode of ger/answers/modes.py (free, batch, choice,
likelihood) as subprocesses, as a user would, then `ger report` over the runs. It computes nothing
itself: the first table is each run's metrics.json (`answer_metrics`: top-1, top-2, label
probabilities' coverage, NLL, ECE, macro one-vs-rest AUC; `parse_failure_rate`; `requests.sent`)
beside the run's wall time; the second is `ger report`'s answer-mode comparison (report.json
"modes", ger/report/modes.py): McNemar's paired test on top-1 correctness between every two modes.
With a tiny random model the numbers measure the harness (what each mode costs, how often its answer
can be read), not emotion recognition.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("free", "batch", "choice", "likelihood")


def ger(args: list[str], cache: Path) -> float:
    """One `ger` command as a user runs it; its wall time in seconds (exits with its stderr on failure)."""
    env = {**os.environ, "GER_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ger.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"ger {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def run_mode(mode: str, args: argparse.Namespace, cache: Path, out: Path) -> dict:
    """`ger run` in `mode`; its metrics.json and wall time."""
    seconds = ger(["run", "dataset=demo", f"answer={mode}", f"model={args.model}", f"backend={args.backend}",
                   f"sampling.max_tokens={args.max_tokens}", "progress=false", f"hydra.run.dir={out}"],
                  cache)  # fmt: skip
    return {"mode": mode, "seconds": seconds, **json.loads((out / "metrics.json").read_text())}


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def runs_table(results: list[dict]) -> str:
    """One row per mode, every figure as the run's metrics.json states it."""
    lines = [
        "| answer | n | top-1 % | top-2 % | parse failures % | probs | NLL | ECE % | AUC % | requests "
        "| wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        a = r["answer_metrics"]
        lines.append(
            f"| {r['mode']} | {a['n']} | {a['top1']:.2f} | {a['top2']:.2f} | {r['parse_failure_rate']:.2f} | "
            f"{a['with_probs']}/{a['n']} | {_num(a['nll'], 3)} | {_num(a['ece'])} | {_num(a['auc_macro'])} | "
            f"{r['requests']['sent']} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def mcnemar_table(report: dict) -> str:
    """`ger report`'s paired tests between the modes (report.json "modes": one group here)."""
    groups = report["modes"]
    if len(groups) != 1:
        raise SystemExit(f"expected one answer-mode group in ger report's output, got {len(groups)}")
    lines = ["| A | B | paired n | only A right | only B right | McNemar p |", "|---|---|---|---|---|---|"]
    for t in groups[0]["mcnemar"]:
        lines.append(
            f"| {t['a']} | {t['b']} | {t['n']} | {t['only_a_right']} | {t['only_b_right']} | "
            f"{t['p_value']:.3g} ({t['method']}) |"
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
        cache, runs = Path(tmp) / "cache", Path(tmp) / "runs"
        results = [run_mode(m, args, cache, runs / m) for m in args.modes.split(",")]
        ger(["report", str(runs), "--out", str(Path(tmp) / "report"), "--bootstrap", "0"], cache)
        report = json.loads((Path(tmp) / "report" / "report.json").read_text())
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    n = results[0]["n"]
    print(f"demo data ({n} samples), model {args.model}, backend {args.backend}; {when}, {machine}\n")
    print(runs_table(results))
    print()
    print(mcnemar_table(report))


if __name__ == "__main__":
    main()
