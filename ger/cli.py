"""The `ger` command.

`run` and `prepare` are Hydra apps (overrides such as `dataset=rafdb frames=8`, `-m` sweeps);
`reproduce`, `datasets` and `report` are plain argparse commands. Bad input (ger.errors.USER_ERRORS)
prints one line and exits 2; `--debug` anywhere on the line, or HYDRA_FULL_ERROR=1, keeps the traceback.
"""

from __future__ import annotations

import argparse
import gc
import os
import select
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ger.errors import USER_ERRORS, one_line, want_traceback

USAGE = """usage: ger COMMAND [ARGS]

commands:
  run        evaluate a model on a test set (Hydra: ger run dataset=demo model=tiny-random-qwen2vl)
  prepare    check a dataset on disk before a run (Hydra: ger prepare dataset=rafdb data_root=/data)
  reproduce  re-score the released GPT-4V predictions and rebuild the paper's tables
  report     collect runs into comparison tables, plots and paired tests
  datasets   list the test sets with their label sets and the paper's numbers

  --debug    show the traceback of an input error (as HYDRA_FULL_ERROR=1 does)
"""


def _hydra_app(task: str, argv: list[str]) -> int:
    """Run a Hydra app over conf/; Hydra parses sys.argv itself, so hand it the rest of the line.

    Hydra catches what the task raises and prints its own trace, so input errors are caught inside
    the task: one line on stderr and exit status 2 (SystemExit passes through Hydra untouched).
    """
    import hydra
    from omegaconf import DictConfig

    from ger.config import conf_dir

    debug = want_traceback(argv)
    argv = [a for a in argv if a != "--debug"]

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def app(cfg: DictConfig) -> None:
        _freeze_the_long_lived()  # Hydra, its modules and the composed config
        from ger.backends import FatalBackendError
        from ger.run import pipeline

        _freeze_the_long_lived()  # ger's modules
        try:
            getattr(pipeline, task)(cfg)
        except (FatalBackendError, *USER_ERRORS) as err:  # one message, no traceback
            if debug:
                raise
            print(one_line(task, err), file=sys.stderr)
            sys.exit(2)

    sys.argv = [f"ger {task}", *argv]
    with _mode_known(argv, conf_dir()):
        app()
    return 0


_PLAIN_FLAGS = ("-m", "--multirun", "-r", "--run")


def _mode_set_by_config(argv: list[str], conf: Path) -> bool:
    """Whether the config could set `hydra.mode` (and so must be composed to learn the run mode): an
    override of hydra.mode, of the search path or of a hydra/ group, a flag that changes where configs
    come from, or a file in conf/ that may set it. When none can, the mode is the command line's."""
    for arg in argv:
        if arg.startswith("-"):
            if arg not in _PLAIN_FLAGS:
                return True
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if key == "hydra" or key.startswith(("hydra/", "hydra.mode", "hydra.searchpath")):
            return True
    for path in conf.rglob("*.yaml"):
        in_hydra = path.parent == conf / "hydra"  # the `hydra` group: its files' top level is hydra's
        if _may_set_mode(path.read_text(encoding="utf-8", errors="replace"), in_hydra):
            return True
    return False


def _may_set_mode(text: str, hydras: bool = False) -> bool:
    """Whether a config file may set hydra.mode: it names hydra.mode or a search path, its top level is
    hydra's (`hydras`, or `# @package hydra`) and has a `mode:` key, or it has a `mode:` key below the
    top level (the top level's is ger's own `mode` option) that is not in a comment. String searches,
    not a regular expression: 0.5 ms for all of conf/, not 4.5."""
    if "hydra.mode" in text or "searchpath" in text:
        return True
    hydras = hydras or _package(text).rpartition(".")[2] == "hydra"
    at = text.find("mode")
    while at >= 0:
        after = text[at + 4 : at + 40].lstrip(" \t")
        line = text[text.rfind("\n", 0, at) + 1 : at]
        if after.startswith(":") and not (line[-1:].isalnum() or line.endswith("_")) and "#" not in line:
            if line or hydras:  # below the top level (indented, or in a flow mapping), or hydra's own
                return True
        at = text.find("mode", at + 4)
    return False


def _package(text: str) -> str:
    """A config file's `# @package` header, as Hydra reads it: among the leading `# @key value` lines."""
    for line in map(str.strip, text.splitlines()):
        if not line:
            continue
        words = line.lstrip("#").split()
        if not line.startswith("#") or not words or not words[0].startswith("@"):
            break
        if words[0] == "@package" and len(words) > 1:
            return words[1]
    return ""


