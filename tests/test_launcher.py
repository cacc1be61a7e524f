"""The cluster path: a Hydra multirun through hydra-submitit-launcher.

`hydra/launcher=slurm` needs a SLURM cluster; submitit's `local` executor runs the same
launcher plugin, pickling and job folders with local processes, so it is what CI can run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_ger

pytest.importorskip(
    "hydra_plugins.hydra_submitit_launcher", reason="needs hydra-submitit-launcher (the slurm extra)"
)


def test_submitit_multirun_runs_one_job_per_setting(ger_cache: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    args = ["run", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
            "hydra.launcher.gpus_per_node=0", "dataset=demo", "model=tiny-random-qwen2vl", "backend=hf",
            "limit=2", "sampling.max_tokens=4", "progress=false", "greyscale=true,false",
            f"hydra.sweep.dir={sweep}"]  # fmt: skip
    run_ger(args, ger_cache, tmp_path)
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(jobs) == 2
    overrides = [json.loads((job / "metrics.json").read_text())["overrides"] for job in jobs]
    greys = sorted(o.lower() for job in overrides for o in job if o.startswith("greyscale"))
    assert greys == ["greyscale=false", "greyscale=true"]
    assert list(sweep.glob(".submitit/*/*_result.pkl")), "submitit wrote no job results"


def test_slurm_launcher_config_composes(ger_cache: Path, tmp_path: Path):
    proc = run_ger(["run", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra"],
                   ger_cache, tmp_path)  # fmt: skip
    assert (
        "SlurmLauncher" in proc.stdout
        and "partition: gpu" in proc.stdout
        and "gpus_per_node: 1" in proc.stdout
    )
