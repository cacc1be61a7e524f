"""The frame contract on a corpus of clips in every container/codec class datasets ship in.

Frame k must be the k-th frame a player shows. Ground truth, independent of ger's reader:
PyAV decoding every frame in order (turned by numpy as the display matrix says), the frame
count of the ffmpeg command line, and the index each frame shows in its picture (ger/testing/clips.py).
"""

from __future__ import annotations

import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ger.data.media import MediaError, read_frames, sample_frames, sample_indices, video_info
from ger.data.video import DECODE, DECORD, probe
from ger.testing.clips import CORPUS, ffmpeg_exe, make_corpus, read_index, skip_without_decord

av = pytest.importorskip("av")
skip_without_decord()
pytest.importorskip("imageio_ffmpeg")

COUNTS = (1, 3, 8, 16)
TOLERANCE = 3  # max |difference| of a pixel between decord's ffmpeg and PyAV's; a wrong frame differs by ~255
NAMES = [spec.name for spec in CORPUS]


@dataclass
class Truth:
    path: Path
    frames: list[np.ndarray]  # RGB, as displayed (rotated)
    shown: list[int]  # the index each frame shows in its picture


def cli_count(path: Path) -> int:
    """Frames the ffmpeg command line decodes (a second, separate program)."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:v:0", "-fps_mode",
           "passthrough", "-f", "null", "-"]  # fmt: skip
    err = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return int(re.findall(r"frame=\s*(\d+)", err)[-1])


def decode_all(path: Path) -> Truth:
    frames, shown = [], []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            rgb = frame.to_ndarray(format="rgb24")
            shown.append(read_index(rgb))
            turns = round(frame.rotation) // 90 % 4  # counter-clockwise, as np.rot90
            frames.append(np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb)
    return Truth(path, frames, shown)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], dict[str, str]]:
    return make_corpus(tmp_path_factory.mktemp("frames-corpus"))


@pytest.fixture(scope="session")
def truths(corpus: tuple[dict[str, Path], dict[str, str]]) -> dict[str, Truth]:
    return {name: decode_all(path) for name, path in corpus[0].items()}


@pytest.fixture
def truth(request: pytest.FixtureRequest, corpus, truths: dict[str, Truth]) -> Truth:
    name = request.param
    if name in corpus[1]:
        pytest.skip(f"{name}: {corpus[1][name]}")
    return truths[name]


def assert_same(got: list, indices: list[int], truth: Truth) -> None:
    for k, (image, i) in enumerate(zip(got, indices, strict=True)):
        a, b = np.asarray(image), truth.frames[i]
        assert a.shape == b.shape, f"{truth.path.name} frame {i}: shape {a.shape} vs {b.shape}"
        diff = int(np.abs(a.astype(np.int16) - b).max())
        assert diff <= TOLERANCE, (
            f"{truth.path.name}: position {k} should be frame {i}; max difference {diff}"
        )


def test_corpus_is_sound(truths: dict[str, Truth]) -> None:
    """The ground truth itself: frames show increasing indices, all of them where nothing was cut."""
    cut = {"edit_list.mp4", "edit_list_both_ends.mp4", "edit_list_open_gop.mp4", "cut.mkv", "vfr.mp4"}
    for name, t in truths.items():
        assert t.shown == sorted(set(t.shown)), name
        if name not in cut:
            spec = next(s for s in CORPUS if s.name == name)
            assert t.shown == list(range(spec.frames)), name
    if "edit_list.mp4" in truths:
        edited = truths["edit_list.mp4"].shown
        assert edited[0] > 0 and edited == list(range(edited[0], edited[0] + len(edited)))


@pytest.mark.parametrize("truth", NAMES, indirect=True)
def test_video_info_counts_displayed_frames(truth: Truth) -> None:
    n, fps = video_info(truth.path)
    assert n == len(truth.frames) == cli_count(truth.path)
    if truth.path.stem != "vfr":
        assert fps == 25.0


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("sampler", ["paper", "uniform"])
@pytest.mark.parametrize("truth", NAMES, indirect=True)
def test_sampled_frames_are_exact(truth: Truth, sampler: str, count: int) -> None:
    frames, indices, n, _ = sample_frames(truth.path, count, sampler)
    assert n == len(truth.frames)
    assert indices == sample_indices(len(truth.frames), count, sampler)
    assert_same(frames, indices, truth)


@pytest.mark.parametrize("truth", NAMES, indirect=True)
def test_read_frames_any_order_and_repeats(truth: Truth) -> None:
    n = len(truth.frames)
    rng = random.Random(n)
    sets = [[0], [n - 1], [n - 1, 0, n - 1, n // 2]] + [rng.choices(range(n), k=k) for k in (3, 8, 16)]
    for indices in sets:
        assert_same(read_frames(truth.path, indices), indices, truth)
    with pytest.raises(MediaError, match=rf"\[{n}\] out of range .*\({n} frames\)"):
        read_frames(truth.path, [0, n])


EXPECTED_READER = {
    "h264_closed.mp4": DECORD,
    "h264_closed.mkv": DECORD,
    "hevc_closed.mp4": DECORD,
    "vp9.webm": DECORD,
    "start_offset.mp4": DECORD,
    "h264_bframes.avi": DECODE,
    "h264_no_bframes.avi": DECODE,
    "xvid_bframes.avi": DECODE,
    "mpeg4_bframes.mp4": DECODE,
    "h264_open_gop.mp4": DECODE,
    "hevc_open_gop.mp4": DECODE,
    "edit_list.mp4": DECODE,
}


@pytest.mark.parametrize(("name", "reader"), EXPECTED_READER.items())
def test_reader_chosen_from_the_container(corpus, name: str, reader: str) -> None:
    """Seeking only where the container proves it exact; the fast path stays in use."""
    if name in corpus[1]:
        pytest.skip(corpus[1][name])
    assert probe(corpus[0][name]).reader == reader


def _decord_shown(path: Path, indices: list[int]) -> list[int]:
    from ger.data.video import _import_decord

    decord = _import_decord()
    batch = decord.VideoReader(str(path), num_threads=1).get_batch(indices).asnumpy()
    return [read_index(frame) for frame in batch]


def test_plain_decord_seek_is_wrong_on_h264_in_avi(truths: dict[str, Truth]) -> None:
    """The old reader (decord's seek) on H.264 in AVI returns other frames: what this module guards."""
    truth = truths["h264_bframes.avi"]
    indices = [30, 60, 90, 120]
    assert [truth.shown[i] for i in indices] == indices
    assert _decord_shown(truth.path, indices) != indices
    assert [read_index(np.asarray(f)) for f in read_frames(truth.path, indices)] == indices


def test_plain_decord_counts_edit_list_frames_not_shown(truths: dict[str, Truth]) -> None:
    from ger.data.video import _import_decord

    truth = truths["edit_list.mp4"]
    assert len(_import_decord().VideoReader(str(truth.path), num_threads=1)) > len(truth.frames)
    assert video_info(truth.path)[0] == len(truth.frames)


def test_prepare_reports_containers_codecs_and_readers(corpus, truths: dict[str, Truth]) -> None:
    """`ger prepare` (check_dataset) says per container/codec how the frames will be read."""
    from ger.data.datasets import load_spec
    from ger.data.validate import check_dataset
    from ger.records import Sample

    spec = load_spec("demo_video")
    names = ["h264_closed.mp4", "start_offset.mp4", "h264_bframes.avi", "xvid_bframes.avi", "edit_list.mp4"]
    samples = [Sample(spec.key, n, "happy", corpus[0][n]) for n in names]
    report = check_dataset(spec, samples, media=True)
    # the cut keeps the frames from the keyframe before it (one every 24) for decoding only
    dropped = truths["edit_list.mp4"].shown[0] % 24
    assert report.problems == 0
    assert report.video_kinds == {
        ("mov/h264", "decord (seek)"): 2,
        ("avi/h264", "in-order decode (avi container: no reliable presentation times)"): 1,
        ("avi/mpeg4", "in-order decode (avi container: no reliable presentation times)"): 1,
        ("mov/h264", f"in-order decode (edit list: {dropped} coded frames not shown)"): 1,
    }
    summary = report.summary()
    assert "    mov/h264: 2 files, decord (seek)" in summary.splitlines()


@pytest.mark.parametrize(
    ("pts", "keys", "clean"),
    [
        ([0, 3, 1, 2, 4, 7, 5, 6], [0, 4], True),  # closed GOPs with B-frames (coded I P B B)
        ([0, 3, 1, 2, 6, 4, 5, 7], [0, 4], False),  # open GOP: 4 and 5 shown before key 6, coded after
        ([0, 5, 1, 2, 4, 3, 6], [0, 4], False),  # 5 coded before key 4 but shown after it
        ([0, 1, 2, 3], [0, 2], True),  # no B-frames
        ([2, 0, 1, 3], [0], False),  # first key not shown first (leading frames after it)
    ],
)  # fmt: skip
def test_clean_cuts_table(pts: list[int], keys: list[int], clean: bool) -> None:
    from ger.data.video import _clean_cuts

    assert _clean_cuts(pts, [i in keys for i in range(len(pts))]) is clean


CUT_KEEPING_THE_INDEX = ["h264_closed.mp4", "mpeg4_bframes.mp4", "h264_bframes.avi", "xvid_bframes.avi",
                         "mjpeg.avi", "audio.mp4"]  # fmt: skip


@pytest.mark.parametrize("name", CUT_KEEPING_THE_INDEX)
def test_a_cut_file_whose_index_survived_is_an_error_not_a_shorter_clip(
    corpus, tmp_path: Path, name: str
) -> None:
    """A download cut short keeps its index where the index comes first (an mp4 written for streaming,
    -movflags +faststart) or is not needed (an AVI is read without it): the frames left are readable,
    and would be sampled as if they were the whole clip. The container's own frame count tells."""
    source = corpus[0][name]
    if source.suffix == ".mp4":  # the index moved to the front, as web and streaming exports have it
        streaming = tmp_path / name
        cmd = [ffmpeg_exe(), "-loglevel", "error", "-i", str(source), "-c", "copy", "-movflags", "+faststart"]
        subprocess.run([*cmd, str(streaming)], check=True)
        source = streaming
    data = source.read_bytes()
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with av.open(str(cut)) as container:  # the container opens and still declares the whole clip
        declared = container.streams.video[0].frames
    assert declared == next(s.frames for s in CORPUS if s.name == name)
    for read in (video_info, lambda p: sample_frames(p, 3, "paper"), lambda p: read_frames(p, [0])):
        with pytest.raises(MediaError, match=f"video is truncated: .* declares {declared} frames"):
            read(cut)
