"""The generated demo test sets: present, valid against their YAML, loadable, deterministic, idempotent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ger.data import demo
from ger.data.datasets import load_samples, load_spec, read_label_list
from ger.data.media import load_sample
from ger.testing.clips import skip_without_decord

pytest.importorskip("cv2")
skip_without_decord()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    assert demo.ensure_demo(root) == root
    return root


@pytest.mark.parametrize(("key", "n"), [("demo", 14), ("demo_video", 7), ("demo_multimodal", 6)])
def test_demo_sets_match_their_specs(root: Path, key: str, n: int) -> None:
    spec = load_spec(key)
    assert spec.demo
    rows = read_label_list(root / key / spec.layout.label_file)
    assert len(rows) == n
    assert {gt for _, gt in rows} == set(spec.labels)  # every label present, none outside the set
    assert all(gt not in name for name, gt in rows)  # names go into batch prompts: no label leak
    samples = load_samples(spec, root)
    with_text = spec.layout.transcript_dir is not None
    for s in samples:
        loaded = load_sample(s, spec.layout.media_kind, frames=3, with_text=with_text)
        assert len(loaded.images) == (1 if spec.modality == "image" else 3)
        if spec.modality != "image":
            assert 24 <= loaded.source_frames <= 40 and loaded.source_fps == demo.FPS
            assert loaded.images[0].size == (160, 120)
        if with_text:
            assert loaded.text == demo.TRANSCRIPTS[s.gt]


def test_demo_faces_differ_by_label() -> None:
    faces = {label: np.asarray(demo.draw_face((96, 96), label, variant=0)) for label in demo.FACIAL_LABELS}
    for a in demo.FACIAL_LABELS:
        for b in demo.FACIAL_LABELS:
            if a < b:
                assert (faces[a] != faces[b]).any(), (a, b)
    neutral = np.asarray(demo.draw_face((96, 96), "happy", intensity=0.0, variant=0))
    assert (neutral == faces["neutral"]).all()  # intensity 0 is the neutral face


def test_demo_is_idempotent_and_regenerates_when_incomplete(root: Path) -> None:
    label = root / "demo" / "label.csv"
    stamp = label.stat().st_mtime_ns
    demo.ensure_demo(root)
    assert label.stat().st_mtime_ns == stamp  # complete: nothing rewritten
    (root / demo.MARKER).unlink()  # as if interrupted before the end
    label.unlink()
    demo.ensure_demo(root)
    assert label.is_file() and demo.is_complete(root)


def test_demo_is_deterministic(root: Path, tmp_path: Path) -> None:
    demo.ensure_demo(tmp_path)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix != ".mp4":  # video bytes depend on the encoder build; pixels are checked below
            assert (root / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    clip = Path("demo_video/videos/clip_01.mp4")
    a = load_sample(load_samples(load_spec("demo_video"), root)[0], "video")
    b = load_sample(load_samples(load_spec("demo_video"), tmp_path)[0], "video")
    assert a.sample.media.name == clip.name
    assert all((np.asarray(x) == np.asarray(y)).all() for x, y in zip(a.images, b.images, strict=True))