@contextmanager
def _mode_known(argv: list[str], conf: Path) -> Iterator[None]:
    """Skip the composition Hydra makes only to learn the run mode, when nothing but -m can set it.

    hydra.main composes the config twice: once to read `hydra.mode` (Hydra.get_mode), then again to
    run (hydra-ecosystem/hydra#3440). The first costs as much as the second, 0.15-0.3 s on this
    project's 2-core machines, a tenth of a cached rerun of 4,000 images. Where no config or override
    can set the mode, get_mode would find none (None: the command line's -m decides), so it answers
    that without composing; otherwise Hydra's own get_mode runs, as does every other path (--cfg,
    --info). A Hydra without get_mode is left as it is.
    """
    from hydra._internal.hydra import Hydra

    original = getattr(Hydra, "get_mode", None)
    if original is None or _mode_set_by_config(argv, conf):
        yield
        return
    Hydra.get_mode = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        Hydra.get_mode = original  # type: ignore[method-assign]


# set by console() to the freezes of the first task's start: the `ger` program's process is its own
_freezes_left = 0


def _freeze_the_long_lived() -> None:
    """Keep what lives as long as the process out of the collector's passes (gc.freeze).

    A full pass walks every object tracked so far; two of them came during a cached rerun, over
    Hydra's and ger's modules and the config (50,000-90,000 objects): 0.12-0.17 s of a 1.7 s rerun of
    4,000 images here, 0.02 s with those objects frozen. Only in the `ger` program (main() called from a
    caller's Python leaves that process's collector as it is), and only as the first task starts: a
    sweep's later jobs freeze nothing, so what a job leaves in reference cycles (an engine, its
    tensors) is still collected, not kept for good."""
    global _freezes_left
    if _freezes_left > 0:
        _freezes_left -= 1
        gc.freeze()


def cmd_reproduce(argv: list[str]) -> int:
    from ger.report.reference import RELEASE_URL, download_release, score_release, write_results

    parser = argparse.ArgumentParser(
        prog="ger reproduce", description="Re-score the released GPT-4V predictions."
    )
    parser.add_argument(
        "--reference-dir", type=Path, help="the release's results/ folder (default: download it)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("reproduce"), help="output folder (default: reproduce/)"
    )
    parser.add_argument("--url", default=RELEASE_URL, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ref_dir = args.reference_dir or download_release(args.url)
    scores = score_release(ref_dir, args.out)
    write_results(scores, args.out)
    print((args.out / "results.md").read_text())
    print(f"wrote results.json, results.csv, results.md and {len(scores)} runs under {args.out}")
    return 0


def cmd_datasets(argv: list[str]) -> int:
    from ger.data.datasets import all_specs

    parser = argparse.ArgumentParser(prog="ger datasets", description="List the test sets.")
    parser.add_argument("--all", action="store_true", help="include the bundled demo sets")
    args = parser.parse_args(argv)
    fmt = lambda d: ", ".join(f"{k.upper()} {v:.2f}" for k, v in d.items()) or "–"  # noqa: E731
    print("| key | task | input | labels | scoring | GPT-4V (paper) | best supervised |")
    print("|---|---|---|---|---|---|---|")
    for s in all_specs(include_demo=args.all):
        print(
            f"| {s.key} | {s.task} | {s.modality} | {', '.join(s.labels)} | {s.scoring} | "
            f"{fmt(s.paper.gpt4v)} | {fmt(s.paper.supervised)} {s.paper.supervised_method or ''} |"
        )
    return 0


def cmd_report(argv: list[str]) -> int:
    from ger.report.report import cli

    return cli(argv)


COMMANDS = {
    "run": lambda argv: _hydra_app("run", argv),
    "prepare": lambda argv: _hydra_app("prepare", argv),
    "reproduce": cmd_reproduce,
    "report": cmd_report,
    "datasets": cmd_datasets,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}; expected one of {sorted(COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        return 2
    if command in ("run", "prepare"):  # Hydra apps handle input errors inside the task (see _hydra_app)
        return COMMANDS[command](rest) or 0
    debug = want_traceback(rest)
    try:
        return COMMANDS[command]([a for a in rest if a != "--debug"]) or 0
    except USER_ERRORS as err:
        if debug:
            raise
        print(one_line(command, err), file=sys.stderr)
        return 2


def console() -> None:
    """The `ger` program: main(), then an exit that leaves the process's objects to the system.

    At exit the interpreter runs the garbage collector over everything the command left (the modules,
    the config, the samples, torch's objects where a model ran): 0.85 s of a tiny-model run here
    (benchmarks/bench_rerun.py). Frozen, they are freed with the process. Nothing is lost: ger closes
    (and fsyncs) what it writes before main() returns, atexit handlers (logging's flush) still run,
    and objects freed by reference count are finalized as before; only a finalizer of an object in a
    reference cycle is skipped.
    """
    global _freezes_left
    _freezes_left = 2  # Hydra and the config, then ger's modules (_hydra_app)
    try:
        code = main()
        sys.stdout.flush()  # what is still buffered fails here, not in the interpreter's exit
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        code = 1  # `ger datasets | head`: the reader left early, which needs no traceback
    finally:
        gc.freeze()
    sys.exit(code)


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll says POLLERR); if so stdout now goes
    to /dev/null, so that the interpreter's own flush at exit fails no more. A BrokenPipeError from
    anywhere else (a socket) is not this and keeps its traceback."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no stdout, or not a file descriptor
        return False
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return gone


if __name__ == "__main__":
    console()
