"""`ger run` end to end on the demo data with the transformers backend and a tiny random model."""

from __future__ import annotations

import json

import pytest
from conftest import require_vllm, rows, run_ger

pytest.importorskip("transformers")

BASE = ["model=tiny-random-qwen2vl", "backend=hf", "sampling.max_tokens=8", "progress=false"]


def test_run_writes_a_complete_run_folder_and_reruns_from_cache(ger_cache, tmp_path):
    run1, run2 = tmp_path / "r1", tmp_path / "r2"
    run_ger(["run", "dataset=demo", "limit=4", *BASE, f"hydra.run.dir={run1}"], ger_cache, tmp_path)
    for name in ("config.yaml", "predictions.csv", "metrics.json", "report.md", ".hydra/config.yaml"):
        assert (run1 / name).is_file(), name
    preds = rows(run1)
    assert [r["name"] for r in preds] == ["img_001", "img_002", "img_003", "img_004"]
    assert all(r["response_key"] and r["status"] in ("ok", "unknown_label", "empty") for r in preds)
    meta = json.loads((run1 / "metrics.json").read_text())
    assert meta["n"] == 4 and meta["scores"][0]["metric"] == "acc" and meta["model"] == "tiny-random-qwen2vl"
    first = meta["requests"]

    run_ger(["run", "dataset=demo", "limit=4", *BASE, f"hydra.run.dir={run2}"], ger_cache, tmp_path)
    again = json.loads((run2 / "metrics.json").read_text())["requests"]
    assert again["sent"] == 0 and again["cached"] == first["sent"] + first["cached"]
    assert rows(run2) == preds  # the same answers, served from the cache


def test_video_batch_mode_answers_every_sample_once(ger_cache, tmp_path):
    run = tmp_path / "video"
    run_ger(
        [
            "run",
            "dataset=demo_video",
            "limit=3",
            "mode=batch",
            "batch_size=3",
            "frames=2",
            *BASE,
            f"hydra.run.dir={run}",
        ],
        ger_cache,
        tmp_path,
    )
    preds = rows(run)
    assert len(preds) == 3 and len({r["name"] for r in preds}) == 3
    meta = json.loads((run / "metrics.json").read_text())
    # a tiny random model never returns 3 well-formed records, so the paper's back-off splits the batch
    assert meta["requests"]["splits"] >= 1
    assert {m["metric"] for m in meta["scores"]} == {"war", "uar"}


VLLM = ["model=tiny-random-qwen2vl", "backend=vllm_cpu", "sampling.max_tokens=8", "progress=false"]


@pytest.mark.vllm
def test_vllm_run_with_structured_output_answers_only_labels(ger_cache, tmp_path):
    require_vllm()
    run = tmp_path / "vllm"
    run_ger(
        ["run", "dataset=demo", "limit=6", "structured_output=true", *VLLM, f"hydra.run.dir={run}"],
        ger_cache,
        tmp_path,
    )
    preds = rows(run)
    labels = ["anger", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    assert len(preds) == 6 and all(r["status"] == "ok" and r["top1"] in labels for r in preds)


@pytest.mark.vllm
def test_vllm_run_on_video_input(ger_cache, tmp_path):
    require_vllm()
    run = tmp_path / "vllm-video"
    run_ger(
        [
            "run",
            "dataset=demo_video",
            "limit=3",
            "frames=4",
            "frames_as=video",
            *VLLM,
            f"hydra.run.dir={run}",
        ],
        ger_cache,
        tmp_path,
    )
    preds = rows(run)
    assert [r["name"] for r in preds] == ["clip_01", "clip_02", "clip_03"]
    assert all(r["status"] != "error" for r in preds), preds
