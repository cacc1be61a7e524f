"""`ger report` on synthetic run folders and on the reproduced GPT-4V release; the sweep presets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_ger

from ger.data.datasets import load_spec
from ger.records import OK, Prediction
from ger.report.report import build_report, cli
from ger.report.runs import find_runs
from ger.run.predictions import write_predictions
from ger.scoring.metrics import score

REPO = Path(__file__).resolve().parent.parent
REFERENCE_DIR = Path(
    os.environ.get("GER_REFERENCE_DIR", REPO.parent / "shared" / "reference" / "gpt4v-emotion" / "results")
)


def make_run(
    folder: Path,
    dataset: str,
    right: list[bool],
    overrides: dict[str, str],
    model: str = "tiny",
    top_prob: float | None = None,
) -> Path:
    """A run folder as `ger run` writes it: sample i is answered right iff right[i]; with `top_prob`,
    a likelihood answer: the top label has that probability, the others share the rest equally."""
    spec = load_spec(dataset)
    labels = spec.labels
    preds = []
    for i, ok in enumerate(right):
        gt = labels[i % len(labels)]
        top = gt if ok else labels[(i + 1) % len(labels)]
        rest = None if top_prob is None else (1 - top_prob) / (len(labels) - 1)
        probs = None if top_prob is None else {x: top_prob if x == top else rest for x in labels}
        ranked = [top, *[x for x in labels if x != top][:2]]
        preds.append(Prediction(f"clip_{i:03d}.mp4", gt, ranked, OK, probs=probs))
    folder.mkdir(parents=True)
    write_predictions(folder / "predictions.csv", preds)
    items = [f"dataset={dataset}", *(f"{k}={v}" for k, v in overrides.items())]
    meta = {**score(preds, spec).to_dict(), "model": model, "overrides": items}
    (folder / "metrics.json").write_text(json.dumps(meta))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(items))
    config = {"dataset": {"key": dataset}, "model": {"name": model}, "frames": 3, "greyscale": False}
    config.update({k: yaml.safe_load(v) for k, v in overrides.items()})
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


# Run A right on samples 0-29 of 40; run B right on 0-19 and 35-39.
# Discordant: only A right = 20..29 (10), only B right = 35..39 (5): exact p = 2 * sum_{i<=5} C(15, i) / 2^15.
RIGHT_A = [i < 30 for i in range(40)]
RIGHT_B = [i < 20 or i >= 35 for i in range(40)]
P_EXACT = 2 * (1 + 15 + 105 + 455 + 1365 + 3003) / 2**15


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun"
    make_run(root / "0_ravdess_tiny", "ravdess", RIGHT_A, {"frames": "2"})
    make_run(root / "1_ravdess_tiny", "ravdess", RIGHT_B, {"frames": "8"})
    return root


def test_report_holds_one_row_per_frame_setting(sweep: Path, tmp_path: Path, capsys):
    out = tmp_path / "report"
    assert cli([str(sweep), "--out", str(out), "--bootstrap", "500"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    rows = {(r["row"], r["metric"]): r for r in data["table"] if r["source"] == "run"}
    assert rows[("tiny frames=2", "war")]["value"] == 75.0
    assert rows[("tiny frames=8", "war")]["value"] == 62.5
    for r in rows.values():
        assert r["ci_low"] <= r["value"] <= r["ci_high"] and r["ci_low"] < r["ci_high"]
    markdown = (out / "report.md").read_text()
    assert printed == markdown + "\n"
    assert "| tiny frames=2 | 75.00 [" in markdown and "| tiny frames=8 | 62.50 [" in markdown
    assert "Best supervised (paper)" in markdown and "75.56 (MAE-DFER)" in markdown
    csv_lines = (out / "report.csv").read_text().splitlines()
    assert csv_lines[0].startswith("row,source,dataset,title,task,variant,metric,value,ci_low,ci_high")
    assert len(csv_lines) == 1 + 2 * 2 + 2  # header, 2 runs x (war, uar), supervised war + uar


def test_compare_pairs_runs_by_sample_name(sweep: Path, tmp_path: Path):
    a, b = sweep / "0_ravdess_tiny", sweep / "1_ravdess_tiny"
    out = tmp_path / "cmp"
    assert cli(["--compare", str(a), str(b), "--out", str(out), "--bootstrap", "200"]) == 0
    (comparison,) = json.loads((out / "report.json").read_text())["comparisons"]
    assert comparison["dataset"] == "ravdess"
    test = comparison["mcnemar"]
    assert (test["n"], test["only_a_right"], test["only_b_right"], test["method"]) == (40, 10, 5, "exact")
    assert test["p_value"] == pytest.approx(P_EXACT)
    assert comparison["a"]["metrics"]["war"]["value"] == 75.0
    assert comparison["b"]["metrics"]["war"]["value"] == 62.5
    assert "## Comparison" in (out / "report.md").read_text()


def test_labels_show_only_the_settings_that_differ(tmp_path: Path):
    make_run(tmp_path / "a", "rafdb", [True] * 7, {"greyscale": "true", "frames": "3"})
    make_run(tmp_path / "b", "rafdb", [False] * 7, {"greyscale": "false", "frames": "3"})
    make_run(
        tmp_path / "c", "rafdb", [True] * 7, {"frames": "3"}, model="other"
    )  # greyscale from config.yaml
    labels = {r.path.name: r.label for r in build_report([tmp_path], 0, 0).runs}
    assert labels == {"a": "tiny greyscale=true", "b": "tiny greyscale=false", "c": "other greyscale=false"}


def test_find_runs_reads_nested_folders_once(sweep: Path):
    runs = find_runs([sweep, sweep / "0_ravdess_tiny"])
    assert sorted(r.path.name for r in runs) == ["0_ravdess_tiny", "1_ravdess_tiny"]


def test_report_without_runs_fails_loudly(tmp_path: Path, capsys):
    assert cli([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no runs" in capsys.readouterr().err


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"the GPT-4V release is not at {REFERENCE_DIR} (set GER_REFERENCE_DIR)")
    from ger.report.reference import score_release, write_results

    out = tmp_path_factory.mktemp("reproduce")
    write_results(score_release(REFERENCE_DIR, out), out)
    return out


def test_report_on_the_reproduced_release_shows_the_paper_ablations(reproduced: Path, tmp_path: Path):
    out = tmp_path / "report"
    assert cli([str(reproduced), "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    ablations = {(c["dataset"], c["a"]["variant"], c["b"]["variant"]): c for c in data["ablations"]}
    rafdb = ablations[("rafdb", "grey", "rgb")]
    assert rafdb["b"]["metrics"]["acc"]["value"] == 75.81
    assert 0.0 < rafdb["mcnemar"]["p_value"] < 1.0 and rafdb["mcnemar"]["method"] == "chi2"
    for key in ("mer2023", "sims", "cmumosi"):
        assert {(a, b) for d, a, b in ablations if d == key} == {
            ("text", "multi"),
            ("video", "multi"),
            ("text", "video"),
        }
    for key in ("ravdess", "enterface"):
        assert ("2", "3") in {(a, b) for d, a, b in ablations if d == key}
    markdown = (out / "report.md").read_text()
    assert "## Paper ablations" in markdown
    line = next(x for x in markdown.splitlines() if x.startswith("| RAF-DB | ACC | GPT-4V (release) grey"))
    assert "GPT-4V (release) rgb: 75.81 [" in line and "(chi2)" in line
    rows = {(r["row"], r["dataset"]): r for r in data["table"]}
    assert rows[("GPT-4V (release) rgb", "rafdb")]["value"] == 75.81
    assert rows[("GPT-4V (paper)", "rafdb")]["value"] == 75.81
    assert rows[("GPT-4V (release)", "ckplus")]["value"] == 69.72


# --- sweep presets (conf/experiment) --------------------------------------------------------------

APP = textwrap.dedent(
    """
    import json, sys
    import hydra
    from ger.config import conf_dir

    seen = []

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def app(cfg):
        seen.append([cfg.dataset.key, cfg.frames, cfg.greyscale, cfg.modality])

    app()
    print(json.dumps(seen))
    """
)


def sweep_jobs(tmp_path: Path, *overrides: str) -> list[list]:
    """The (dataset, frames, greyscale, modality) of every job Hydra launches for `-m overrides`."""
    script = tmp_path / "app.py"
    script.write_text(APP)
    args = [sys.executable, str(script), "-m", *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra/job_logging=none", "hydra/hydra_logging=none"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("greyscale", [["rafdb", 3, True, None], ["rafdb", 3, False, None]]),
        (
            "modality",
            [[d, 3, False, m] for d in ("mer2023", "sims", "cmumosi") for m in ("text", "video", "multi")],
        ),
    ],
)
def test_sweep_presets_launch_the_paper_ablations(tmp_path: Path, preset: str, expected: list):
    assert sweep_jobs(tmp_path, f"+experiment={preset}") == expected


def test_frames_preset_can_be_narrowed_on_the_command_line(tmp_path: Path):
    jobs = sweep_jobs(tmp_path, "+experiment=frames", "dataset=ravdess,dfew", "frames=2,3")
    assert jobs == [["ravdess", 2, False, None], ["ravdess", 3, False, None], ["dfew", 2, False, None],
                    ["dfew", 3, False, None]]  # fmt: skip


def test_frames_preset_sweeps_four_sets_and_five_counts():
    from hydra import compose, initialize_config_dir

    from ger.config import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("config", ["+experiment=frames"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params.dataset.split(",") == ["dfew", "ferv39k", "ravdess", "enterface"]
    assert [int(x) for x in params.frames.split(",")] == [1, 2, 3, 4, 8]
    for key in params.dataset.split(","):
        assert load_spec(key).modality == "video"


def test_compare_a_model_run_with_the_release_pairs_the_paper_variant(reproduced: Path, tmp_path: Path):
    """A model run on RAF-DB (here: the grey predictions under another name) against the whole release."""
    run = tmp_path / "model_run"
    run.mkdir()
    grey = reproduced / "runs" / "rafdb-grey"
    (run / "predictions.csv").write_text((grey / "predictions.csv").read_text())
    meta = json.loads((grey / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**meta, "variant": "", "model": "tiny", "overrides": []}))
    out = tmp_path / "cmp"
    assert cli(["--compare", str(run), str(reproduced), "--out", str(out), "--bootstrap", "0"]) == 0
    (comparison,) = json.loads((out / "report.json").read_text())["comparisons"]
    assert (comparison["dataset"], comparison["b"]["variant"]) == ("rafdb", "rgb")
    test = comparison["mcnemar"]
    # the same paired counts as the release's own grey-vs-rgb ablation: (|210 - 257| - 1)^2 / 467 = 4.531
    assert (test["n"], test["only_a_right"], test["only_b_right"]) == (3067, 210, 257)
    assert test["p_value"] == pytest.approx(0.03329, abs=1e-4)


def test_compare_skips_runs_without_shared_samples(tmp_path: Path, capsys):
    make_run(tmp_path / "a", "rafdb", [True] * 7, {})
    b = make_run(tmp_path / "b", "rafdb", [True] * 7, {})
    (b / "predictions.csv").write_text((b / "predictions.csv").read_text().replace("clip_", "other_"))
    assert (
        cli(["--compare", str(tmp_path / "a"), str(b), "--out", str(tmp_path / "out"), "--bootstrap", "0"])
        == 0
    )
    assert "share no sample names" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["comparisons"] == []


def test_a_real_sweep_over_two_frame_counts_gives_two_runs_in_one_report(ger_cache: Path, tmp_path: Path):
    """`ger run -m ... frames=1,2` with the tiny model on the demo videos, then `ger report` on the sweep."""
    pytest.importorskip("transformers")
    sweep = tmp_path / "sweep"
    args = ["run", "-m", "dataset=demo_video", "frames=1,2", "model=tiny-random-qwen2vl", "backend=hf",
            "limit=2", "sampling.max_tokens=8", "progress=false", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    run_ger(args, ger_cache, tmp_path)
    runs = find_runs([sweep])
    assert sorted(r.setting("frames") for r in runs) == ["1", "2"]
    out = tmp_path / "report"
    assert cli([str(sweep), "--out", str(out), "--plots"]) == 0
    md = (out / "report.md").read_text()
    assert "frames=1" in md and "frames=2" in md
    assert (out / "plots" / "frames_demo_video.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_answer_modes_side_by_side_with_the_paired_test(tmp_path: Path):
    root = tmp_path / "sweep"
    make_run(root / "free", "ravdess", RIGHT_A, {})  # no answer key: mode=single -> free
    make_run(root / "batch", "ravdess", RIGHT_B, {"mode": "batch", "batch_size": "8"})
    make_run(root / "lik", "ravdess", RIGHT_B, {"answer": "likelihood"}, top_prob=0.65)
    make_run(root / "choice", "ravdess", RIGHT_A, {"mode": "single", "structured_output": "true"})
    make_run(root / "other", "ravdess", RIGHT_A, {"answer": "likelihood", "frames": "8"}, top_prob=0.65)
    out = tmp_path / "report"
    assert cli([str(root), "--out", str(out), "--bootstrap", "0"]) == 0
    (group,) = json.loads((out / "report.json").read_text())["modes"]  # frames=8 differs: not a peer
    assert [r["answer"] for r in group["runs"]] == ["free", "batch", "choice", "likelihood"]
    free, batch, _, lik = group["runs"]
    assert free["values"]["war"] == free["answer_metrics"]["top1"] == 75.0
    assert lik["values"]["war"] == lik["answer_metrics"]["top1"] == 62.5
    assert (free["answer_metrics"]["with_probs"], lik["answer_metrics"]["with_probs"]) == (0, 40)
    assert free["answer_metrics"]["nll"] is None
    p_true = np.where(RIGHT_B, 0.65, 0.05)  # the true label's probability, as make_run gives it
    assert lik["answer_metrics"]["nll"] == pytest.approx(-np.log(p_true).mean(), abs=1e-4)
    tests = {(t["a"], t["b"]): t for t in group["mcnemar"]}
    modes = ["free", "batch", "choice", "likelihood"]
    assert set(tests) == {(a, b) for i, a in enumerate(modes) for b in modes[i + 1 :]}
    t = tests[("free", "likelihood")]
    assert (t["n"], t["only_a_right"], t["only_b_right"], t["method"]) == (40, 10, 5, "exact")
    assert t["p_value"] == pytest.approx(P_EXACT)
    assert (
        tests[("batch", "likelihood")]["only_a_right"] == tests[("batch", "likelihood")]["only_b_right"] == 0
    )
    markdown = (out / "report.md").read_text()
    assert "## Answer modes side by side" in markdown
    assert "| likelihood | 40 | 62.50 |" in markdown and "| free | likelihood | 40 | 10 | 5 |" in markdown


def test_no_mode_table_when_runs_differ_in_more_than_the_answer(sweep: Path, tmp_path: Path):
    make_run(sweep / "lik", "ravdess", RIGHT_A, {"answer": "likelihood", "frames": "4"}, top_prob=0.5)
    assert build_report([sweep], 0, 0).modes == []


@pytest.mark.parametrize(
    ("overrides", "saved", "mode"),
    [
        ({"answer": "likelihood"}, None, "likelihood"),  # config.yaml's answer
        ({}, "choice", "choice"),  # metrics.json's answer (the pipeline's resolved mode)
        ({"mode": "batch"}, None, "batch"),  # older spellings
        ({"mode": "single", "structured_output": "true"}, None, "choice"),
        ({"mode": "single"}, None, "free"),
        ({}, None, "free"),
    ],
)
def test_answer_mode_of_a_run(tmp_path: Path, overrides, saved, mode):
    from ger.report.modes import answer_mode
    from ger.report.runs import load_run

    folder = make_run(tmp_path / "r", "rafdb", [True] * 7, overrides)
    if saved:
        meta = json.loads((folder / "metrics.json").read_text())
        (folder / "metrics.json").write_text(json.dumps({**meta, "answer": saved}))
    assert answer_mode(load_run(folder)) == mode
