"""Run folders as the report reads them: predictions, metrics, the settings behind them, a row label.

A run is any folder holding predictions.csv and metrics.json: a `ger run` folder, a Hydra
multirun job, or one of the GPT-4V release runs that `ger reproduce` writes.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from ger.data.datasets import DatasetSpec, load_spec
from ger.records import Prediction
from ger.run.predictions import read_predictions
from ger.scoring.metrics import Outcome, outcome
from ger.scoring.stats import Interval, bootstrap_ci

REFERENCE_MODEL = "gpt4v-release"  # metrics.json "model" of the runs `ger reproduce` writes
# Overrides that name where things are, not what was evaluated: never part of a row label.
NOT_IN_LABEL = {"model", "dataset", "data_root", "cache_dir", "experiment", "reference", "progress", "shard"}


@dataclass
class Run:
    """One run folder: its predictions, its metrics.json and the settings it was run with."""

    path: Path
    metrics: dict[str, Any]
    predictions: list[Prediction]
    overrides: dict[str, str]
    config: dict[str, Any]
    label: str = ""
    _intervals: dict[tuple[str, int, int], Interval] = field(default_factory=dict, repr=False)

    @property
    def test_set(self) -> str:
        return self.metrics.get("test_set") or self.metrics["dataset"]

    @property
    def variant(self) -> str:
        return str(self.metrics.get("variant") or "")

    @property
    def model(self) -> str:
        return str(self.metrics.get("model") or self.setting("model") or "unknown-model")

    @property
    def is_reference(self) -> bool:
        return self.model == REFERENCE_MODEL

    @cached_property
    def spec(self) -> DatasetSpec:
        return load_spec(self.test_set)

    @cached_property
    def outcome(self) -> Outcome:
        return outcome(self.predictions, self.spec)

    def setting(self, key: str) -> str | None:
        """A config value as override syntax writes it: the override if given, else the saved config."""
        if key in self.overrides:
            return self.overrides[key]
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        if isinstance(node, dict):  # a config group (model, dataset): its name
            node = node.get("name", node.get("key"))
        return yaml.safe_dump(node, default_flow_style=True).strip().removesuffix("...").strip()

    def interval(self, metric: str, n_boot: int, seed: int) -> Interval:
        """The metric with its bootstrap interval (n_boot 0: the point estimate only), computed once."""
        key = (metric, n_boot, seed)
        if key not in self._intervals:
            self._intervals[key] = bootstrap_ci(
                self.outcome.y_true, self.outcome.y_pred, metric, n_boot, seed
            )
        return self._intervals[key]


def _read_overrides(folder: Path, metrics: dict[str, Any]) -> dict[str, str]:
    """key -> value from .hydra/overrides.yaml, else metrics.json's "overrides" list ("+key=value")."""
    path = folder / ".hydra" / "overrides.yaml"
    items = (yaml.safe_load(path.read_text()) or []) if path.is_file() else (metrics.get("overrides") or [])
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def _read_config(folder: Path) -> dict[str, Any]:
    for path in (folder / "config.yaml", folder / ".hydra" / "config.yaml"):
        if path.is_file():
            data = yaml.safe_load(path.read_text())
            return data if isinstance(data, dict) else {}
    return {}


def load_run(folder: Path) -> Run:
    metrics = json.loads((folder / "metrics.json").read_text())
    if not isinstance(metrics, dict):
        raise ValueError(f"{folder / 'metrics.json'} holds no JSON object")
    preds = read_predictions(folder / "predictions.csv")
    if not preds:
        raise ValueError(f"{folder / 'predictions.csv'} holds no predictions (only a header)")
    return Run(folder, metrics, preds, _read_overrides(folder, metrics), _read_config(folder))


def check_run(run: Run) -> None:
    """Score the run once (raises on a ground truth its dataset cannot score); warn when the
    predictions hold another n than metrics.json says, as after a truncation at a row boundary."""
    n = len(run.outcome.y_true)
    saved = run.metrics.get("n")
    if isinstance(saved, int) and saved != n:
        print(
            f"warning: {run.path}: predictions.csv gives n={n} but metrics.json says n={saved} "
            f"(truncated or edited?); reported with n={n}",
            file=sys.stderr,
        )


def find_runs(paths: list[Path]) -> list[Run]:
    """Every folder at or below `paths` holding both predictions.csv and metrics.json, in path order."""
    folders: dict[Path, Path] = {}  # resolved -> as given, so a folder reached twice is read once
    for root in paths:
        if not root.exists():
            raise FileNotFoundError(f"no such run or sweep folder: {root}")
        for found in sorted({root / "metrics.json", *root.rglob("metrics.json")}):
            if found.is_file() and (found.parent / "predictions.csv").is_file():
                folders.setdefault(found.parent.resolve(), found.parent)
    runs = []
    for folder in folders.values():
        try:  # one bad run folder is skipped with a warning; the others still make the report
            run = load_run(folder)
            run.spec  # noqa: B018  # fail here, per run, on an unknown test set
            check_run(run)
            runs.append(run)
        except (ValueError, KeyError, TypeError, OSError, csv.Error, yaml.YAMLError) as err:
            print(f"warning: skipped {folder}: {err}", file=sys.stderr)
    return runs


def differing_keys(runs: list[Run], exclude: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Override keys whose value differs between the (non-reference) runs: what a row label must show."""
    own = [r for r in runs if not r.is_reference]
    keys = sorted({k for r in own for k in r.overrides} - NOT_IN_LABEL - set(exclude))
    return [k for k in keys if len({r.setting(k) for r in own}) > 1]


def label_of(run: Run, keys: list[str]) -> str:
    if run.is_reference:
        several = run.spec.reference is not None and len(run.spec.reference.files) > 1
        return "GPT-4V (release)" + (f" {run.variant}" if several and run.variant else "")
    parts = [f"{k}={v}" for k in keys if (v := run.setting(k)) is not None]
    return " ".join([run.model, *parts])


def assign_labels(runs: list[Run]) -> None:
    """Row labels: model + the settings that differ; the folder name breaks any remaining tie."""
    keys = differing_keys(runs)
    for run in runs:
        run.label = label_of(run, keys)
    seen: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        seen.setdefault((run.label, run.test_set), []).append(run)
    for group in seen.values():
        if len(group) > 1:
            for run in group:
                run.label = f"{run.label} ({run.path.name})"
