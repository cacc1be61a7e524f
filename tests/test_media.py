"""The sample loader: frame sampling tables, frame-exact decoding, grids, transcripts, bad input."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from ger.data import media
from ger.data.media import (
    MediaError,
    file_digest,
    load_image,
    load_sample,
    read_frames,
    sample_indices,
    video_info,
)
from ger.data.transcripts import load_transcript
from ger.prompting.grids import grid_shape, make_grid
from ger.records import Sample
from ger.testing.clips import skip_without_decord

cv2 = pytest.importorskip("cv2")
skip_without_decord()

BITS, W, H = 8, 160, 120  # frame i shows the 8 bits of i as black/white stripes


def index_frame(i: int) -> np.ndarray:
    """A frame that encodes its own index robustly enough to survive lossy codecs."""
    frame = np.zeros((H, W, 3), np.uint8)
    stripe = W // BITS
    for b in range(BITS):
        if (i >> b) & 1:
            frame[:, b * stripe : (b + 1) * stripe] = 255
    return frame


def decode_index(image: Image.Image) -> int:
    a = np.asarray(image.convert("L"), dtype=np.float32)
    stripe = W // BITS
    bits = [a[H // 4 : 3 * H // 4, b * stripe + 4 : (b + 1) * stripe - 4].mean() > 128 for b in range(BITS)]
    return sum(1 << b for b, on in enumerate(bits) if on)


def write_index_video(path: Path, n: int, fourcc: str = "mp4v", fps: float = 25.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (W, H))
    assert writer.isOpened(), f"OpenCV cannot write {fourcc}"
    for i in range(n):
        writer.write(index_frame(i))
    writer.release()
    return path


def write_index_h264(path: Path, n: int, fps: int = 25) -> Path:
    """H.264 with x264's defaults (long GOP, B-frames): where seeking readers go wrong."""
    import subprocess

    ffmpeg = pytest.importorskip("imageio_ffmpeg").get_ffmpeg_exe()
    cmd = [ffmpeg, "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24",
           "-s", f"{W}x{H}", "-r", str(fps), "-i", "-", "-c:v", "libx264",
           "-g", "40", "-bf", "3", "-sc_threshold", "0", "-pix_fmt", "yuv420p", str(path)]  # fmt: skip
    frames = b"".join(index_frame(i).tobytes() for i in range(n))
    subprocess.run(cmd, input=frames, check=True)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {
        "mp4": write_index_video(d / "clip.mp4", 97, "mp4v"),
        "avi": write_index_video(d / "clip.avi", 61, "MJPG", fps=30.0),
    }


# ---------------------------------------------------------------- sample_indices

PAPER_CASES = [  # (n_frames, count, expected): trim to a multiple of count, step n // count
    (9, 3, [0, 3, 6]),
    (10, 3, [0, 3, 6]),
    (11, 3, [0, 3, 6]),
    (12, 3, [0, 4, 8]),
    (75, 3, [0, 25, 50]),
    (100, 3, [0, 33, 66]),
    (3, 3, [0, 1, 2]),
    (2, 3, [0, 1, 1]),  # shorter than count: repeat the last frame
    (1, 3, [0, 0, 0]),
    (4, 6, [0, 1, 2, 3, 3, 3]),
    (5, 1, [0]),
    (100, 8, [0, 12, 24, 36, 48, 60, 72, 84]),
    (16, 8, [0, 2, 4, 6, 8, 10, 12, 14]),
]
UNIFORM_CASES = [  # midpoints of count equal segments, floored
    (9, 3, [1, 4, 7]),
    (10, 3, [1, 5, 8]),
    (100, 3, [16, 50, 83]),
    (8, 2, [2, 6]),
    (4, 4, [0, 1, 2, 3]),
    (5, 1, [2]),
    (2, 3, [0, 1, 1]),
    (1, 3, [0, 0, 0]),
]


@pytest.mark.parametrize(("n", "count", "expected"), PAPER_CASES)
def test_paper_sampler_table(n: int, count: int, expected: list[int]) -> None:
    assert sample_indices(n, count, "paper") == expected


