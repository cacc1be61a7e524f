"""Import the released GPT-4V predictions as ger runs, and reproduce the paper's tables from them."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ger.answers.parse import LabelMatcher, parse_ranked
from ger.config import cache_dir
from ger.data.datasets import TASK_TITLES, DatasetSpec, all_specs
from ger.files import atomic_write_text
from ger.records import Prediction
from ger.run.predictions import write_predictions
from ger.scoring.metrics import Score

RELEASE_REPO = "zeroQiaoba/gpt4v-emotion"
RELEASE_COMMIT = "82d24bcdba81d722f18e4bf9b157f8b82c8940bc"
RELEASE_URL = f"https://codeload.github.com/{RELEASE_REPO}/tar.gz/{RELEASE_COMMIT}"
_FILE = re.compile(
    r"^label-gpt4v(?:-(?P<suffix>[A-Za-z0-9]+))?\.csv$|^label-(?P<prefix>[A-Za-z0-9]+)-gpt4v\.csv$"
)


@dataclass(frozen=True)
class ReleasedFile:
    folder: str  # results folder, e.g. "rafdb"
    variant: str  # "" | rgb | grey | text | video | multi | 2 | 3 | five | four | three
    path: Path

    @property
    def run_name(self) -> str:
        return f"{self.folder}-{self.variant}" if self.variant else self.folder


def discover(ref_dir: Path) -> list[ReleasedFile]:
    """Every label-gpt4v*.csv and label-*-gpt4v.csv under the release's results folder."""
    if not ref_dir.is_dir():
        raise FileNotFoundError(f"reference folder not found: {ref_dir}")
    found = []
    for path in sorted(ref_dir.glob("*/*.csv")):
        m = _FILE.match(path.name)
        if m:
            found.append(ReleasedFile(path.parent.name, m.group("suffix") or m.group("prefix") or "", path))
    if not found:
        raise FileNotFoundError(
            f"no label-gpt4v*.csv files under {ref_dir}; is it the release's results/ folder?"
        )
    return found


def spec_index(specs: list[DatasetSpec]) -> dict[tuple[str, str], DatasetSpec]:
    """(results folder, variant) -> the test set it belongs to."""
    return {(s.reference.folder, v): s for s in specs if s.reference for v in s.reference.files}


def read_release(path: Path, spec: DatasetSpec) -> list[Prediction]:
    """A released file (name,gt,gpt4v) as ger predictions; the ranked list goes through ger's parser."""
    matcher = LabelMatcher(spec.labels, strict=True)  # the paper's exact matching: its numbers depend on it
    preds, key = [], f"release:{path.parent.name}/{path.name}"
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            parsed = parse_ranked(row.get("gpt4v") or "", matcher)
            preds.append(Prediction(row["name"], row["gt"], parsed.ranked, parsed.status, key, parsed.detail))
    return preds


# The release's code files kept beside results/: its prompts, label lists and batching.
RELEASE_CODE = ("chatgpt.py", "config.py", "main.py")
_KEPT = ".ger-kept"  # written last: lists what the download kept, so a complete cache is never fetched again


def release_cache() -> Path:
    """Where download_release keeps the pinned release: results/ and the code files beside it."""
    return cache_dir() / f"gpt4v-emotion-{RELEASE_COMMIT[:12]}"


def cached_release_dir() -> Path:
    """Where download_release() puts the release's results/ folder."""
    return release_cache() / "results"


class ReleaseNotFound(FileNotFoundError):
    """The release is not where ger looks; the message names each place looked at and the fix."""

    def __init__(self, message: str, looked: list[Path]):
        super().__init__(message)
        self.looked = looked


def find_release(
    given: str | Path | None = None, *, holding: str | None = None, download: bool = False
) -> Path:
    """Where the pinned GPT-4V release is: the one lookup behind scoring views, `ger prepare` and
    prompt_source=release.

    Order: `given` (reference_dir= / release_dir=) alone when set, else $GER_REFERENCE_DIR, else the
    pinned download in the cache, fetched first when `download` (else the caller says how to get it).
    Returns the results/ folder as named: a place named explicitly is never silently replaced.
    holding="chatgpt.py": the checkout folder holding that code file instead (a results/ folder stands
    for the checkout around it); a place without it is passed over, since GER_REFERENCE_DIR often
    names a copy of results/ alone, and the cache's download is tried next.
    """
    env = os.environ.get("GER_REFERENCE_DIR")
    named = (given, "reference_dir") if given else (env, "GER_REFERENCE_DIR") if env else None
    if holding:
        places = ([Path(str(named[0])).expanduser()] if named else []) + ([] if given else [release_cache()])
        folders = [p.parent if p.name == "results" else p for p in places]
        for folder in folders:
            if (folder / holding).is_file():
                return folder
        looked = [f / holding for f in folders]
        raise ReleaseNotFound(f"no {holding} at {', '.join(map(str, looked))}", looked)
    if named:
        path = Path(str(named[0])).expanduser()
        if path.is_dir():
            return path
        raise ReleaseNotFound(f"{named[1]}={named[0]} is not a folder", [path])
    if download:
        return download_release()
    if cached_release_dir().is_dir():
        return cached_release_dir()
    raise ReleaseNotFound(
        "the GPT-4V release was not found: set GER_REFERENCE_DIR to its results/ folder, "
        "or run `ger reproduce` once to download it into the cache",
        [cached_release_dir()],
    )


def release_names(path: Path) -> list[str]:
    """The sample names in one released prediction file: the rows the paper scored."""
    with path.open(newline="", encoding="utf-8") as f:
        return [row["name"].strip() for row in csv.DictReader(f)]


