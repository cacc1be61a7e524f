"""`ger reproduce` on the released GPT-4V predictions matches the paper's numbers."""

import io
import json
import tarfile
from pathlib import Path

import pytest

from ger.cli import main
from ger.data.datasets import all_specs
from ger.report.reference import discover, download_release

REPO = Path(__file__).resolve().parents[1]

# PROTOCOL.md, "Paper's GPT-4V numbers that re-scoring the release reproduces exactly".
EXACT = [
    ("ckplus", "", "acc", 69.72),
    ("sfew2", "", "acc", 57.24),
    ("rafdb", "rgb", "acc", 75.81),
    ("ferplus", "", "acc", 64.25),
    ("affectnet", "", "acc", 42.77),
    ("abstract", "", "acc", 71.81),
    ("artphoto", "", "acc", 80.40),
    ("twitter1", "five", "acc", 97.81),
    ("twitter1", "four", "acc", 94.63),
    ("twitter1", "three", "acc", 90.71),
    ("twitter2", "", "acc", 87.95),
    ("casme1", "", "acc", 36.93),
    ("casme2", "", "acc", 14.64),
    ("samm", "", "acc", 17.04),
    ("cmumosi", "multi", "wf1", 80.43),
    ("sims", "multi", "wf1", 81.24),
    ("mer2023", "multi", "acc", 63.50),
]


@pytest.fixture(scope="module")
def reproduced(reference_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reproduce")
    assert main(["reproduce", "--reference-dir", str(reference_dir), "--out", str(out)]) == 0
    return out


def test_registry_has_21_test_sets():
    assert len(all_specs()) == 21


@pytest.mark.parametrize("dataset, variant, metric, value", EXACT)
def test_paper_numbers_reproduce_exactly(reproduced, dataset, variant, metric, value):
    rows = json.loads((reproduced / "results.json").read_text())
    (row,) = [r for r in rows if (r["dataset"], r["variant"], r["metric"]) == (dataset, variant, metric)]
    assert row["value"] == pytest.approx(value, abs=0.01)
    assert row["paper"] == pytest.approx(value, abs=0.01)


def test_every_released_file_is_scored(reproduced, reference_dir):
    rows = json.loads((reproduced / "results.json").read_text())
    assert {(r["dataset"], r["variant"]) for r in rows} == {
        (f.folder, f.variant) for f in discover(reference_dir)
    }
    assert {"dataset", "variant", "metric", "value", "n", "paper"} == set(rows[0])
    md = (reproduced / "results.md").read_text()
    for heading in ("Table 3", "Table 4", "Table 5", "Table 6", "Table 7"):
        assert heading in md
    assert (reproduced / "runs" / "rafdb-grey" / "predictions.csv").is_file()


def test_download_path_uses_a_pinned_archive_once(reference_dir, tmp_path):
    archive = tmp_path / "release.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for folder in ("ckplus", "twitter2"):
            tar.add(reference_dir / folder, arcname=f"gpt4v-emotion-abc/results/{folder}")
        tar.addfile(tarfile.TarInfo("gpt4v-emotion-abc/README.md"), io.BytesIO(b""))
    dest = tmp_path / "cache" / "release"
    results = download_release(archive.as_uri(), dest)
    assert sorted(p.name for p in results.iterdir()) == ["ckplus", "twitter2"]
    archive.unlink()  # a second call must not fetch again
    assert download_release(archive.as_uri(), dest) == results


def test_reproduce_without_reference_dir_downloads(reference_dir, tmp_path, monkeypatch):
    archive = tmp_path / "release.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(reference_dir / "samm", arcname="top/results/samm")
    monkeypatch.setenv("GER_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["reproduce", "--out", str(out), "--url", archive.as_uri()]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [(r["dataset"], r["value"]) for r in rows] == [("samm", 17.04)]
