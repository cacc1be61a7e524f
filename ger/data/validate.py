"""Dataset checks: the label list before a run, and the media on disk for `ger prepare`."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from tqdm import tqdm

from ger.data.datasets import DatasetSpec, LabelListError
from ger.data.media import MediaError, load_sample
from ger.data.video import probe
from ger.records import Sample
from ger.scoring.rules import rule_for

SHOW = 10  # problems listed per kind


@dataclass
class DatasetReport:
    key: str
    samples: int
    bad_labels: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    bad_names: list[str] = field(default_factory=list)  # names that leave the dataset folder
    links: list[str] = field(default_factory=list)  # symlinks out of the data root (not followed)
    shared: list[str] = field(default_factory=list)  # different names that lead to one file
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    # (container/codec, how it is read) -> video files; see ger/data/video.py for the choice
    video_kinds: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def problems(self) -> int:
        return sum(len(items) for _, items in self._kinds())

    def _kinds(self) -> list[tuple[str, list[str]]]:
        return [
            ("labels outside the label set", self.bad_labels),
            ("names listed more than once", self.duplicates),
            ("names that lead to the same file", self.shared),
            ("names that point outside the dataset folder", self.bad_names),
            ("symlinks to files outside the dataset folder", self.links),
            ("missing files", self.missing),
            ("unreadable files", self.unreadable),
        ]

    def raise_for_labels(self) -> None:
        """A label list with unknown labels, repeated or escaping names is wrong as a whole: stop
        before any request, listing every such problem with its file and line."""
        if self.bad_labels or self.duplicates or self.bad_names or self.shared:
            raise LabelListError(self.summary())

    def summary(self) -> str:
        lines = [f"{self.key}: {self.samples} samples, {self.problems} problems"]
        for title, items in self._kinds():
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {x}" for x in items[:SHOW]]
                if len(items) > SHOW:
                    lines.append(f"    ... and {len(items) - SHOW} more")
        if self.video_kinds:
            lines.append("  videos by container/codec, and how their frames are read:")
            lines += [f"    {kind}: {n} files, {how}" for (kind, how), n in sorted(self.video_kinds.items())]
        return "\n".join(lines)


def _where(label_file: str, s: Sample) -> str:
    return f"{label_file}:{s.line}" if s.line else label_file


def check_labels(spec: DatasetSpec, samples: list[Sample], label_file: str = "") -> DatasetReport:
    """Labels, repeated names and path problems of a label list, each with file and line."""
    where = label_file or spec.layout.label_file
    report = DatasetReport(spec.key, len(samples))
    rule = rule_for(spec)  # the same reading of gt as scoring (ger/scoring/rules.py)
    truth = rule.truth_reader(spec)
    report.bad_labels = [
        f"{_where(where, s)}: {s.name}: {s.gt!r} is not {rule.expected(spec)}"
        for s in samples
        if truth(s.gt) is None
    ]
    lines: dict[str, list[int]] = defaultdict(list)
    for s in samples:
        lines[s.name].append(s.line)
    report.duplicates = [
        f"{where}: {name} (lines {', '.join(map(str, at))})" for name, at in lines.items() if len(at) > 1
    ]
    report.shared = _shared_files(where, samples)
    report.bad_names = [f"{_where(where, s)}: {s.problem}" for s in samples if s.problem and s.media is None]
    report.links = [f"{_where(where, s)}: {s.problem}" for s in samples if s.problem and s.media is not None]
    return report


def _shared_files(where: str, samples: list[Sample]) -> list[str]:
    """Different names whose media or transcript is one file: a transcript is found by the name's stem
    alone (`a/clip1.mp4` and `b/clip1.mp4` read one `clip1` file), and `x` with the layout's extension
    is `x.jpg`; each sample would be scored on the other's input."""
    names: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        for path in {s.media, s.transcript} - {None}:
            names[str(path)].add(s.name)
    return [f"{where}: {', '.join(sorted(n))} all read {path}" for path, n in names.items() if len(n) > 1]


def check_dataset(
    spec: DatasetSpec,
    samples: list[Sample],
    *,
    media: bool,
    progress: bool = False,
    transcripts: bool = False,
    label_file: str = "",
) -> DatasetReport:
    """Label and name checks always; with `media`, open every file as a run would."""
    report = check_labels(spec, samples, label_file)
    if not media:
        return report
    for s in tqdm(samples, desc=f"checking {spec.key}", unit="sample", disable=not progress):
        if s.problem:
            continue  # already listed (bad name or link)
        paths = [p for p in (s.media, s.transcript if transcripts else None) if p is not None]
        absent = [str(p) for p in paths if not p.exists()]
        if absent:
            report.missing += absent
            continue
        try:
            load_sample(s, spec.layout.media_kind, with_text=transcripts)
            if spec.layout.media_kind == "video" and s.media is not None and s.media.is_file():
                info = probe(s.media)  # cached: load_sample has just probed it
                report.video_kinds[
                    (info.kind, info.reader + (f" ({info.why})" if info.why else " (seek)"))
                ] += 1
        except (MediaError, OSError) as exc:
            report.unreadable.append(f"{s.name}: {exc}")
    return report