def download_release(url: str = RELEASE_URL, dest: Path | None = None) -> Path:
    """Fetch the pinned release once into the cache and return its results/ folder.

    Keeps results/ and the top-level code files (RELEASE_CODE) that `prompt_source=release`
    reads its prompts from; a cache from before the code was kept is completed by one fetch.
    """
    import tarfile
    import urllib.request  # here, not at the top: every `ger run` imports this module, few download

    dest = dest or release_cache()
    results = dest / "results"
    if results.is_dir() and (dest / _KEPT).is_file():
        return results
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive = Path(tmp) / "release.tar.gz"
        print(f"downloading the GPT-4V release ({RELEASE_REPO}@{RELEASE_COMMIT[:12]}) ...", file=sys.stderr)
        with urllib.request.urlopen(url, timeout=120) as resp, archive.open("wb") as f:
            shutil.copyfileobj(resp, f)
        with tarfile.open(archive) as tar:
            tar.extractall(Path(tmp) / "x", filter="data")
        found = [p for p in (Path(tmp) / "x").glob("*/results") if p.is_dir()]
        if not found:
            raise FileNotFoundError(f"the archive from {url} has no <top>/results folder")
        staged = Path(tmp) / "staged"
        staged.mkdir()
        top = found[0].parent
        shutil.move(str(found[0]), staged / "results")
        kept = [name for name in RELEASE_CODE if (top / name).is_file()]
        for name in kept:
            shutil.move(str(top / name), staged / name)
        if not dest.exists():
            staged.rename(dest)  # atomic: a crash never leaves a half-extracted cache
        else:  # an older download without the code: complete it, one atomic move per entry
            if not results.is_dir():
                (staged / "results").rename(results)
            for name in kept:
                (staged / name).replace(dest / name)
        atomic_write_text(dest / _KEPT, "\n".join(["results", *kept]) + "\n")
    return results


def score_release(ref_dir: Path, out: Path | None = None) -> list[Score]:
    """Score every released file; with `out`, also write each as a run folder under out/runs."""
    from ger.scoring.views import PaperRows, score_views  # views reads release files through this module

    index = spec_index(all_specs())
    itself = PaperRows(None, note="this run's rows are the paper's rows (the release file itself)")
    scores = []
    for rf in discover(ref_dir):
        spec = index.get((rf.folder, rf.variant))
        if spec is None:
            print(f"warning: no dataset config for {rf.path.name} in {rf.folder}; skipped", file=sys.stderr)
            continue
        preds = read_release(rf.path, spec)
        s = score_views(preds, spec, itself, rf.variant)  # + MER2023's lenient view in metrics.json
        s.dataset = rf.folder
        scores.append(s)
        if out is not None:
            run = out / "runs" / rf.run_name
            run.mkdir(parents=True, exist_ok=True)
            write_predictions(run / "predictions.csv", preds)
            meta = {**s.to_dict(), "model": "gpt4v-release", "overrides": [f"reference={rf.path.name}"]}
            atomic_write_text(run / "metrics.json", json.dumps(meta, indent=2))
    return scores


def paper_tables_markdown(scores: list[Score]) -> str:
    """The paper's Tables 3-7: paper vs re-scored vs best supervised, per task."""
    specs = {s.key: s for s in all_specs()}
    lines = ["# GPT-4V, re-scored from the release", ""]
    for task, title in TASK_TITLES.items():
        cols = [
            (sc, specs[sc.test_set], m)
            for sc in scores
            for m in sc.values
            if specs[sc.test_set].task == task
            and specs[sc.test_set].reference
            and sc.variant == specs[sc.test_set].reference.paper_variant
        ]
        if not cols:
            continue
        head = [f"{spec.title} {m.upper()}" for _, spec, m in cols]
        fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        rows = [
            ("GPT-4V (paper)", [sp.paper.gpt4v.get(m) for _, sp, m in cols]),
            ("GPT-4V (re-scored here)", [sc.values[m] for sc, _, m in cols]),
            ("Best supervised", [sp.paper.supervised.get(m) for _, sp, m in cols]),
            (
                "Re-scored − paper",
                [
                    None if sp.paper.gpt4v.get(m) is None else round(sc.values[m] - sp.paper.gpt4v[m], 2)
                    for sc, sp, m in cols
                ],
            ),
        ]
        lines += [f"## {title}", "", "| | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        lines += ["| " + name + " | " + " | ".join(fmt(v) for v in vals) + " |" for name, vals in rows]
        lines.append("")
    lines += [
        "## Every released file",
        "",
        "| dataset | variant | metric | re-scored | paper | n | parse failures |",
        "|---|---|---|---|---|---|---|",
    ]
    for sc in scores:
        for rec in sc.records():
            paper = "–" if rec["paper"] is None else f"{rec['paper']:.2f}"
            lines.append(
                f"| {sc.dataset} | {sc.variant or '–'} | {rec['metric']} | {rec['value']:.2f} | {paper} | "
                f"{sc.n} | {sc.failures} |"
            )
    return "\n".join(lines) + "\n"


def write_results(scores: list[Score], out: Path) -> None:
    """results.json (records), results.csv (the same rows) and results.md (the paper's tables)."""
    out.mkdir(parents=True, exist_ok=True)
    records = [r for sc in scores for r in sc.records()]
    atomic_write_text(out / "results.json", json.dumps(records, indent=2))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["dataset", "variant", "metric", "value", "n", "paper"])
        writer.writeheader()
        writer.writerows(records)
    atomic_write_text(out / "results.md", paper_tables_markdown(scores))