@pytest.mark.parametrize(("n", "count", "expected"), UNIFORM_CASES)
def test_uniform_sampler_table(n: int, count: int, expected: list[int]) -> None:
    assert sample_indices(n, count, "uniform") == expected


@given(st.integers(1, 5000), st.integers(1, 64), st.sampled_from(media.SAMPLERS))
def test_sampler_invariants(n: int, count: int, sampler: str) -> None:
    idx = sample_indices(n, count, sampler)
    assert len(idx) == count
    assert all(0 <= i < n for i in idx)
    assert idx == sorted(idx)
    if n >= count:
        assert len(set(idx)) == count  # no repeated frame while the clip is long enough


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(MediaError, match="no frames"):
        sample_indices(0, 3, "paper")
    with pytest.raises(ValueError, match=">= 1"):
        sample_indices(10, 0, "paper")
    with pytest.raises(ValueError, match=r"expected one of \['paper', 'uniform'\]"):
        sample_indices(10, 3, "random")


# ---------------------------------------------------------------- frame-exact decoding


@pytest.mark.parametrize("kind", ["mp4", "avi"])
def test_video_info(videos: dict[str, Path], kind: str) -> None:
    n, fps = video_info(videos[kind])
    assert (n, fps) == ((97, 25.0) if kind == "mp4" else (61, 30.0))


