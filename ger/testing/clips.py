"""Small clips in the containers and codecs emotion datasets ship in, made with ffmpeg.

For the frame-exactness tests (tests/test_frames_exact.py) and the frame benchmark: each
clip covers one case where a seeking reader can return the wrong frame (H.264 in AVI,
MPEG-4 Part 2 with B-frames, open GOP, edit lists) or an easy one (closed-GOP mp4, HEVC,
VP9, MJPEG, variable rate, rotation, start offset, audio). Frame i shows the 8 bits of
i as black/white blocks in its top half, so a frame names itself even after lossy coding;
the bottom half is moving noise that changes every few frames, so encoders make real
P- and B-frames.
"""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BITS = 8
X264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "veryfast"]
CLOSED_GOP = ["-g", "24", "-bf", "3", "-sc_threshold", "0"]
MPEG4 = ["-c:v", "mpeg4", "-g", "24", "-bf", "2", "-q:v", "3"]
OPEN_GOP = ["-bf", "3", "-x264-params", "open-gop=1:keyint=24:min-keyint=24:scenecut=0"]
X265 = ["-c:v", "libx265", "-pix_fmt", "yuv420p", "-tag:v", "hvc1", "-x265-params"]


def skip_without_decord() -> None:
    """Skip the calling test module where decord is not installed, without importing it.

    A plain `import decord` (pytest.importorskip) preloads every CUDA library pip installed,
    libnvblas among them, which crashes torch's CPU matrix products for the rest of the test
    process; ger imports it only through ger/data/video.py's _import_decord.
    """
    import pytest

    if importlib.util.find_spec("decord") is None:
        pytest.skip("decord is not installed", allow_module_level=True)


@dataclass(frozen=True)
class ClipSpec:
    """One clip: ffmpeg output options, or a stream copy of another clip (`source`)."""

    name: str  # file name, with the container's extension
    args: list[str]  # output options when encoding; input options when copying from `source`
    frames: int = 150
    source: str = ""  # copy from this clip with `args` (-ss cut, display rotation) and -c copy
    encoder: str = ""  # ffmpeg encoder this clip needs; the clip is skipped without it
    extra_input: list[str] = field(default_factory=list)  # e.g. a lavfi audio source
    size: tuple[int, int] | None = None  # (width, height) when not the corpus default


CORPUS = [
    ClipSpec("h264_closed.mp4", [*X264, *CLOSED_GOP]),
    ClipSpec("h264_closed.mkv", [*X264, *CLOSED_GOP]),
    ClipSpec("h264_bframes.avi", [*X264, *CLOSED_GOP]),
    ClipSpec("h264_no_bframes.avi", [*X264, "-g", "24", "-bf", "0", "-sc_threshold", "0"]),
    ClipSpec("mpeg4_bframes.avi", MPEG4),
    ClipSpec("xvid_bframes.avi", [*MPEG4, "-vtag", "XVID"]),
    ClipSpec("divx_bframes.avi", [*MPEG4, "-vtag", "DX50"]),
    ClipSpec("mpeg4_bframes.mp4", MPEG4),
    ClipSpec("h264_open_gop.mp4", [*X264, *OPEN_GOP]),
    ClipSpec("h264_open_gop.mkv", [*X264, *OPEN_GOP]),
    ClipSpec("edit_list.mp4", ["-ss", "1.3"], source="h264_closed.mp4"),
    ClipSpec("edit_list_both_ends.mp4", ["-ss", "1.3", "-t", "3.3"], source="h264_closed.mp4"),
    ClipSpec("cut.mkv", ["-ss", "1.3"], source="h264_closed.mkv"),
    ClipSpec("edit_list_open_gop.mp4", ["-ss", "1.3"], source="h264_open_gop.mp4"),
    ClipSpec("hevc_open_gop.mp4", [*X265, "keyint=24:min-keyint=24:log-level=error"], encoder="libx265"),
    ClipSpec("hevc_closed.mp4", [*X265, "keyint=24:min-keyint=24:open-gop=0:log-level=error"],
             encoder="libx265"),
    ClipSpec("vp9.webm", ["-c:v", "libvpx-vp9", "-g", "24", "-deadline", "realtime", "-cpu-used", "8"],
             encoder="libvpx-vp9"),
    ClipSpec("mjpeg.avi", ["-c:v", "mjpeg", "-q:v", "3"]),
    ClipSpec("vfr.mp4", ["-vf", "select='not(between(n,30,45)+between(n,90,92))'", "-fps_mode", "vfr",
                         *X264, *CLOSED_GOP]),
    ClipSpec("rotate_90.mp4", ["-display_rotation", "90"], source="h264_closed.mp4"),
    ClipSpec("rotate_180.mp4", ["-display_rotation", "180"], source="h264_closed.mp4"),
    ClipSpec("rotate_270.mov", ["-display_rotation", "270"], source="h264_closed.mp4"),
    ClipSpec("start_offset.mp4", [*X264, *CLOSED_GOP, "-output_ts_offset", "2.5"]),
    ClipSpec("start_offset.mkv", [*X264, *CLOSED_GOP, "-output_ts_offset", "2.5"]),
    ClipSpec("short.mp4", [*X264, *CLOSED_GOP], frames=5),
    ClipSpec("short.avi", MPEG4, frames=5),
    ClipSpec("audio.mp4", [*X264, *CLOSED_GOP, "-c:a", "aac", "-shortest"],
             extra_input=["-f", "lavfi", "-i", "sine=frequency=440:duration=10"]),
    ClipSpec("audio.avi", [*MPEG4, "-c:a", "pcm_s16le", "-shortest"],
             extra_input=["-f", "lavfi", "-i", "sine=frequency=440:duration=10"]),
    ClipSpec("size_3x2.mp4", [*X264, *CLOSED_GOP], size=(96, 64)),  # decord rejects some 3:2 sizes
]  # fmt: skip


