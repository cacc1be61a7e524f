"""PNG plots for `ger report --plots`: metric vs frame count, runs vs the paper per task, confusion matrices.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so plotting never needs a
display and never touches global figure state; matplotlib is imported only here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ger.data.datasets import TASK_TITLES
from ger.scoring.stats import Interval

if TYPE_CHECKING:
    from ger.report.report import Report, Row

DPI = 120


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def slug(text: str) -> str:
    """A file-name-safe version of a run label."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "run"


def frames_plot(title: str, metric: str, series: dict[str, list[tuple[int, Interval]]], path: Path) -> Path:
    """One line per run setting: the metric against the number of frames, with 95% intervals."""
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    ticks: set[int] = set()
    for label, points in series.items():
        points = sorted(points, key=lambda p: p[0])
        x = np.array([f for f, _ in points])
        y = np.array([iv.value for _, iv in points])
        err = np.array([[iv.value - iv.low for _, iv in points], [iv.high - iv.value for _, iv in points]])
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        ticks.update(x.tolist())
    ax.set_xticks(sorted(ticks))
    ax.set_xlabel("frames per clip")
    ax.set_ylabel(f"{metric.upper()} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def bars_plot(
    title: str, groups: Sequence[str], bars: dict[str, list[tuple[float, float, float] | None]], path: Path
) -> Path:
    """Grouped bars: one group per test set, one bar per row (value, low, high; None = not run)."""
    fig = _figure(max(6.0, 1.1 * len(groups) * max(1, len(bars)) * 0.35 + 2), 4.6)
    ax = fig.add_subplot()
    # bars present in a group are centred on it, so rows that skip a test set leave no gaps
    present = [[label for label, cells in bars.items() if cells[j] is not None] for j in range(len(groups))]
    width = 0.8 / max(1, max(map(len, present), default=1))
    x = np.arange(len(groups))
    for label, cells in bars.items():
        at = [j for j, c in enumerate(cells) if c is not None]
        if not at:
            continue
        pos = [x[j] + (present[j].index(label) - (len(present[j]) - 1) / 2) * width for j in at]
        vals = [cells[j] for j in at]
        err = np.array([[v - lo for v, lo, _ in vals], [hi - v for v, _, hi in vals]])
        ax.bar(
            pos,
            [v for v, _, _ in vals],
            width,
            yerr=err.tolist() if err.any() else None,
            capsize=2,
            label=label,
        )
    ax.set_xticks(x, list(groups), rotation=20, ha="right")
    ax.set_ylabel("main metric (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="x-small", ncols=2)
    return _save(fig, path)


def confusion_plot(title: str, labels: Sequence[str], matrix: Sequence[Sequence[int]], path: Path) -> Path:
    """Counts, coloured by row share (recall); rows are true classes, columns may add `(invalid)`."""
    counts = np.asarray(matrix, dtype=float)
    if counts.ndim != 2 or counts.shape[1] != len(labels):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not match {len(labels)} labels")
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.55 * len(labels)
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=7,
                color="white" if share[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xticks(range(len(labels)), list(labels), rotation=45, ha="right")
    ax.set_yticks(range(counts.shape[0]), list(labels[: counts.shape[0]]))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize="medium")
    fig.colorbar(image, ax=ax, label="share of the true class")
    return _save(fig, path)


def _frame_count(run: Any) -> int | None:
    value = run.setting("frames")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def write_frame_plots(report: Report, out: Path) -> list[Path]:
    """Per video test set swept over `frames`: one line per otherwise-equal setting."""
    from ger.report.runs import differing_keys, label_of

    own = [r for r in report.runs if not r.is_reference and "video" in r.spec.modality]
    keys = differing_keys(own, exclude={"frames"})
    written = []
    for test_set in dict.fromkeys(r.test_set for r in own):
        runs = [(r, f) for r in own if r.test_set == test_set and (f := _frame_count(r)) is not None]
        if len({f for _, f in runs}) < 2:
            continue
        spec, metric = runs[0][0].spec, runs[0][0].spec.main_metric
        series: dict[str, list[tuple[int, Interval]]] = {}
        for run, frames in runs:
            series.setdefault(label_of(run, keys), []).append(
                (frames, run.interval(metric, report.n_boot, report.seed))
            )
        written.append(frames_plot(f"{spec.title}: {metric.upper()} vs frames", metric, series,
                                   out / f"frames_{test_set}.png"))  # fmt: skip
    return written


def _bar(row: Row | None) -> tuple[float, float, float] | None:
    if row is None:
        return None
    low = row.value if row.ci_low is None else row.ci_low
    return row.value, low, row.value if row.ci_high is None else row.ci_high


def write_task_bars(rows: list[Row], out: Path) -> list[Path]:
    """Per task: runs vs GPT-4V (paper) vs best supervised on each test set's main metric."""
    from ger.data.datasets import load_spec

    written = []
    for task, title in TASK_TITLES.items():
        main = [r for r in rows if r.task == task and r.metric == load_spec(r.dataset).main_metric]
        if not main:
            continue
        groups = list(dict.fromkeys(r.dataset for r in main))
        titles = [next(r.title for r in main if r.dataset == g) for g in groups]
        index = {(r.row, r.dataset): r for r in main}
        labels = dict.fromkeys(r.row for r in main)
        bars = {label: [_bar(index.get((label, g))) for g in groups] for label in labels}
        written.append(bars_plot(title, titles, bars, out / f"bars_{task}.png"))
    return written


def write_confusions(report: Report, out: Path) -> list[Path]:
    """One confusion matrix per run and test set, from metrics.json (what the run itself scored)."""
    written, used = [], set()
    for run in report.runs:
        conf = run.metrics.get("confusion") or {}
        if not conf.get("labels") or not conf.get("matrix"):
            continue
        name = f"{run.test_set}_{slug(run.label)}"
        while name in used:
            name += "_"
        used.add(name)
        title = f"{run.label}\n{run.spec.title}"
        written.append(
            confusion_plot(title, conf["labels"], conf["matrix"], out / "confusion" / f"{name}.png")
        )
    return written


def write_plots(report: Report, out: Path) -> list[Path]:
    """Every plot the report supports, under `out` (the report's plots/ folder)."""
    return (
        write_frame_plots(report, out)
        + write_task_bars(report.table_rows(), out)
        + write_confusions(report, out)
    )