@pytest.mark.parametrize("kind", ["mp4", "avi", "h264"])
def test_read_frames_returns_exactly_the_requested_frames(
    videos: dict[str, Path], kind: str, tmp_path: Path
) -> None:
    path = write_index_h264(tmp_path / "clip.mp4", 150) if kind == "h264" else videos[kind]
    n, _ = video_info(path)
    rng = random.Random(7)
    index_sets = [
        [0],
        [n - 1],
        [0, n // 3, 2 * n // 3],
        [n - 1, 0, n - 1, 5],
    ]  # unsorted, repeats, last frame
    index_sets += [rng.sample(range(n), k) for k in (3, 5, 8, 16) for _ in range(3)]
    for indices in index_sets:
        frames = read_frames(path, indices)
        assert [decode_index(f) for f in frames] == indices
        assert all(f.mode == "RGB" and f.size == (W, H) for f in frames)


def test_read_frames_rejects_out_of_range(videos: dict[str, Path]) -> None:
    with pytest.raises(MediaError, match=r"\[97\] out of range .*97 frames"):
        read_frames(videos["mp4"], [0, 97])
    with pytest.raises(MediaError, match="out of range"):
        read_frames(videos["mp4"], [-1])


def test_frame_folder_is_a_video(tmp_path: Path) -> None:
    folder = tmp_path / "clip"
    folder.mkdir()
    for i in range(12):  # natural order: frame_2 comes before frame_10
        Image.fromarray(index_frame(i)).save(folder / f"frame_{i}.png")
    (folder / "notes.txt").write_text("not a frame")
    # what a Mac leaves beside each file on a drive it does not format (AppleDouble), and thumbnails
    for i in range(12):
        (folder / f"._frame_{i}.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    (folder / ".thumb.png").write_bytes(b"")
    assert video_info(folder) == (12, None)
    assert [decode_index(f) for f in read_frames(folder, [11, 2, 10])] == [11, 2, 10]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MediaError, match="no image files"):
        video_info(empty)


# ---------------------------------------------------------------- grids


@pytest.mark.parametrize(
    ("count", "shape"),
    [(1, (1, 1)), (2, (1, 2)), (3, (1, 3)), (4, (2, 2)), (5, (2, 3)), (6, (2, 3)), (8, (2, 4)), (9, (3, 3)),
     (10, (3, 4)), (16, (4, 4))],
)  # fmt: skip
def test_grid_shape_table(count: int, shape: tuple[int, int]) -> None:
    assert grid_shape(count) == shape


def _solid(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def test_make_grid_places_cells_row_major() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    grid = make_grid([_solid(c) for c in colours])
    assert grid.size == (80, 60)  # 2x2 cells of 40x30
    centres = [(20, 15), (60, 15), (20, 45), (60, 45)]
    assert [grid.getpixel(p) for p in centres] == colours


def test_make_grid_resizes_to_the_first_image_and_honours_rows_cols() -> None:
    images = [_solid((255, 0, 0)), _solid((0, 255, 0), (100, 80)), _solid((0, 0, 255), (10, 10))]
    assert make_grid(images).size == (120, 30)  # 1x3
    grid = make_grid(images, cols=1)
    assert grid.size == (40, 90)
    assert grid.getpixel((20, 45)) == (0, 255, 0)
    assert make_grid(images, rows=2).size == (80, 60)
    with pytest.raises(ValueError, match="cannot hold 3"):
        make_grid(images, rows=1, cols=2)
    with pytest.raises(ValueError, match="at least one"):
        make_grid([])


# ---------------------------------------------------------------- images and greyscale


def test_load_image_converts_to_rgb(tmp_path: Path) -> None:
    for mode in ("RGBA", "L", "P"):
        Image.new(mode, (8, 6)).save(tmp_path / f"{mode}.png")
        im = load_image(tmp_path / f"{mode}.png")
        assert (im.mode, im.size) == ("RGB", (8, 6))


def test_greyscale_keeps_three_equal_channels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    colour = load_image(tmp_path / "c.png")
    grey = np.asarray(load_image(tmp_path / "c.png", greyscale=True))
    assert grey.shape == (20, 30, 3)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert (grey[..., 0] == np.asarray(colour.convert("L"))).all()
    assert not (np.asarray(colour)[..., 0] == np.asarray(colour)[..., 1]).all()


# ---------------------------------------------------------------- transcripts


def test_transcripts_npy_and_txt(tmp_path: Path) -> None:
    np.save(tmp_path / "zero_d.npy", np.array("  我很担心结果。 "))  # 0-d unicode array, as MER2023 (Chinese)
    np.save(tmp_path / "object.npy", np.array(["an object array"], dtype=object))  # needs allow_pickle
    np.save(tmp_path / "bytes.npy", np.array(b"bytes text"))
    (tmp_path / "t.txt").write_text("plain text\n", encoding="utf-8")
    assert load_transcript(tmp_path / "zero_d.npy") == "我很担心结果。"
    assert load_transcript(tmp_path / "object.npy") == "an object array"
    assert load_transcript(tmp_path / "bytes.npy") == "bytes text"
    assert load_transcript(tmp_path / "t.txt") == "plain text"


def test_bad_transcripts(tmp_path: Path) -> None:
    (tmp_path / "garbage.npy").write_bytes(b"this is not a numpy file")
    np.save(tmp_path / "numbers.npy", np.arange(3))
    (tmp_path / "latin.txt").write_bytes(b"\xff\xfe\xfa bad utf-8")
    (tmp_path / "t.json").write_text("{}")
    (tmp_path / "empty.txt").write_bytes(b"")
    cases = {
        "garbage.npy": "cannot read transcript",
        "numbers.npy": "expected a string",
        "latin.txt": "cannot read transcript",
        "t.json": "unsupported transcript",
        "empty.txt": "empty",
        "missing.npy": "not found",
    }
    for name, message in cases.items():
        with pytest.raises(MediaError, match=message):
            load_transcript(tmp_path / name)


# ---------------------------------------------------------------- bad media


def test_bad_images(tmp_path: Path) -> None:
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "full.jpg", quality=95
    )
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    cases = {
        "zero.jpg": "empty \\(0 bytes\\)",
        "truncated.jpg": "cannot decode image .*truncated",
        "text.png": "cannot decode image",
        "missing.jpg": "image not found",
    }
    for name, message in cases.items():
        with pytest.raises(MediaError, match=message):
            load_image(tmp_path / name)


def test_bad_videos(videos: dict[str, Path], tmp_path: Path) -> None:
    data = videos["mp4"].read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: int(len(data) * 0.6)])
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video")
    cases = {
        "truncated.mp4": "cannot open video",
        "zero.mp4": "empty \\(0 bytes\\)",
        "text.mp4": "cannot open video",
        "missing.mp4": "video not found",
    }
    for name, message in cases.items():
        with pytest.raises(MediaError, match=message):
            video_info(tmp_path / name)
        with pytest.raises(MediaError, match=message):
            read_frames(tmp_path / name, [0])


