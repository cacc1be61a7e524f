"""Plots are written as real PNGs of a sane size, for synthetic runs and for each plot kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from ger.data.datasets import load_spec
from ger.records import OK, Prediction
from ger.report.plots import bars_plot, confusion_plot, frames_plot, slug
from ger.report.report import cli
from ger.run.predictions import write_predictions
from ger.scoring.metrics import score
from ger.scoring.stats import Interval

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert 300 <= width <= 4000 and 200 <= height <= 4000, (width, height)
    return width, height


def write_run(folder: Path, dataset: str, n_right: int, n: int, frames: int) -> None:
    """A run folder on `dataset` answering the first n_right of n samples right."""
    spec = load_spec(dataset)
    preds = []
    for i in range(n):
        gt = spec.labels[i % len(spec.labels)]
        top = gt if i < n_right else spec.labels[(i + 1) % len(spec.labels)]
        preds.append(Prediction(f"s{i}", gt, [top], OK))
    folder.mkdir(parents=True)
    write_predictions(folder / "predictions.csv", preds)
    overrides = [f"dataset={dataset}", f"frames={frames}"]
    meta = {**score(preds, spec).to_dict(), "model": "tiny", "overrides": overrides}
    (folder / "metrics.json").write_text(json.dumps(meta))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


def test_frames_plot(tmp_path: Path):
    series = {
        "model-a": [(1, Interval(40, 35, 45, 100, 200)), (3, Interval(50, 45, 55, 100, 200))],
        "model-b": [(8, Interval(60, 55, 66, 100, 200)), (2, Interval(30, 30, 30, 100, 0))],
    }
    assert_png(frames_plot("DFEW: WAR vs frames", "war", series, tmp_path / "frames.png"))


def test_bars_plot_with_missing_cells(tmp_path: Path):
    paper = [(75.81, 75.81, 75.81), (69.72, 69.72, 69.72)]
    bars = {"run": [(50.0, 45.0, 55.0), None], "GPT-4V (paper)": paper, "never run": [None, None]}
    assert_png(bars_plot("Facial", ["RAF-DB", "CK+"], bars, tmp_path / "bars.png"))


def test_confusion_plot_with_an_invalid_column(tmp_path: Path):
    labels = ["a", "b", "(invalid)"]
    width, height = assert_png(confusion_plot("run\nset", labels, [[5, 1, 0], [2, 3, 1]], tmp_path / "c.png"))
    assert width > height  # the colour bar sits beside the matrix


def test_confusion_plot_rejects_a_mismatched_matrix(tmp_path: Path):
    with pytest.raises(ValueError, match="does not match"):
        confusion_plot("x", ["a", "b"], [[1, 2, 3]], tmp_path / "c.png")


def test_slug_keeps_file_names_safe():
    assert slug("GPT-4V (release) rgb") == "GPT-4V_release_rgb"
    assert slug("tiny frames=8 model/x") == "tiny_frames=8_model_x"


def test_report_plots_for_a_frames_sweep(tmp_path: Path):
    sweep = tmp_path / "sweep"
    for frames, right in ((1, 10), (3, 20), (8, 30)):
        write_run(sweep / f"ravdess_{frames}", "ravdess", right, 40, frames)
    write_run(sweep / "rafdb_3", "rafdb", 5, 14, 3)
    out = tmp_path / "report"
    assert cli([str(sweep), "--out", str(out), "--plots", "--bootstrap", "300"]) == 0
    plots = out / "plots"
    written = sorted(p.relative_to(plots).as_posix() for p in plots.rglob("*.png"))
    assert written == [
        "bars_dynamic.png",
        "bars_facial.png",
        "confusion/rafdb_tiny_frames=3.png",
        "confusion/ravdess_tiny_frames=1.png",
        "confusion/ravdess_tiny_frames=3.png",
        "confusion/ravdess_tiny_frames=8.png",
        "frames_ravdess.png",  # rafdb is an image set: no frames plot
    ]
    for path in plots.rglob("*.png"):
        assert_png(path)
