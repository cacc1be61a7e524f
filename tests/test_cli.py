"""The `ger` program around main(): how it exits, how often Hydra composes its config, what it freezes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ger.cli import _may_set_mode, _mode_set_by_config

ROOT = Path(__file__).resolve().parents[1]


def ger(args: list[str], stdout: int, code: str = "from ger.cli import console; console()"):
    """Run the `ger` program as its console script does, with `args` and this stdout."""
    program = f"import sys; sys.argv = ['ger', *sys.argv[1:]]; {code}"
    return subprocess.run([sys.executable, "-c", program, *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, cwd=ROOT, timeout=120)  # fmt: skip


def test_the_ger_script_is_the_console_entry() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ger"] == "ger.cli:console"


def test_a_reader_that_leaves_early_gets_no_traceback() -> None:
    """`ger datasets | head -1`: the pipe's reader is gone before ger writes; exit 1, stderr quiet."""
    read, write = os.pipe()
    os.close(read)
    try:
        gone = ger(["datasets", "--all"], write)
    finally:
        os.close(write)
    assert gone.returncode == 1 and gone.stderr == "", gone.stderr

    whole = ger(["datasets", "--all"], subprocess.PIPE)
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.startswith("| key |") and "| demo |" in whole.stdout


def test_a_broken_pipe_that_is_not_stdout_keeps_its_traceback() -> None:
    code = (
        "import ger.cli as cli\n"
        "def main():\n"
        "    raise BrokenPipeError(32, 'a socket, not stdout')\n"
        "cli.main = main\n"
        "cli.console()"
    )
    proc = ger([], subprocess.PIPE, code)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "a socket, not stdout" in proc.stderr, proc.stderr


def test_the_program_leaves_its_objects_frozen_for_the_exit() -> None:
    """The interpreter's exit then skips collecting them; atexit handlers still run."""
    code = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count(), file=sys.stderr))\n"
        "from ger.cli import console\n"
        "console()"
    )
    proc = ger(["datasets"], subprocess.PIPE, code)
    assert proc.returncode == 0, proc.stderr
    assert "| rafdb |" in proc.stdout
    frozen = int(proc.stderr.split("frozen ")[1].split()[0])
    assert frozen > 10_000, proc.stderr  # the imported modules' objects at least


# the task replaced by one that says how Hydra ran it; Hydra's compositions counted
MODE_PROBE = """
import atexit, sys
import hydra._internal.hydra as internal
import ger.run.pipeline as pipeline
from hydra.core.hydra_config import HydraConfig
composed = []
compose = internal.Hydra.compose_config
def counted(self, *args, **kwargs):
    composed.append(kwargs.get("run_mode"))
    return compose(self, *args, **kwargs)
internal.Hydra.compose_config = counted
pipeline.prepare = lambda cfg: print("mode", HydraConfig.get().mode.name, file=sys.stderr)
atexit.register(lambda: print("composed", len(composed), file=sys.stderr))
from ger.cli import console
console()
"""
# the task replaced by one that says how many objects the collector leaves alone while it runs
FREEZE_PROBE = """
import gc, sys
import ger.run.pipeline as pipeline
pipeline.prepare = lambda cfg: print("frozen", gc.get_freeze_count(), file=sys.stderr)
from ger.cli import {entry}
{entry}()
"""


