"""Score views: which rows are scored, and how strictly labels are compared.

A comparison with the paper has to say which of two legitimate answers it gives to each question:

- rows. `all` scores every test sample, a failed or unreadable answer counting as wrong: what a
  model run measures. `paper` scores exactly the rows of the release's prediction file for the
  test set, the only rows behind the paper's numbers (GPT-4V's refusals and failures were left
  out: SAMM 135 of 159, FERV39k 7,538 of 7,847, ...).
- labels. `strict` compares label strings as the paper did. `lenient` also scores a dataset's
  `lenient_equivalents` as one class (MER2023's label list says `surprise` where its label set
  says `surprised`, so 18 of 411 samples can never be right strictly).

The view (all, strict) is a run's headline score; the others sit beside it in metrics.json
("views", and "scores" records with `rows` / `labels`), report.md and `ger report`. A view that
cannot be computed (no release on this machine, no shared names) is absent with a note in
metrics.json "notes", never a copy of another view.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ger.data.datasets import DatasetSpec
from ger.records import Prediction
from ger.report.reference import ReleaseNotFound, find_release, release_names
from ger.scoring.metrics import Outcome, Score, outcome, score_outcome

ALL, PAPER = "all", "paper"
STRICT, LENIENT = "strict", "lenient"


@dataclass(frozen=True)
class View:
    rows: str = ALL
    labels: str = STRICT

    def tag(self, spec: DatasetSpec) -> str:
        """A short row label: "" for the main view, else e.g. "paper's rows; surprise=surprised"."""
        parts = ["paper's rows"] if self.rows == PAPER else []
        if self.labels == LENIENT:
            parts.append(", ".join(f"{a}={b}" for a, b in spec.lenient_equivalents.items()))
        return "; ".join(parts)

    def describe(self, spec: DatasetSpec) -> tuple[str, str]:
        """(rows, labels) in words, for report.md."""
        rows = "every test sample (failures wrong)" if self.rows == ALL else "the paper's rows"
        if self.labels == STRICT:
            return rows, "strict (the paper's)"
        return rows, "lenient: " + ", ".join(f"{a} = {b}" for a, b in spec.lenient_equivalents.items())


def views_of(spec: DatasetSpec) -> list[View]:
    """Every view of a test set, the main one first; lenient ones only where the YAML lists equivalents."""
    labels = [STRICT] + ([LENIENT] if spec.lenient_equivalents else [])
    return [View(rows, lab) for lab in labels for rows in (ALL, PAPER)]


@dataclass(frozen=True)
class PaperRows:
    """The sample names of the release file the paper's table used, or why they are unavailable."""

    names: frozenset[str] | None
    source: str = ""  # the release file, e.g. .../samm/label-gpt4v.csv
    note: str = ""  # why `names` is None

    @property
    def available(self) -> bool:
        return self.names is not None


def release_variant(spec: DatasetSpec, modality: str | None = None, greyscale: bool = False) -> str:
    """The release file a run compares with: its input ablation where released, else the paper's table's."""
    if spec.reference is None:
        return ""
    files = spec.reference.files
    if modality and modality in files:  # mer2023/sims/cmumosi: text | video | multi
        return modality
    if greyscale and "grey" in files:  # rafdb's colour ablation
        return "grey"
    return spec.reference.paper_variant


def paper_rows(spec: DatasetSpec, variant: str | None = None, ref_dir: Path | None = None) -> PaperRows:
    """The names in the release's prediction file for `spec` (its paper variant unless `variant`)."""
    if spec.reference is None:
        return PaperRows(None, note=f"{spec.key} has no GPT-4V release file, so there are no paper's rows")
    if ref_dir is None:
        try:
            ref_dir = find_release()
        except ReleaseNotFound as missing:
            return PaperRows(None, note=str(missing))
    files = spec.reference.files
    variant = variant if variant in files else spec.reference.paper_variant
    path = Path(ref_dir) / spec.reference.folder / files[variant]
    if not path.is_file():
        return PaperRows(
            None, str(path), f"the release file {path} is missing; is {ref_dir} the results/ folder?"
        )
    return PaperRows(frozenset(release_names(path)), str(path))


def select_rows(preds: list[Prediction], names: frozenset[str]) -> list[Prediction]:
    """The predictions whose sample is among `names`, by exact name or by name without its extension."""
    stems = {Path(n).stem for n in names}
    return [p for p in preds if p.name in names or Path(p.name).stem in stems]


def fold(out: Outcome, equivalents: dict[str, str]) -> Outcome:
    """The outcome with each spelling in `equivalents` replaced by its class (the lenient view)."""
    same = lambda y: [equivalents.get(v, v) for v in y]  # noqa: E731
    classes = list(dict.fromkeys(same(out.classes)))
    ranked = [same(r) for r in out.ranked]
    probs = [None if p is None else _fold_probs(p, equivalents, classes) for p in out.probs]
    return Outcome(
        out.names, same(out.y_true), same(out.y_pred), classes, out.failures, out.dropped, ranked, probs
    )


def _fold_probs(probs: dict[str, float], equivalents: dict[str, str], classes: list[str]) -> dict[str, float]:
    """Class probabilities with each spelling's probability added to its class's."""
    folded = dict.fromkeys(classes, 0.0)
    for c, p in probs.items():
        folded[equivalents.get(c, c)] += p
    return folded


def view_outcome(
    preds: list[Prediction], spec: DatasetSpec, view: View, paper: PaperRows | None
) -> tuple[Outcome | None, str]:
    """The outcome a view scores, or (None, why it is absent)."""
    if view.rows == PAPER:
        if paper is None or not paper.available:
            return None, "the paper's-rows view is absent: " + (paper.note if paper else "not asked for")
        preds = select_rows(preds, paper.names or frozenset())
        if not preds:
            return None, (
                f"the paper's-rows view is absent: none of this run's samples is among the "
                f"{len(paper.names or ())} rows of {paper.source} (are the sample names the release's?)"
            )
    out = outcome(preds, spec)
    return (fold(out, spec.lenient_equivalents) if view.labels == LENIENT else out), ""


def rows_note(preds: list[Prediction], paper: PaperRows) -> str:
    """Where the paper's rows came from, and how they overlap this run."""
    names = paper.names or frozenset()
    found = len(select_rows(preds, names))
    note = f"paper's rows: the {len(names)} rows of {paper.source}; {found} of the run's {len(preds)} samples"
    if found < len(names):
        note += f" ({len(names) - found} of the paper's rows are not in this run)"
    return note


def score_views(
    preds: list[Prediction], spec: DatasetSpec, paper: PaperRows | None, variant: str = ""
) -> Score:
    """The main view (every sample, strict) as a Score, with the other views and notes attached."""
    main: Score | None = None
    notes: list[str] = []
    if paper is not None and paper.available:
        notes.append(rows_note(preds, paper))
    for view in views_of(spec):
        out, why = view_outcome(preds, spec, view, paper)
        if out is None:
            notes.append(why)
            continue
        s = score_outcome(out, spec, variant)
        s.rows, s.labels = view.rows, view.labels
        if main is None:
            main = s
        else:
            main.views.append(s)
    assert main is not None  # the main view always exists
    main.notes = list(dict.fromkeys(notes))
    return main


def score_run(
    preds: list[Prediction], spec: DatasetSpec, modality: str | None = None, greyscale: bool = False
) -> Score:
    """A model run's scores in every view; the paper's rows from the release file it compares with."""
    if not preds:
        raise ValueError(f"{spec.key}: nothing to score")
    return score_views(preds, spec, paper_rows(spec, release_variant(spec, modality, greyscale)))