def ffmpeg_exe() -> str:
    import imageio_ffmpeg  # ships an ffmpeg binary with x264, x265, libvpx

    return imageio_ffmpeg.get_ffmpeg_exe()


def has_encoder(name: str) -> bool:
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    return any(line.split()[1:2] == [name] for line in out.splitlines())


def index_pattern(i: int, width: int, height: int) -> np.ndarray:
    """RGB frame i: the bits of i as blocks on top, moving noise (a new pattern every 7 frames) below."""
    frame = np.zeros((height, width, 3), np.uint8)
    top, block = height // 2, width // BITS
    for b in range(BITS):
        if (i >> b) & 1:
            frame[:top, b * block : (b + 1) * block] = 255
    texture = np.random.default_rng(i // 7).integers(0, 256, (height - top, width, 3), dtype=np.uint8)
    frame[top:] = np.roll(texture, 3 * i, axis=1)
    return frame


def read_index(rgb: np.ndarray) -> int:
    """The index an upright frame shows (the centre of each block, away from coding edges)."""
    height, width = rgb.shape[:2]
    top, block = height // 2, width // BITS
    grey = rgb.astype(np.float32).mean(axis=2)
    inner = [
        grey[top // 4 : 3 * top // 4, b * block + block // 4 : (b + 1) * block - block // 4]
        for b in range(BITS)
    ]
    return sum(1 << b for b, cell in enumerate(inner) if cell.mean() > 128)


def _frames(n: int, width: int, height: int) -> Iterator[bytes]:
    for i in range(n):
        yield index_pattern(i, width, height).tobytes()


def make_clip(spec: ClipSpec, folder: Path, size: tuple[int, int] = (128, 64), fps: int = 25) -> Path:
    """Write one clip into `folder` (its source first written by the caller) and return its path."""
    out = folder / spec.name
    base = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y"]
    if spec.source:
        cmd = [*base, *spec.args, "-i", str(folder / spec.source), "-c", "copy", str(out)]
        subprocess.run(cmd, check=True, capture_output=True)
        return out
    width, height = spec.size or size
    cmd = [*base, "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
           *spec.extra_input, *spec.args, str(out)]  # fmt: skip
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        for frame in _frames(spec.frames, width, height):
            proc.stdin.write(frame)
        proc.stdin.close()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.wait() != 0:
            raise RuntimeError(f"ffmpeg failed writing {out}: {err.strip()[-400:]}")
    return out


def make_corpus(
    folder: Path, size: tuple[int, int] = (128, 64), fps: int = 25
) -> tuple[dict[str, Path], dict[str, str]]:
    """Every clip of CORPUS that this ffmpeg can make: ({name: path}, {name: why skipped})."""
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for spec in CORPUS:
        if spec.encoder and not has_encoder(spec.encoder):
            skipped[spec.name] = f"this ffmpeg has no {spec.encoder}"
        elif spec.source and spec.source not in made:
            skipped[spec.name] = f"its source {spec.source} was skipped"
        else:
            made[spec.name] = make_clip(spec, folder, size, fps)
    return made, skipped