# ---------------------------------------------------------------- load_sample and the content hash


def test_load_sample_video(videos: dict[str, Path]) -> None:
    sample = Sample("d", "clip", "happy", videos["mp4"])
    loaded = load_sample(sample, "video")
    assert loaded.frame_indices == [0, 32, 64]
    assert [decode_index(im) for im in loaded.images] == [0, 32, 64]
    assert (loaded.source_frames, loaded.source_fps, loaded.text) == (97, 25.0, None)
    uniform = load_sample(sample, "video", frames=4, sampler="uniform", greyscale=True)
    assert uniform.frame_indices == [12, 36, 60, 84]
    assert [decode_index(im) for im in uniform.images] == [12, 36, 60, 84]
    assert all(len(set(im.getpixel((5, 5)))) == 1 for im in uniform.images)  # grey: r == g == b
    hashes = {
        load_sample(sample, "video").content_hash,
        uniform.content_hash,
        load_sample(sample, "video", greyscale=True).content_hash,
        load_sample(sample, "video", frames=4).content_hash,
    }
    assert len(hashes) == 4 and loaded.content_hash in hashes


def test_load_sample_image_text_and_hash(tmp_path: Path) -> None:
    Image.new("RGB", (10, 10), (200, 10, 10)).save(tmp_path / "a.png")
    np.save(tmp_path / "a.npy", np.array("hello"))
    sample = Sample("d", "a", "happy", tmp_path / "a.png", tmp_path / "a.npy")
    first = load_sample(sample, "image")
    assert len(first.images) == 1 and first.frame_indices == [] and first.text is None
    assert load_sample(sample, "image").content_hash == first.content_hash
    both = load_sample(sample, "image", with_text=True)
    assert both.text == "hello" and both.content_hash != first.content_hash
    text_only = load_sample(sample, "image", with_text=True, with_visual=False)
    assert text_only.images == [] and text_only.text == "hello"
    assert len({first.content_hash, both.content_hash, text_only.content_hash}) == 3
    Image.new("RGB", (10, 10), (10, 200, 10)).save(tmp_path / "a.png")  # new bytes -> new hash
    assert load_sample(sample, "image").content_hash != first.content_hash


def test_load_sample_errors(tmp_path: Path, videos: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="unknown media kind 'audio'"):
        load_sample(Sample("d", "a", "x", videos["mp4"]), "audio")
    with pytest.raises(MediaError, match="no media path"):
        load_sample(Sample("d", "a", "x"), "image")
    with pytest.raises(MediaError, match="no transcript path"):
        load_sample(Sample("d", "a", "x", videos["mp4"]), "video", with_text=True)
    with pytest.raises(MediaError, match="expected a folder of frames"):
        load_sample(Sample("d", "a", "x", videos["mp4"]), "frames")


def test_load_sample_frame_folder(tmp_path: Path) -> None:
    for i in range(10):
        Image.fromarray(index_frame(i)).save(tmp_path / f"{i:03d}.jpg", quality=95)
    loaded = load_sample(Sample("d", "f", "x", tmp_path), "frames")
    assert loaded.frame_indices == [0, 3, 6] and loaded.source_frames == 10 and loaded.source_fps is None
    assert [decode_index(im) for im in loaded.images] == [0, 3, 6]


def test_file_digest_is_cached_and_follows_changes(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"a" * 5_000_000)
    os.utime(f, (time.time() - 3600,) * 2)  # settled (a fresh file is hashed each time: ger/data/digests.py)
    first = file_digest(f)
    size_before = len(media._DIGESTS)
    assert file_digest(f) == first and len(media._DIGESTS) == size_before  # served from the cache
    f.write_bytes(b"b" * 5_000_001)
    assert file_digest(f) != first
