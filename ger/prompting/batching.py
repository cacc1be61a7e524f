"""Batch mode as the paper ran it: one fixed shuffle per dataset, batches cut from it, sizes reported.

Release label lists are sorted by class, so batches cut in file order hold one class
each; the release shuffled once with a stored order. Here the order is the samples
sorted by sha256(seed, name): the same seed gives the same order on every machine and
Python version (so reruns build identical batches and hit the response cache), it does
not depend on the label file's row order, and adding a sample does not reorder the others.
The order is written to the run folder as order.csv; `batch_order=<that file>` replays it.

The batch size is the paper's (20 images, 8 videos, 6 video+text; the text-only and
video-only ablations of the multimodal sets 20 and 8) unless the model's media limit
(`max_images` / `max_videos` in conf/model/*.yaml, vLLM's limit_mm_per_prompt) cannot
take that many samples in one prompt; then it is capped, and the report says so.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ger.backends.models import ModelSpec
from ger.files import atomic_write_text
from ger.records import LoadedSample, Request


def shuffled(names: list[str], seed: int) -> list[str]:
    """`names` in the fixed pseudo-random order of `seed` (see the module docstring)."""
    return sorted(names, key=lambda n: (hashlib.sha256(f"{int(seed)}\0{n}".encode()).hexdigest(), n))


def batch_order(names: list[str], seed: int, order_file: str | None) -> list[str]:
    """The order batches are cut in: a stored order.csv replayed, else the seed's shuffle."""
    return read_order(order_file, names) if order_file else shuffled(names, seed)


def read_order(path: str | Path, names: list[str]) -> list[str]:
    """`names` in the order of a stored order.csv (column `name`); every sample must be listed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"batch_order: no file {path}; give the order.csv of an earlier run, or null")
    with path.open(newline="") as f:
        stored = [row["name"] for row in csv.DictReader(f) if row.get("name")]
    position = {n: i for i, n in reversed(list(enumerate(stored)))}
    absent = [n for n in names if n not in position]
    if absent:
        raise ValueError(
            f"batch_order: {path} does not list {len(absent)} sample(s) of this run, e.g. {absent[:3]}; "
            "use the order.csv of a run over the same dataset, or batch_order=null"
        )
    return sorted(names, key=position.__getitem__)


@dataclass
class BatchPlan:
    """How samples are grouped: the paper's size, the size used, and what capped it."""

    paper_size: int  # the paper's batch size for this dataset and modality
    size: int  # the size batches are cut at
    seed: int | None  # the shuffle seed (None when a stored order was replayed)
    order_file: str | None = None
    cap: str = ""  # why `size` < `paper_size`, empty when it is not

    def cut(self, names: list[str]) -> list[tuple[str, ...]]:
        return [tuple(names[i : i + self.size]) for i in range(0, len(names), self.size)]


def media_cap(model: ModelSpec, loaded: list[LoadedSample], frames_as: str) -> tuple[int | None, str]:
    """Most samples the model's media limits allow in one prompt (None: no limit), and why."""
    cap, why = visual_cap(model, loaded, frames_as)
    if any(ls.audio_rate for ls in loaded) and (cap is None or model.max_audios < cap):  # one track a sample
        return model.max_audios, f"model {model.name} takes max_audios={model.max_audios} per prompt"
    return cap, why


def visual_cap(model: ModelSpec, loaded: list[LoadedSample], frames_as: str) -> tuple[int | None, str]:
    """Most samples the model's image and video limits allow in one prompt (None: no limit), and why."""
    per_sample = max((ls.image_count for ls in loaded), default=0)
    if per_sample == 0:
        return None, ""  # text only
    moving = any(ls.is_clip and ls.image_count > 1 for ls in loaded)
    if moving and frames_as == "video" and model.supports_video:
        return model.max_videos, f"model {model.name} takes max_videos={model.max_videos} per prompt"
    images = 1 if moving and frames_as == "grid" else per_sample
    what = "image" if images == 1 else f"{images} images"
    why = f"model {model.name} takes max_images={model.max_images}, {what} per sample"
    return model.max_images // images, why


def plan_batches(
    paper_size: int,
    requested: int | None,
    model: ModelSpec,
    loaded: list[LoadedSample],
    frames_as: str,
    order: tuple[int, str | None] = (0, None),
) -> BatchPlan:
    """The batch size: `requested` (or the paper's), capped by the model's media limit.

    `order` is (batch_seed, batch_order file or None), recorded in the plan for the report.
    """
    size = int(requested or paper_size)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    cap, why = media_cap(model, loaded, frames_as)
    if cap is not None and cap < 1:
        raise ValueError(f"{why}: not even one sample fits a prompt; use mode=single or another frames_as")
    seed, order_file = order
    plan = BatchPlan(paper_size, size, None if order_file else seed, order_file)
    if cap is not None and cap < size:
        plan.size, plan.cap = cap, f"{why}, so at most {cap} samples per batch"
    return plan


def write_order(path: Path, order: list[str], batches: list[tuple[str, ...]]) -> None:
    """order.csv: position in the shuffle, batch (as first cut, before any split) and name of every
    sample of the label list. A sample in no batch (left out by `limit` or `shard`, or its file
    missing or empty) keeps its place with an empty batch, so the file replays this run's order
    (`batch_order`) whatever was missing from it."""
    batch_of = {name: b for b, names in enumerate(batches) for name in names}
    lines = ["position,batch,name"]
    for position, name in enumerate(order):
        lines.append(f"{position},{batch_of.get(name, '')},{_csv_field(name)}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


@dataclass
class BatchSummary:
    """What batch mode did, for metrics.json and report.md."""

    paper_size: int
    planned_size: int
    seed: int | None
    order_file: str | None
    cap: str
    batches: int  # batches as first cut
    requests: dict[int, int] = field(default_factory=dict)  # final requests by size: {size: count}
    mean_size: float = 0.0  # samples per final request
    splits: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # split reasons and record defects (ger/run/ask.py)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["requests"] = {str(k): v for k, v in sorted(self.requests.items(), reverse=True)}
        data.update(data.pop("counts"))
        return data


def summarise(
    plan: BatchPlan, batches: int, answered: list[Request], splits: int, counts: dict[str, int]
) -> BatchSummary:
    """Effective sizes from the requests that finally answered each sample."""
    sizes = Counter(len(r.names) for r in {r.key: r for r in answered}.values())
    samples = sum(k * v for k, v in sizes.items())
    note = ""
    if plan.cap:
        note = f"batches below the paper's {plan.paper_size}: {plan.cap}"
    elif plan.size != plan.paper_size:
        note = f"batch_size={plan.size} set by the run, the paper used {plan.paper_size}"
    return BatchSummary(
        paper_size=plan.paper_size,
        planned_size=plan.size,
        seed=plan.seed,
        order_file=plan.order_file,
        cap=plan.cap,
        batches=batches,
        requests=dict(sizes),
        mean_size=round(samples / max(1, sum(sizes.values())), 2),
        splits=splits,
        counts=dict(counts),
        note=note,
    )
