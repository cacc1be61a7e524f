"""The `ger` program around main(): how it exits (ger/cli.py console)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

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
