"""The docs name only what exists: every repository path, `ger.` module and layout-table module in
README.md and docs/*.md is in the tree, so a moved or deleted module cannot leave the docs behind."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# A repository path: not inside a longer path (/data/ger/rafdb/ is a user's data folder, not ours).
PATH = re.compile(r"(?<![\w/.~-])((?:ger|tests|benchmarks|launch|conf)/[\w/.<>{}*-]*[\w/>*}])")
MODULE = re.compile(r"`(ger(?:\.\w+)+)")  # `ger.data.video.probe`: a module, or a module's name
LAYOUT_ROW = re.compile(r"`(ger/\w+/)`:")  # README's layout table: "`ger/data/`: `layout.py` (...), ..."


def named(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    return sorted({(doc.name, m) for doc in DOCS for m in pattern.findall(doc.read_text())})


def is_placeholder(path: str) -> bool:
    """conf/model/<name>.yaml, conf/prompts/*.yaml, conf/model/MODEL.yaml: a pattern, not a file."""
    stem = Path(path).stem
    return any(c in path for c in "<>{}*") or (stem.isupper() and len(stem) > 1)


@pytest.mark.parametrize(("doc", "path"), [p for p in named(PATH) if not is_placeholder(p[1])])
def test_every_path_named_in_the_docs_exists(doc: str, path: str) -> None:
    assert (REPO / path.rstrip(".")).exists(), f"{doc} names {path}, which is not in the repository"


def top_level_names(module: Path) -> set[str]:
    """Functions, classes and assigned names at a module's top level (read with ast, not imported)."""
    names: set[str] = set()
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


@pytest.mark.parametrize(("doc", "dotted"), named(MODULE))
def test_every_module_named_in_the_docs_exists(doc: str, dotted: str) -> None:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):  # the longest prefix that is a package or a module
        base = REPO.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            rest = parts[cut:]
            assert len(rest) <= 1, f"{doc} names {dotted}: {'.'.join(rest)} is not a module of {module}"
            assert not rest or rest[0] in top_level_names(module), f"{doc} names {dotted}: not in {module}"
            return
    pytest.fail(f"{doc} names {dotted}, which is no module of the repository")


def layout_rows() -> list[tuple[str, str]]:
    found = []
    for line in (REPO / "README.md").read_text().splitlines():
        for package in LAYOUT_ROW.findall(line):
            found += [(package, m) for m in re.findall(r"`(\w+\.py)`", line)]
    return found


def test_the_readme_layout_table_names_modules_of_its_packages() -> None:
    rows = layout_rows()
    assert len({p for p, _ in rows}) >= 7, "README's layout table lost its `ger/<stage>/`: rows"
    missing = [f"{package}{m}" for package, m in rows if not (REPO / package / m).is_file()]
    assert not missing, f"README's layout table names modules that are not there: {missing}"
