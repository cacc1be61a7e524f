"""Answer modes side by side: runs that differ only in how the answer was obtained.

A run's answer mode is its `answer` (free | batch | choice | likelihood; metrics.json, else config.yaml);
a run without one gets the mode its `mode` / `structured_output` meant (batch -> batch, single
with structured output -> choice, else free). Runs on the same test set, variant and model whose
other settings are equal form a group; `ger report` shows each group as one table (a row per mode:
the set's metrics, top-1/top-2, and NLL/ECE/AUC where answers had probabilities) with McNemar's
paired test on top-1 correctness between every two modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from ger.report.runs import NOT_IN_LABEL, Run
from ger.scoring.answer_metrics import AnswerMetrics, answer_metrics
from ger.scoring.stats import McNemar, format_p, mcnemar

MODE_ORDER = ("free", "batch", "choice", "likelihood")
# Settings that are part of how the answer is obtained (batch mode's own knobs included), so two runs
# that differ only in them differ only in answer mode.
ANSWER_KEYS = {"answer", "mode", "structured_output", "batch_size", "batch_seed", "batch_order"}
ANSWER_KEYS |= {"modality_batch_sizes", "generation.max_tokens_per_record"}


def answer_mode(run: Run) -> str:
    """The run's answer mode: metrics.json's or config's `answer`, else what `mode`/`structured_output`
    meant (the older spellings, as ger/answers/modes.py reads them)."""
    for value in (run.metrics.get("answer"), run.setting("answer")):
        if value not in (None, "null", ""):
            return str(value)
    if run.setting("mode") == "batch":
        return "batch"
    return "choice" if run.setting("structured_output") == "true" else "free"


def _is_answer_key(key: str) -> bool:
    return key in ANSWER_KEYS or key.startswith("answer.")


@dataclass
class ModeRow:
    mode: str
    run: Run
    answer: AnswerMetrics


@dataclass
class ModeTest:
    a: str  # modes
    b: str
    test: McNemar


@dataclass
class ModeGroup:
    """Runs on one test set with one model and equal settings, in different answer modes."""

    test_set: str
    model: str
    settings: dict[str, str]  # the shared settings that differ from other groups' (for the heading)
    rows: list[ModeRow]
    tests: list[ModeTest] = field(default_factory=list)

    def to_dict(self, n_boot: int, seed: int) -> dict[str, Any]:
        metrics = self.rows[0].run.spec.metrics
        return {
            "dataset": self.test_set,
            "model": self.model,
            "settings": self.settings,
            "runs": [
                {
                    "answer": r.mode,
                    "path": str(r.run.path),
                    "n": r.answer.n,
                    "values": {m: round(r.run.interval(m, 0, seed).value, 2) for m in metrics},
                    "answer_metrics": r.answer.to_dict(),
                }
                for r in self.rows
            ],
            "mcnemar": [
                {
                    "a": t.a,
                    "b": t.b,
                    "n": t.test.n,
                    "only_a_right": t.test.b,
                    "only_b_right": t.test.c,
                    "statistic": round(t.test.statistic, 4),
                    "p_value": t.test.p_value,
                    "method": t.test.method,
                }
                for t in self.tests
            ],  # fmt: skip
        }


def _correct(run: Run) -> tuple[np.ndarray, list[str]]:
    """Top-1 correctness per sample (the run's scored outcome) and the sample names, for McNemar."""
    out = run.outcome
    return np.asarray(out.y_true) == np.asarray(out.y_pred), out.names


def _order(mode: str) -> tuple[int, str]:
    return (MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), mode)


def mode_groups(runs: list[Run]) -> list[ModeGroup]:
    """Groups of runs that differ only in answer mode (two modes at least), with the paired tests."""
    own = [r for r in runs if not r.is_reference]
    keys = sorted(k for k in {k for r in own for k in r.overrides} - NOT_IN_LABEL if not _is_answer_key(k))
    by_setting: dict[tuple[Any, ...], list[Run]] = {}
    for run in own:
        settings = tuple((k, run.setting(k)) for k in keys)
        by_setting.setdefault((run.test_set, run.variant, run.model, settings), []).append(run)
    varying = [k for k in keys if len({r.setting(k) for r in own}) > 1]
    groups = []
    for (test_set, _, model, _), members in by_setting.items():
        if len({answer_mode(r) for r in members}) < 2:
            continue
        rows = sorted((ModeRow(answer_mode(r), r, answer_metrics(r.outcome)) for r in members),
                      key=lambda row: (_order(row.mode), str(row.run.path)))  # fmt: skip
        settings = {k: v for k in varying if (v := members[0].setting(k)) is not None}
        group = ModeGroup(test_set, model, settings, rows)
        for x, y in combinations(rows, 2):
            if x.mode != y.mode:
                group.tests.append(ModeTest(x.mode, y.mode, mcnemar(*_correct(x.run), *_correct(y.run))))
        groups.append(group)
    return groups


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _interval(run: Run, metric: str, n_boot: int, seed: int) -> str:
    iv = run.interval(metric, n_boot, seed)
    return str(iv) if n_boot else _num(iv.value)


def modes_markdown(groups: list[ModeGroup], n_boot: int, seed: int) -> list[str]:
    """One table per group (a row per answer mode) and its paired tests."""
    if not groups:
        return []
    lines = [
        "## Answer modes side by side",
        "",
        "Runs that differ only in answer mode. Metrics in % over every sample (failures wrong), "
        "top-2: the true class among the first two ranked labels; NLL (nats), ECE (%, 15 bins) and "
        "one-vs-rest AUC (%, macro) over the samples whose answer has label probabilities (`probs`). "
        "Paired test: McNemar on top-1 correctness, on the samples both runs scored.",
        "",
    ]
    for g in groups:
        spec = g.rows[0].run.spec
        extra = " ".join(f"{k}={v}" for k, v in g.settings.items())
        lines += [f"### {spec.title}: {g.model}" + (f" ({extra})" if extra else ""), ""]
        head = ["answer", "n", *(m.upper() for m in spec.metrics), "top-1", "top-2", "probs", "NLL", "ECE"]
        head.append("AUC")
        body = []
        for r in g.rows:
            a = r.answer
            cells = [_interval(r.run, m, n_boot, seed) for m in spec.metrics]
            probs = f"{a.with_probs}/{a.n}"
            body.append([r.mode, str(a.n), *cells, _num(a.top1), _num(a.top2), probs, _num(a.nll, 4),
                         _num(a.ece), _num(a.auc_macro)])  # fmt: skip
        lines += _table(head, body) + [""]
        tests = [[t.a, t.b, str(t.test.n), str(t.test.b), str(t.test.c),
                  f"{format_p(t.test.p_value)} ({t.test.method})"] for t in g.tests]  # fmt: skip
        head = ["A", "B", "paired n", "only A right", "only B right", "McNemar p"]
        lines += _table(head, tests) + [""]
    return lines


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(r) + " |" for r in body]