def probe(tmp_path: Path, program: str, args: list[str], conf: Path | None = None) -> list[str]:
    """The stderr lines of `ger prepare ARGS` run by `program` (a probe that replaces the task), with its
    run and sweep folders and cache under tmp_path, and conf/ at `conf` if given; it must exit 0."""
    out = [f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    env = {**os.environ, "GER_CACHE_DIR": str(tmp_path / "cache")}
    if conf is not None:
        env["GER_CONF_DIR"] = str(conf)
    code = f"import sys; sys.argv = ['ger', *sys.argv[1:]]; {program}"
    proc = subprocess.run([sys.executable, "-c", code, "prepare", *args, *out], stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True, cwd=ROOT, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.splitlines()


def hydra_mode(tmp_path: Path, args: list[str], conf: Path | None = None) -> tuple[list[str], int]:
    """The run modes of a `ger prepare` (one per job) and how many times Hydra composed the config."""
    lines = probe(tmp_path, MODE_PROBE, args, conf)
    modes = [line.split()[1] for line in lines if line.startswith("mode ")]
    return modes, int(next(line for line in lines if line.startswith("composed ")).split()[1])


def test_the_run_mode_is_not_composed_for_when_only_the_command_line_sets_it(tmp_path: Path) -> None:
    """hydra.main composes the config once to learn the run mode and again to run (hydra#3440); where
    nothing in conf/ or the overrides can set hydra.mode, ger composes once, in the mode -m says."""
    assert hydra_mode(tmp_path / "a", ["dataset=demo", "frames=2"]) == (["RUN"], 1)
    modes, composed = hydra_mode(tmp_path / "b", ["-m", "dataset=demo", "frames=2,3"])
    assert modes == ["MULTIRUN", "MULTIRUN"]
    assert composed == 1  # the sweep's (the launcher composes each job's): none to learn the mode


def test_a_run_mode_set_by_the_config_is_still_honoured(tmp_path: Path) -> None:
    """An override or a config file that sets hydra.mode: Hydra composes to learn it, as before."""
    assert hydra_mode(tmp_path / "a", ["dataset=demo", "hydra.mode=MULTIRUN"])[0] == ["MULTIRUN"]
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    preset = "# @package _global_\n# a preset that always sweeps\nhydra:\n  mode: MULTIRUN\n"
    (conf / "experiment" / "always_sweep.yaml").write_text(preset)
    assert hydra_mode(tmp_path / "b", ["dataset=demo", "+experiment=always_sweep"], conf)[0] == ["MULTIRUN"]
    assert hydra_mode(tmp_path / "c", ["dataset=demo"], conf) == (["RUN"], 2)  # the file could be chosen


def test_no_preset_of_gers_conf_sets_the_run_mode() -> None:
    """Hydra's own composition of each experiment preset (the files a user picks to sweep) leaves
    hydra.mode unset, as the text search over conf/ says (ger/cli.py _mode_set_by_config)."""
    from hydra import compose, initialize_config_dir

    presets = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    assert presets
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for preset in presets:
            cfg = compose("config", [f"+experiment={preset}"], return_hydra_config=True)
            assert cfg.hydra.mode is None, preset
    assert not _mode_set_by_config([], ROOT / "conf")


@pytest.mark.parametrize(
    ("text", "sets"),
    [
        ("hydra:\n  mode: MULTIRUN\n", True),
        ("hydra: {mode: MULTIRUN}\n", True),
        ("# @package hydra\nmode: MULTIRUN\n", True),
        ("\n#@package hydra\nmode: MULTIRUN\n", True),
        ("# @foo bar\n# @package _global_.hydra\nmode: MULTIRUN\n", True),
        ("# a comment first ends the header\n# @package hydra\nmode: single\n", False),
        ("hydra.mode: RUN\n", True),
        ("hydra:\n  searchpath: [file:///elsewhere]\n", True),
        ("mode: single   # ger's own option, at the top level\n", False),
        ("# @package hydra.launcher\nmode: x\n", False),
        ("batch_size: null   # batch mode: the paper's\n", False),
        ("max_model_len: 4096\nfoo_mode: 3\n", False),
    ],
)
def test_which_config_files_may_set_the_run_mode(text: str, sets: bool) -> None:
    assert _may_set_mode(text) is sets


def test_a_file_of_the_hydra_group_may_set_the_run_mode_at_its_top_level(tmp_path: Path) -> None:
    """conf/hydra/<name>.yaml is packaged as `hydra`: its top-level `mode:` is hydra.mode. Its
    subgroups' (conf/hydra/launcher/) are not, nor is ger's own top-level `mode`."""
    conf = tmp_path / "conf"
    (conf / "hydra" / "launcher").mkdir(parents=True)
    (conf / "config.yaml").write_text("mode: single\n")
    (conf / "hydra" / "launcher" / "local.yaml").write_text("mode: fork\n")
    assert not _mode_set_by_config([], conf)
    (conf / "hydra" / "always_sweep.yaml").write_text("mode: MULTIRUN\n")
    assert _mode_set_by_config([], conf)


@pytest.mark.parametrize(
    ("argv", "sets"),
    [
        (["dataset=demo", "hydra.run.dir=out", "-m", "frames=1,2"], False),
        (["hydra.mode=MULTIRUN"], True),
        (["+hydra.searchpath=[file:///x]"], True),
        (["hydra/launcher=slurm"], True),
        (["--config-dir", "/x"], True),
    ],
)
def test_which_command_lines_may_set_the_run_mode(argv: list[str], sets: bool) -> None:
    assert _mode_set_by_config(argv, ROOT / "conf") is sets


@pytest.mark.parametrize("entry", ["console", "main"])
def test_the_program_freezes_what_lives_as_long_as_it_and_main_alone_does_not(tmp_path: Path, entry: str):
    """The `ger` program keeps Hydra's and ger's modules and the config out of the collector's full
    passes (gc.freeze before the task); main() called from someone's Python leaves their collector be."""
    lines = probe(tmp_path, FREEZE_PROBE.format(entry=entry), ["dataset=demo"])
    (frozen,) = [int(line.split()[1]) for line in lines if line.startswith("frozen ")]
    assert (frozen > 20_000) if entry == "console" else (frozen == 0), lines


# each job of a sweep: says whether the cycle the job before left (as an engine's objects may be) can
# still be collected, then leaves one of its own, old by then, and says how many objects are frozen
SWEEP_PROBE = """
import gc, sys, weakref
import ger.run.pipeline as pipeline
left = []
class Engine:
    pass
def task(cfg):
    if left:
        gc.collect()
        print("collected", left[-1]() is None, file=sys.stderr)
    engine = Engine()
    engine.me = engine
    left.append(weakref.ref(engine))
    gc.collect()  # it lives through the job, as an engine does: the oldest generation
    print("frozen", gc.get_freeze_count(), file=sys.stderr)
pipeline.prepare = task
from ger.cli import console
console()
"""


def test_a_sweeps_later_jobs_freeze_nothing_so_what_a_job_left_is_collected(tmp_path: Path) -> None:
    lines = probe(tmp_path, SWEEP_PROBE, ["-m", "dataset=demo", "frames=1,2,3"])
    frozen = [int(line.split()[1]) for line in lines if line.startswith("frozen ")]
    # frozen as the first job started, none after (frozen objects freed by reference count leave it)
    assert len(frozen) == 3 and frozen[0] > 20_000 and frozen[0] >= frozen[1] >= frozen[2], lines
    assert [line for line in lines if line.startswith("collected ")] == ["collected True"] * 2, lines
