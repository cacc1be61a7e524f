"""`ger report`: collect runs into one table with confidence intervals, paired tests and plots.

A run is any folder holding predictions.csv and metrics.json (a `ger run` folder, a Hydra
multirun job, or one of the GPT-4V release runs that `ger reproduce` writes), so pointing the
report at a sweep or at a reproduce output finds every run below it. Every number is
recomputed from predictions.csv with the dataset's scoring rule, so the intervals and the
paired tests describe exactly the samples behind each cell.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ger.data.datasets import TASK_TITLES, DatasetSpec
from ger.report.modes import ModeGroup, mode_groups, modes_markdown
from ger.report.runs import Run, assign_labels, find_runs
from ger.scoring.metrics import Outcome, correct_vector
from ger.scoring.stats import Interval, McNemar, bootstrap_ci, format_p, mcnemar
from ger.scoring.views import PaperRows, View, paper_rows, release_variant, view_outcome, views_of


@dataclass(frozen=True)
class Row:
    """One cell of the table in long format (report.csv / report.json "table")."""

    row: str  # the run's label, or PAPER_ROW / SUPERVISED_ROW
    source: str  # run | reference | paper | supervised
    dataset: str
    title: str
    task: str
    variant: str
    metric: str
    value: float
    ci_low: float | None
    ci_high: float | None
    n: int | None
    note: str  # the run folder, or the supervised method
    rows: str = (
        "all"  # all: every test sample | paper: the rows of the paper's release file (ger/scoring/views.py)
    )
    labels: str = "strict"  # strict: the paper's label equality | lenient: the dataset's equivalences


PAPER_ROW = "GPT-4V (paper)"
SUPERVISED_ROW = "Best supervised (paper)"


@dataclass
class Comparison:
    """Two runs on one test set: every metric of each with its interval, and McNemar's test."""

    test_set: str
    a: Run
    b: Run
    metrics: list[str]
    intervals_a: dict[str, Interval]
    intervals_b: dict[str, Interval]
    test: McNemar

    def to_dict(self) -> dict[str, Any]:
        sides = {
            name: dict(label=run.label, path=str(run.path), variant=run.variant,
                       metrics={m: _interval_dict(i) for m, i in iv.items()})
            for name, run, iv in (("a", self.a, self.intervals_a), ("b", self.b, self.intervals_b))
        }  # fmt: skip
        t = self.test
        test = dict(n=t.n, only_a_right=t.b, only_b_right=t.c, statistic=round(t.statistic, 4),
                    p_value=t.p_value, method=t.method)  # fmt: skip
        return {"dataset": self.test_set, **sides, "mcnemar": test}


