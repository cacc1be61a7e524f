"""Indexing a raw dataset download: ger's one scandir walk vs the usual ways of finding files.

Run by hand:  python benchmarks/bench_raw_index.py [--files 200000] [--keep DIR]

Generates a tree of empty files shaped like a frame-folder download (scene / clip / frame.jpg,
plus some .txt/.json noise), then times, best of 3 on a warm page cache:
  - ger:       `ger.data.raw_index.build_index` (the walk `ger prepare source=` does once), keying
               the frame folders (FERV39k-style) and, second, every image file (image sets);
  - os.walk:   os.walk + os.stat of every file (a plain Python indexer);
  - glob:      one recursive `glob` per sample name, as a per-sample search does; timed on
               20 names and scaled to a 3,068-sample set (RAF-DB's test list).
Prints files per second and the ratios.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ger.data.media import IMAGE_EXTENSIONS  # noqa: E402
from ger.data.raw_index import build_index  # noqa: E402

SAMPLES = 3068  # RAF-DB's test list: the per-sample search does this many globs


def make_tree(root: Path, files: int, per_folder: int = 50) -> list[str]:
    """`files` empty files in scene/clip folders; returns the clip names."""
    clips = []
    n = 0
    while n < files:
        c = len(clips)
        clip = f"clip{c:06d}"
        folder = root / f"scene{c % 40:02d}" / f"sub{c % 7}" / clip
        folder.mkdir(parents=True)
        for j in range(min(per_folder, files - n)):
            ext = ".jpg" if j % 10 else (".JSON" if j % 20 else ".txt")
            (folder / f"{j:05d}{ext}").touch()
        n += per_folder
        clips.append(clip)
    return clips


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def os_walk_stat(root: Path) -> int:
    n = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            os.stat(os.path.join(dirpath, name))
            n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="build the tree here and keep it (default: a temp folder)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="ger-bench-raw-"))
    try:
        t = time.perf_counter()
        clips = make_tree(root / "tree", args.files) if not (root / "tree").exists() else []
        print(f"tree: {args.files} files under {root / 'tree'} (made in {time.perf_counter() - t:.1f} s)")
        tree = root / "tree"

        index = build_index(tree, extensions=IMAGE_EXTENSIONS, frames=True)
        assert index.files == args.files, (index.files, args.files)
        t_ger = best(lambda: build_index(tree, extensions=IMAGE_EXTENSIONS, frames=True), args.repeat)
        t_files = best(lambda: build_index(tree, extensions=IMAGE_EXTENSIONS), args.repeat)
        t_walk = best(lambda: os_walk_stat(tree), args.repeat)
        names = (clips or [f"clip{i:06d}" for i in range(20)])[:20]
        t_glob20 = best(lambda: [glob.glob(f"{tree}/**/{n}*", recursive=True) for n in names], 1)
        t_glob = t_glob20 / len(names) * SAMPLES

        rate = args.files / t_ger
        print(f"ger build_index (one scandir walk): {t_ger:.2f} s  -> {rate:,.0f} files/s")
        print(f"ger build_index, every image keyed: {t_files:.2f} s  -> {args.files / t_files:,.0f} files/s")
        print(f"os.walk + stat of every file:       {t_walk:.2f} s  -> {args.files / t_walk:,.0f} files/s")
        print(f"  ratio: ger is {t_walk / t_ger:.1f}x faster than os.walk+stat")
        print(
            f"per-sample recursive glob: {t_glob20:.2f} s for {len(names)} names -> "
            f"{t_glob:.0f} s for {SAMPLES} samples (extrapolated)"
        )
        print(
            f"  ratio: ger is {t_glob / t_ger:.0f}x faster than a glob per sample on a {SAMPLES}-sample set"
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
