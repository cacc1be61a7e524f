"""The dataset registry: one YAML per test set in conf/dataset, and the label list -> Samples step."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ger.config import group_names, load_group_yaml
from ger.matching import LabelMatcher
from ger.records import Sample

TASKS = ("facial", "sentiment", "micro", "dynamic", "multimodal")
MODALITIES = ("image", "video", "video+text")
SCORINGS = ("plain", "polarity", "continuous")
METRICS = ("acc", "war", "uar", "wf1")
MEDIA_KINDS = ("image", "video", "frames")
TASK_TITLES = {
    "facial": "Facial emotion recognition (Table 3)",
    "sentiment": "Visual sentiment analysis (Table 4)",
    "micro": "Micro-expression recognition (Table 5)",
    "dynamic": "Dynamic facial emotion recognition (Table 6)",
    "multimodal": "Multimodal emotion recognition (Table 7)",
}


@dataclass(frozen=True)
class Layout:
    """How a test set sits on disk under <data_root>/<key>/ (or `root`)."""

    label_file: str = "label.csv"
    media_dir: str = "media"
    media_kind: str = "image"
    extension: str = ""
    transcript_dir: str | None = None
    transcript_ext: str = ".npy"
    root: str | None = None


@dataclass(frozen=True)
class Reference:
    """Where the released GPT-4V predictions for this test set are, per variant."""

    folder: str
    files: dict[str, str]
    paper_variant: str = ""


@dataclass(frozen=True)
class Paper:
    table: int | None = None
    test_samples: int | None = None
    gpt4v: dict[str, float] = field(default_factory=dict)
    supervised: dict[str, float] = field(default_factory=dict)
    supervised_method: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    key: str
    title: str
    task: str
    modality: str
    labels: list[str]
    scoring: str
    metrics: list[str]
    prompt: str
    batch_size: int
    layout: Layout
    polarity: dict[str, str] | None = None
    reference: Reference | None = None
    paper: Paper = field(default_factory=Paper)
    demo: bool = False
    # Ground-truth spellings that are valid classes but not offered to the model (MER2023's
    # label list says `surprise` where the prompt says `surprised`; the paper scored them apart).
    gt_only_labels: list[str] = field(default_factory=list)
    # Other words a careful reader takes for a label (`joy` for happy); read by the fair answer reader.
    aliases: dict[str, list[str]] = field(default_factory=dict)

    @property
    def gt_labels(self) -> list[str]:
        """Every valid ground-truth class for plain scoring."""
        return self.labels + [x for x in self.gt_only_labels if x not in self.labels]

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    def root(self, data_root: str | Path) -> Path:
        return Path(self.layout.root).expanduser() if self.layout.root else Path(data_root) / self.key


def _check(value: Any, allowed: tuple[str, ...], what: str, key: str) -> None:
    if value not in allowed:
        raise ValueError(f"dataset {key}: unknown {what} {value!r}; expected one of {list(allowed)}")


def spec_from_dict(data: dict[str, Any]) -> DatasetSpec:
    """Build and validate a DatasetSpec, so a broken YAML fails at load time with its name."""
    key = data["key"]
    _check(data["task"], TASKS, "task", key)
    _check(data["modality"], MODALITIES, "modality", key)
    _check(data["scoring"], SCORINGS, "scoring", key)
    for metric in data["metrics"]:
        _check(metric, METRICS, "metric", key)
    layout = Layout(**(data.get("layout") or {}))
    _check(layout.media_kind, MEDIA_KINDS, "layout.media_kind", key)
    polarity = data.get("polarity")
    if data["scoring"] == "polarity" and not polarity:
        raise ValueError(f"dataset {key}: scoring 'polarity' needs a `polarity` map")
    ref = data.get("reference")
    paper = data.get("paper") or {}
    return DatasetSpec(
        key=key,
        title=data.get("title", key),
        task=data["task"],
        modality=data["modality"],
        labels=list(data["labels"]),
        scoring=data["scoring"],
        metrics=list(data["metrics"]),
        prompt=data["prompt"],
        batch_size=int(data["batch_size"]),
        layout=layout,
        polarity=dict(polarity) if polarity else None,
        reference=Reference(**ref) if ref else None,
        paper=Paper(
            **{**paper, "gpt4v": paper.get("gpt4v") or {}, "supervised": paper.get("supervised") or {}}
        ),
        demo=bool(data.get("demo", False)),
        gt_only_labels=list(data.get("gt_only_labels") or []),
        aliases=_aliases(data, key),
    )


def _aliases(data: dict[str, Any], key: str) -> dict[str, list[str]]:
    aliases = data.get("aliases") or {}
    unknown = [label for label in aliases if label not in data["labels"]]
    if unknown:
        raise ValueError(
            f"conf/dataset/{key}.yaml: aliases for {unknown}, which are not in labels {data['labels']}"
        )
    table = {str(label): [str(form) for form in forms or []] for label, forms in aliases.items()}
    try:
        LabelMatcher(list(data["labels"]), table)  # one alias naming two labels fails here, not mid-run
    except ValueError as exc:
        raise ValueError(f"conf/dataset/{key}.yaml: {exc}") from None
    return table


def load_spec(key: str) -> DatasetSpec:
    """The test set `key` from conf/dataset/<key>.yaml."""
    return spec_from_dict(load_group_yaml("dataset", key))


def all_specs(include_demo: bool = False) -> list[DatasetSpec]:
    specs = [load_spec(name) for name in group_names("dataset")]
    return [s for s in specs if include_demo or not s.demo]


def read_label_list(path: Path) -> list[tuple[str, str]]:
    """(name, gt) rows of a label list; extra columns (the release's empty `gpt4v`) are ignored."""
    if not path.is_file():
        raise FileNotFoundError(f"label list not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"name", "gt"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a header with columns name,gt; got {reader.fieldnames}")
        return [(row["name"].strip(), (row["gt"] or "").strip()) for row in reader]


def media_path(spec: DatasetSpec, root: Path, name: str) -> Path:
    """The media file or frames folder for sample `name`, kept inside the dataset root."""
    rel = name if (spec.layout.media_kind == "frames" or Path(name).suffix) else name + spec.layout.extension
    media_root = (root / spec.layout.media_dir).resolve()
    path = (media_root / rel).resolve()
    if not path.is_relative_to(media_root):
        raise ValueError(f"sample {name!r} points outside the media folder {media_root}")
    return path


def transcript_path(spec: DatasetSpec, root: Path, name: str) -> Path | None:
    if not spec.layout.transcript_dir:
        return None
    folder = (root / spec.layout.transcript_dir).resolve()
    path = (folder / (Path(name).stem + spec.layout.transcript_ext)).resolve()
    if not path.is_relative_to(folder):
        raise ValueError(f"sample {name!r} points outside the transcript folder {folder}")
    return path


def load_samples(spec: DatasetSpec, data_root: str | Path) -> list[Sample]:
    """The test set's samples, in label-list order. Path problems raise; unreadable media are the loader's."""
    root = spec.root(data_root)
    rows = read_label_list(root / spec.layout.label_file)
    return [
        Sample(spec.key, name, gt, media_path(spec, root, name), transcript_path(spec, root, name))
        for name, gt in rows
    ]