@dataclass
class Report:
    runs: list[Run]
    n_boot: int
    seed: int
    comparisons: list[Comparison] = field(default_factory=list)
    ablations: list[Comparison] = field(default_factory=list)
    # The views other than (every sample, strict), per run folder; and why any view is absent.
    views: dict[Path, list[tuple[View, Outcome]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    modes: list[ModeGroup] = field(default_factory=list)  # runs that differ only in answer mode

    def table_rows(self) -> list[Row]:
        """One row per (run, view, test set, metric), then the paper's GPT-4V and best supervised numbers."""
        rows = []
        for run in self.runs:
            source = "reference" if run.is_reference else "run"
            for metric in run.spec.metrics:
                iv = _interval_dict(run.interval(metric, self.n_boot, self.seed))
                rows.append(Row(run.label, source, *_dataset_fields(run.spec), run.variant, metric, **iv,
                                note=str(run.path)))  # fmt: skip
            for view, out in self.views.get(run.path, []):
                label = f"{run.label} [{view.tag(run.spec)}]"
                for metric in run.spec.metrics:
                    iv = _interval_dict(bootstrap_ci(out.y_true, out.y_pred, metric, self.n_boot, self.seed))
                    rows.append(Row(label, source, *_dataset_fields(run.spec), run.variant, metric, **iv,
                                    note=str(run.path), rows=view.rows, labels=view.labels))  # fmt: skip
        for spec in _specs_of(self.runs):
            for source, label, numbers, note in (
                ("paper", PAPER_ROW, spec.paper.gpt4v, ""),
                ("supervised", SUPERVISED_ROW, spec.paper.supervised, spec.paper.supervised_method or ""),
            ):
                rows += [
                    Row(label, source, *_dataset_fields(spec), "", m, numbers[m], None, None,
                        spec.paper.test_samples, note)
                    for m in spec.metrics if numbers.get(m) is not None
                ]  # fmt: skip
        return rows


def _interval_dict(iv: Interval) -> dict[str, Any]:
    ci = iv.n_boot > 0
    return dict(value=round(iv.value, 2), ci_low=round(iv.low, 2) if ci else None,
                ci_high=round(iv.high, 2) if ci else None, n=iv.n)  # fmt: skip


def _dataset_fields(spec: DatasetSpec) -> tuple[str, str, str]:
    return spec.key, spec.title, spec.task


def _specs_of(runs: list[Run]) -> list[DatasetSpec]:
    seen: dict[str, DatasetSpec] = {}
    for run in runs:
        seen.setdefault(run.test_set, run.spec)
    order = list(TASK_TITLES)
    return sorted(
        seen.values(), key=lambda s: (order.index(s.task) if s.task in order else len(order), s.key)
    )


# --- comparisons ---------------------------------------------------------------------------------


def compare(a: Run, b: Run, n_boot: int, seed: int) -> Comparison:
    """Both runs' metrics with intervals, and McNemar's test on the samples both scored."""
    if a.test_set != b.test_set:
        raise ValueError(f"cannot pair runs on different test sets: {a.test_set} vs {b.test_set}")
    ca, na = correct_vector(a.predictions, a.spec)
    cb, nb = correct_vector(b.predictions, b.spec)
    metrics = list(a.spec.metrics)
    ia, ib = ({m: run.interval(m, n_boot, seed) for m in metrics} for run in (a, b))
    return Comparison(a.test_set, a, b, metrics, ia, ib, mcnemar(ca, na, cb, nb))


def _narrow(cands: list[tuple[Run, Run]]) -> list[tuple[Run, Run]]:
    """Among several candidate pairs: those of equal variant, else those on the paper's variant."""
    ref = cands[0][0].spec.reference if cands else None
    paper = {"", ref.paper_variant} if ref else {""}
    same = [(x, y) for x, y in cands if x.variant == y.variant]
    on_paper = [(x, y) for x, y in cands if {x.variant, y.variant} <= paper]
    return cands if len(cands) < 2 else (same or on_paper or cands)


def pair_runs(runs_a: list[Run], runs_b: list[Run]) -> list[tuple[Run, Run]]:
    """Runs of A and B on the same test set (a model run pairs with the release's rgb file, not grey)."""
    pairs = []
    for test_set in dict.fromkeys(r.test_set for r in runs_a):
        pairs += _narrow(
            [
                (x, y)
                for x in runs_a
                for y in runs_b
                if x.test_set == y.test_set == test_set and x.path != y.path
            ]
        )
    return pairs


def paper_ablations(runs: list[Run]) -> list[tuple[Run, Run]]:
    """The release's variant pairs (rafdb grey/rgb, text/video/multi, ravdess -2/-3), from the dataset specs.

    Each non-paper variant is paired with the paper's variant, then the non-paper variants with each other.
    """
    pairs = []
    refs = [r for r in runs if r.is_reference]
    for spec in _specs_of(refs):
        if spec.reference is None:
            continue
        by_variant = {r.variant: r for r in refs if r.test_set == spec.key}
        order = [v for v in spec.reference.files if v in by_variant]
        paper = spec.reference.paper_variant
        others = [v for v in order if v != paper]
        if paper in by_variant:
            pairs += [(by_variant[v], by_variant[paper]) for v in others]
        pairs += [(by_variant[x], by_variant[y]) for i, x in enumerate(others) for y in others[i + 1 :]]
    return pairs


# --- writing -------------------------------------------------------------------------------------


def _cell(row: Row | None) -> str:
    if row is None:
        return "–"
    if row.ci_low is None:
        return f"{row.value:.2f}" + (f" ({row.note})" if row.source == "supervised" and row.note else "")
    return f"{row.value:.2f} [{row.ci_low:.2f}, {row.ci_high:.2f}]"


def _md_table(head: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(r) + " |" for r in body]


def table_markdown(rows: list[Row]) -> list[str]:
    """One table per task (the paper's Tables 3-7): rows are runs, columns the test sets' metrics."""
    lines = []
    for task, title in TASK_TITLES.items():
        task_rows = [r for r in rows if r.task == task]
        if not task_rows:
            continue
        cols = list(dict.fromkeys((r.dataset, r.title, r.metric) for r in task_rows))
        labels = list(dict.fromkeys(r.row for r in task_rows if r.source in ("reference", "run")))
        labels += [x for x in (PAPER_ROW, SUPERVISED_ROW) if any(r.row == x for r in task_rows)]
        index = {(r.row, r.dataset, r.metric): r for r in task_rows}
        body = [[label, *(_cell(index.get((label, key, m))) for key, _, m in cols)] for label in labels]
        lines += [f"## {title}", "", *_md_table(["run", *(f"{t} {m.upper()}" for _, t, m in cols)], body), ""]
    return lines


def comparisons_markdown(comparisons: list[Comparison]) -> list[str]:
    """One line per metric; the paired test (on correctness, so the same for every metric) on the first."""
    head = ["test set", "metric", "A", "B", "B − A", "paired n", "only A right", "only B right", "McNemar p"]
    body = []
    for c in comparisons:
        t = c.test
        test = [str(t.n), str(t.b), str(t.c), f"{format_p(t.p_value)} ({t.method})"]
        for i, m in enumerate(c.metrics):
            ia, ib = c.intervals_a[m], c.intervals_b[m]
            sides = [f"{c.a.label}: {ia}", f"{c.b.label}: {ib}", f"{ib.value - ia.value:+.2f}"]
            body.append(
                [c.a.spec.title if i == 0 else "", m.upper(), *sides, *(test if i == 0 else [""] * 4)]
            )
    return _md_table(head, body)


VIEWS_INTRO = (
    "Rows without a tag score every sample in predictions.csv (a failed answer counts as wrong). "
    "Rows tagged [paper's rows] score only the samples in the GPT-4V release's prediction file for "
    "that test set, the rows the paper's numbers cover (GPT-4V's failures were left out of the release). "
    "Rows tagged with an equivalence (e.g. [surprise=surprised], MER2023) score those spellings as one "
    "class; untagged rows compare labels strictly, as the paper did."
)


def to_markdown(report: Report, rows: list[Row]) -> str:
    ci = "no intervals (--bootstrap 0)"
    if report.n_boot > 0:
        ci = f"95% percentile-bootstrap intervals ({report.n_boot} resamples, seed {report.seed})"
    intro = (
        f"Cells: metric in % over the samples in each predictions.csv, with {ci}. "
        "Paired tests: McNemar on per-sample correctness (exact binomial below 25 discordant pairs)."
    )
    lines = ["# Runs compared", "", intro, "", VIEWS_INTRO, "", *table_markdown(rows)]
    if report.notes:
        lines += ["## Notes on the score views", "", *(f"- {n}" for n in report.notes), ""]
    lines += modes_markdown(report.modes, report.n_boot, report.seed)
    if report.comparisons:
        lines += ["## Comparison", "", *comparisons_markdown(report.comparisons), ""]
    if report.ablations:
        lines += ["## Paper ablations (GPT-4V release)", "", *comparisons_markdown(report.ablations), ""]
    return "\n".join(lines)


def write_outputs(report: Report, out: Path) -> tuple[str, list[Path]]:
    """report.md (per-task tables), report.csv (the long table) and report.json (everything)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = report.table_rows()
    with (out / "report.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[x.name for x in fields(Row)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    runs = [
        dict(label=r.label, path=str(r.path), model=r.model, dataset=r.test_set, variant=r.variant,
             n=len(r.outcome.y_true), reference=r.is_reference)
        for r in report.runs
    ]  # fmt: skip
    data = {
        "bootstrap": {"n_boot": report.n_boot, "seed": report.seed, "level": 0.95},
        "runs": runs,
        "table": [asdict(r) for r in rows],
        "comparisons": [c.to_dict() for c in report.comparisons],
        "ablations": [c.to_dict() for c in report.ablations],
        "notes": report.notes,
        "modes": [g.to_dict(report.n_boot, report.seed) for g in report.modes],
    }
    (out / "report.json").write_text(json.dumps(data, indent=2))
    markdown = to_markdown(report, rows)
    (out / "report.md").write_text(markdown)
    return markdown, [out / "report.md", out / "report.csv", out / "report.json"]


def _run_paper_rows(run: Run, ref_dir: Path | None) -> PaperRows:
    """The paper's rows for a run: the release file of its input ablation (modality, greyscale)."""
    if run.is_reference:
        return PaperRows(None, note="this run's rows are the paper's rows (the release file itself)")
    setting = lambda key: yaml.safe_load(run.setting(key) or "null")  # noqa: E731
    variant = release_variant(run.spec, setting("modality"), bool(setting("greyscale")))
    return paper_rows(run.spec, variant, ref_dir)


def attach_views(report: Report, ref_dir: Path | None) -> None:
    """Every run's other score views (ger/scoring/views.py) and the notes on views that are absent."""
    notes: dict[str, None] = {}
    for run in report.runs:
        paper = _run_paper_rows(run, ref_dir)
        for view in views_of(run.spec)[1:]:
            out, why = view_outcome(run.predictions, run.spec, view, paper)
            if out is not None:
                report.views.setdefault(run.path, []).append((view, out))
            elif not run.is_reference:
                notes[f"{run.label} on {run.spec.title}: {why}"] = None
    report.notes = list(notes)


def build_report(
    paths: list[Path],
    n_boot: int,
    seed: int,
    pair: tuple[Path, Path] | None = None,
    reference_dir: Path | None = None,
) -> Report:
    """Find and label the runs, their score views, then the release's ablation pairs and the --compare pairs.

    The paper's rows come from `reference_dir`, else $GER_REFERENCE_DIR or the cached release download.
    """
    runs = find_runs(paths)
    by_path = {r.path.resolve(): r for r in runs}
    sides = [[by_path.setdefault(r.path.resolve(), r) for r in find_runs([p])] for p in pair or ()]
    assign_labels(list(by_path.values()))
    report = Report(runs, n_boot, seed)
    attach_views(report, reference_dir)
    report.ablations = _compare_all(paper_ablations(runs), n_boot, seed)
    report.modes = mode_groups(runs)
    if sides:
        report.comparisons = _compare_all(pair_runs(*sides), n_boot, seed)
        _warn_unpaired(pair or (), sides)
    return report


def _warn_unpaired(pair: tuple[Path, ...], sides: list[list[Run]]) -> None:
    """--compare A B where a test set of one side has no run in the other: say so, never stay silent."""
    sets = [{r.test_set for r in side} for side in sides]
    for i, (path, own) in enumerate(zip(pair, sets, strict=True)):
        if not sides[i]:
            print(f"warning: --compare: no usable run under {path}; nothing compared", file=sys.stderr)
            return
        alone = sorted(own - sets[1 - i])
        if alone:
            print(
                f"warning: --compare: {path} has runs on {', '.join(alone)} that {pair[1 - i]} lacks "
                f"(it has {', '.join(sorted(sets[1 - i])) or 'none'}); those are not compared",
                file=sys.stderr,
            )


def _compare_all(pairs: list[tuple[Run, Run]], n_boot: int, seed: int) -> list[Comparison]:
    """Each pair's comparison; a pair that cannot be paired (no shared samples) is reported and skipped."""
    done = []
    for a, b in pairs:
        try:
            done.append(compare(a, b, n_boot, seed))
        except ValueError as err:
            print(f"warning: {a.path} vs {b.path} not compared: {err}", file=sys.stderr)
    return done


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ger report", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("paths", nargs="*", type=Path, help="run folders, sweep folders or `ger reproduce` outputs")
    add("--out", type=Path, required=True, help="folder for report.{md,csv,json} (and plots/)")
    add("--compare", nargs=2, type=Path, metavar=("A", "B"), help="paired test of two runs (or run folders)")
    add("--bootstrap", type=int, default=2000, metavar="N", help="bootstrap resamples (0: no intervals)")
    add("--seed", type=int, default=0, help="bootstrap seed")
    add("--plots", action="store_true", help="also write PNG plots under OUT/plots/")
    add("--reference-dir", type=Path, help="the GPT-4V release's results/ folder, for the paper's-rows "
        "view (default: $GER_REFERENCE_DIR, else the copy `ger reproduce` downloaded)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.paths and not args.compare:
        parser.error("give at least one run or sweep folder, or --compare A B")
    paths = list(args.paths) or list(args.compare)
    try:
        pair = tuple(args.compare) if args.compare else None
        report = build_report(paths, args.bootstrap, args.seed, pair, args.reference_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"ger report: {err}", file=sys.stderr)
        return 2
    if not report.runs:
        print(f"ger report: no runs (predictions.csv + metrics.json) under {paths}", file=sys.stderr)
        return 2
    markdown, written = write_outputs(report, args.out)
    if args.plots:
        try:
            from ger.report.plots import write_plots

            written += write_plots(report, args.out / "plots")
        except ImportError as err:  # matplotlib is the optional `plots` extra
            print(f"ger report: --plots needs matplotlib (pip install 'ger[plots]'): {err}", file=sys.stderr)
            return 2
    print(markdown)
    print(f"wrote {len(written)} files under {args.out}", file=sys.stderr)
    return 0
