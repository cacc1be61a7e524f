"""What a run leaves in its folder: config, predictions, metrics and a short report."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ger.data.datasets import DatasetSpec
from ger.files import atomic_write_text
from ger.records import Prediction
from ger.run.predictions import write_predictions
from ger.scoring.answer_metrics import markdown_lines
from ger.scoring.metrics import Score


def resolved_config(cfg: DictConfig) -> str:
    """The config as run, resolved, minus anything named like a secret (keys come from the environment)."""
    data = OmegaConf.to_container(cfg, resolve=True)

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: (
                    "<redacted>"
                    if any(s in str(k).lower() for s in ("api_key", "secret", "token"))
                    and not str(k).endswith("_env")
                    and not isinstance(v, (int, float, dict))
                    else scrub(v)
                )
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    return OmegaConf.to_yaml(OmegaConf.create(scrub(data)))


def batching_lines(batching: dict[str, Any] | None) -> list[str]:
    """report.md lines on batch mode: effective sizes, splits, a note when sizes fell below the paper's."""
    if not batching:
        return []
    sizes = ", ".join(f"{n} x {size}" for size, n in batching["requests"].items()) or "none"
    order = f"seed {batching['seed']}" if batching["order_file"] is None else batching["order_file"]
    lines = [
        f"- batch mode: paper batch size {batching['paper_size']}, cut at {batching['planned_size']} "
        f"({batching['batches']} batches, order: {order}); answered by requests of "
        f"{sizes} samples (mean {batching['mean_size']:.2f}), {batching['splits']} splits "
        f"({batching['split_cut']} cut at max_tokens, {batching['split_missing']} with samples unanswered, "
        f"{batching['split_failed']} failed); {batching['duplicate_records']} repeated records, "
        f"{batching['records_by_position']} matched by position",
    ]
    if batching["note"]:
        lines.append(f"- **note:** {batching['note']}")
    return lines


def report_markdown(
    spec: DatasetSpec, result: Score, model: str, stats: Any, batching: dict[str, Any] | None = None
) -> str:
    metrics = ", ".join(f"{m.upper()} {v:.2f}" for m, v in result.values.items())
    paper = ", ".join(f"{m.upper()} {v:.2f}" for m, v in spec.paper.gpt4v.items()) or "–"
    supervised = ", ".join(f"{m.upper()} {v:.2f}" for m, v in spec.paper.supervised.items()) or "–"
    lines = [
        f"# {spec.title}: {model}",
        "",
        f"- {metrics} over {result.n} samples"
        + (f" ({result.dropped} with score 0 dropped)" if result.dropped else ""),
        f"- parse failures: {result.failures} ({result.parse_failure_rate:.2f}%), scored as wrong",
        *markdown_lines(result.answer),
        f"- GPT-4V (paper): {paper}; best supervised: {supervised}",
        f"- requests: {stats.cached} from cache, {stats.sent} sent, {stats.failed} failed, "
        f"{stats.splits} batch splits",
        *batching_lines(batching),
        "",
        *views_markdown(spec, result),
        "| class | recall % |",
        "|---|---|",
    ]
    lines += [f"| {c} | {r:.2f} |" for c, r in result.per_class_recall.items()]
    return "\n".join(lines) + "\n"


def views_markdown(spec: DatasetSpec, result: Score) -> list[str]:
    """The run's scores by rows (every test sample vs the paper's rows) and label equality, with notes."""
    from ger.scoring.views import View

    metrics = list(result.values)
    lines = [
        "## Scores by rows and label equality",
        "",
        "| rows | labels | n | failures | " + " | ".join(m.upper() for m in metrics) + " |",
        "|---" * (4 + len(metrics)) + "|",
    ]
    for v in [result, *result.views]:
        rows, labels = View(v.rows, v.labels).describe(spec)
        cells = [rows, labels, str(v.n), str(v.failures), *(f"{v.values[m]:.2f}" for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", *(f"- {note}" for note in result.notes), *([""] if result.notes else [])]


def write_run_files(
    out: Path,
    cfg: DictConfig,
    spec: DatasetSpec,
    preds: list[Prediction],
    result: Score,
    overrides: list[str],
    stats: Any,
    batching: dict[str, Any] | None = None,
    stream: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """config.yaml, predictions.csv, metrics.json and report.md; each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", resolved_config(cfg))
    write_predictions(out / "predictions.csv", preds)
    meta = {
        **result.to_dict(),
        "model": cfg.model.name,
        "backend": cfg.backend.name,
        "answer": cfg.get("answer"),  # the answer mode (ger/answers/modes.py), resolved by the pipeline
        "overrides": overrides,
        "requests": asdict(stats),
    }
    if stream is not None:
        meta["stream"] = stream  # window, workers, samples decoded, most decoded samples alive at once
    if batching is not None:
        meta["batching"] = batching  # effective batch sizes, splits, and why they differ from the paper's
    atomic_write_text(out / "metrics.json", json.dumps(meta, indent=2))
    atomic_write_text(out / "report.md", report_markdown(spec, result, cfg.model.name, stats, batching))
    return meta
