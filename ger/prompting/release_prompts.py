"""`prompt_source=release`: the pinned release's own prompt strings, read at run time from its code.

The repository holds no copy of the release's wording; this module reads it from the
release's `chatgpt.py` (conf/release_prompts.yaml names the function per ger template).
Each function builds its instruction as one f-string; `ast` finds it (the code is parsed,
never executed) and its expressions become ger's placeholders: `len(<batch>)` -> {count},
`samplenum` -> {frames}, and the candidate list is written as the release wrote it
(`f"{candidate_list}"` of a Python list, e.g. ['happy', 'sad']). What stays ger's: the
release sends nothing before each image and each transcript as its own text part, and
ger joins adjacent text parts with a blank line.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import yaml

from ger.config import conf_dir
from ger.prompting.templates import PromptTemplate, load_template, placeholders
from ger.report.reference import RELEASE_COMMIT, RELEASE_REPO, ReleaseNotFound, find_release, release_cache

PROMPT_SOURCES = ("ours", "release")


def _conf() -> dict[str, Any]:
    """conf/release_prompts.yaml: the release file and the function behind each ger template."""
    return yaml.safe_load((conf_dir() / "release_prompts.yaml").read_text(encoding="utf-8"))


class ReleaseCodeMissing(FileNotFoundError):
    """The release's code is not on this machine; the message says where ger looked and how to fix it."""


def find_release_code(release_dir: str | Path | None = None) -> Path:
    """The folder with the release's chatgpt.py: release_dir if set, else $GER_REFERENCE_DIR or the cache."""
    name = _conf()["file"]
    try:
        return find_release(release_dir, holding=name)
    except ReleaseNotFound as missing:
        raise ReleaseCodeMissing(
            f"prompt_source=release reads the prompts from the release's code ({RELEASE_REPO}@"
            f"{RELEASE_COMMIT[:12]}, {name}), which is not on this machine; looked for "
            f"{', '.join(str(p) for p in missing.looked)}. Fix: run `ger reproduce` without --reference-dir "
            f"once (it downloads the release with its code into {release_cache()}), or point release_dir=... "
            "(or GER_REFERENCE_DIR) at a checkout of that commit (its root or its results/ folder), "
            "or use prompt_source=ours"
        ) from None


def _instruction(source: str, function: str, where: str) -> tuple[ast.JoinedStr, list[str]]:
    """The f-string of `function`'s text prompt part, and the function's parameter names."""
    tree = ast.parse(source, filename=where)
    funcs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    if function not in funcs:
        raise ValueError(f"{where}: no function {function!r}; it defines {sorted(funcs)}")
    found = [
        value
        for node in ast.walk(funcs[function])
        if isinstance(node, ast.Dict)
        for key, value in zip(node.keys, node.values, strict=True)
        if isinstance(key, ast.Constant) and key.value == "text" and isinstance(value, ast.JoinedStr)
    ]
    if found:  # the first in the source: the instruction, before any per-sample text part
        return min(found, key=lambda v: (v.lineno, v.col_offset)), [a.arg for a in funcs[function].args.args]
    raise ValueError(f"{where}: {function} builds no {{'text': f'...'}} prompt part")


def _as_template(fstring: ast.JoinedStr, params: list[str], labels: list[str], where: str) -> str:
    """The f-string with its expressions as ger placeholders and the candidate list written out."""
    batch, candidates = params[0], params[1]
    out = []
    for part in fstring.values:
        if isinstance(part, ast.Constant):
            clash = placeholders(part.value)
            if clash:
                raise ValueError(f"{where}: literal text {sorted(clash)} would read as ger placeholders")
            out.append(part.value)
            continue
        assert isinstance(part, ast.FormattedValue)
        expr = part.value
        if part.conversion != -1 or part.format_spec is not None:
            raise ValueError(
                f"{where}: formatted field {ast.unparse(expr)!r} has a conversion or format spec"
            )
        if isinstance(expr, ast.Call) and ast.unparse(expr) == f"len({batch})":
            out.append("{count}")
        elif isinstance(expr, ast.Name) and expr.id == candidates:
            out.append(str(list(labels)))  # what f"{candidate_list}" gives for the release's list
        elif isinstance(expr, ast.Name) and expr.id == "samplenum":
            out.append("{frames}")
        else:
            raise ValueError(f"{where}: unexpected expression {{{ast.unparse(expr)}}} in the prompt")
    return "".join(out)


def release_template(name: str, labels: list[str], release_dir: str | Path | None = None) -> PromptTemplate:
    """The release's prompt for ger template `name` and this label set, as a PromptTemplate.

    Batch mode sends the instruction, then each sample's media (transcripts as their own text);
    single mode is the release's prompt for a batch of one.
    """
    conf = _conf()
    functions = conf["functions"]
    if name not in functions:
        raise ValueError(
            f"prompt_source=release has no release prompt for template {name!r}; "
            f"it knows {sorted(functions)} (conf/release_prompts.yaml)"
        )
    path = find_release_code(release_dir) / conf["file"]
    fstring, params = _instruction(path.read_text(encoding="utf-8"), functions[name], str(path))
    instruction = _as_template(fstring, params, labels, f"{path}:{functions[name]}")
    transcript = load_template(name).uses_transcript  # the release sends each transcript as a text part
    return PromptTemplate(
        name=f"release:{name}",
        single=instruction + ("\n\n{transcript}" if transcript else ""),
        batch=instruction,
        item="{transcript}" if transcript else "",
        description=f"{RELEASE_REPO}@{RELEASE_COMMIT[:12]} {conf['file']}:{functions[name]}",
    )


def select_template(
    name: str, labels: list[str], source: str, release_dir: str | Path | None
) -> PromptTemplate:
    """conf/prompts/<name>.yaml (`ours`) or the release's own strings for it (`release`)."""
    if source == "ours":
        return load_template(name)
    if source == "release":
        return release_template(name, labels, release_dir)
    raise ValueError(f"unknown prompt_source {source!r}; expected one of {list(PROMPT_SOURCES)}")
