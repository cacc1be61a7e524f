"""Dataset checks: the label list before a run, and the media on disk for `ger prepare`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from ger.datasets import DatasetSpec
from ger.media import MediaError, load_sample
from ger.parse import LabelMatcher, normalise
from ger.records import Sample
from ger.video import probe

SHOW = 10  # problems listed per kind


@dataclass
class DatasetReport:
    key: str
    samples: int
    bad_labels: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    # (container/codec, how it is read) -> video files; see ger/video.py for the choice
    video_kinds: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def problems(self) -> int:
        return len(self.bad_labels) + len(self.duplicates) + len(self.missing) + len(self.unreadable)

    def raise_for_labels(self) -> None:
        """A label list with unknown labels or repeated names is wrong as a whole: stop before any request."""
        if self.bad_labels or self.duplicates:
            raise ValueError(self.summary())

    def summary(self) -> str:
        lines = [f"{self.key}: {self.samples} samples, {self.problems} problems"]
        for title, items in (
            ("labels outside the label set", self.bad_labels),
            ("names listed more than once", self.duplicates),
            ("missing files", self.missing),
            ("unreadable files", self.unreadable),
        ):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {x}" for x in items[:SHOW]]
                if len(items) > SHOW:
                    lines.append(f"    ... and {len(items) - SHOW} more")
        if self.video_kinds:
            lines.append("  videos by container/codec, and how their frames are read:")
            lines += [f"    {kind}: {n} files, {how}" for (kind, how), n in sorted(self.video_kinds.items())]
        return "\n".join(lines)


def _label_ok(spec: DatasetSpec, gt: str, matcher: LabelMatcher) -> bool:
    if spec.scoring == "continuous":
        try:
            float(gt)
            return True
        except ValueError:
            return False
    if spec.scoring == "polarity":
        return normalise(gt) in ("positive", "negative") or matcher.match(gt) is not None
    return matcher.match(gt) is not None


def check_dataset(
    spec: DatasetSpec,
    samples: list[Sample],
    *,
    media: bool,
    progress: bool = False,
    transcripts: bool = False,
) -> DatasetReport:
    """Label and name checks always; with `media`, open every file as a run would."""
    report = DatasetReport(spec.key, len(samples))
    matcher = LabelMatcher(spec.gt_labels)
    report.bad_labels = [f"{s.name}: {s.gt!r}" for s in samples if not _label_ok(spec, s.gt, matcher)]
    report.duplicates = [n for n, c in Counter(s.name for s in samples).items() if c > 1]
    if not media:
        return report
    for s in tqdm(samples, desc=f"checking {spec.key}", unit="sample", disable=not progress):
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
