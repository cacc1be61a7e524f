"""Frame-exact reading of video files.

The contract (docs/CONTRACTS.md, "Frame contract"): frame k is the k-th frame a player
displays, i.e. the k-th frame that decoding the stream in order yields, with edit lists
honoured and the display rotation applied; the frame count and fps describe those frames;
a frame that cannot be delivered exactly raises MediaError, never a substitute.

Two readers, chosen per file from what the container says (`probe`):
- decord (seek to the keyframe before each wanted frame, decode forward): only where
  seeking is provably exact: mp4/mov/mkv/webm, a codec checked against the in-order
  decode (H.264, HEVC, VP8, VP9), every coded frame timestamped and displayed (no edit
  list dropping frames), and every keyframe a clean cut (no frame displayed after it was
  coded before it, no frame displayed before it is coded after it: no open GOP).
- in-order decode with PyAV everywhere else (AVI, whose index carries no presentation
  times; MPEG-4 Part 2; open GOP; edit lists; ...): every frame is decoded, only the
  kept ones are converted to RGB, so memory stays at a few frames.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ger.data.digests import stamp_of

if TYPE_CHECKING:
    from PIL import Image

DECORD, DECODE = "decord", "in-order decode"
# ffmpeg demuxer names whose packets carry presentation times decord can seek by
SEEKABLE_CONTAINERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")
# codecs whose seeking decord gets right once the container checks pass (tests/test_frames_exact.py)
SEEKABLE_CODECS = ("h264", "hevc", "vp8", "vp9")


def _media_error(message: str) -> Exception:
    from ger.data.media import MediaError  # ger.data.media imports this module; import here, not at the top

    return MediaError(message)


def _short(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _import_av() -> Any:
    try:
        import av
    except ImportError as e:
        raise ImportError("reading videos needs PyAV: pip install 'ger[video]' (av)") from e
    return av


_ABSENT = object()


def _import_decord() -> Any:
    """Import decord without its CUDA preload.

    On import, decord2 dlopens every library of the `nvidia` pip packages with
    RTLD_GLOBAL, libnvblas among them, which then intercepts BLAS calls and crashes
    CPU matrix products in torch (seen with the CUDA torch wheel on a GPU-less host).
    We decode on the CPU only, so the import runs with `nvidia` hidden from it.
    """
    if "decord" in sys.modules:
        return sys.modules["decord"]
    saved = sys.modules.get("nvidia", _ABSENT)
    sys.modules["nvidia"] = None  # type: ignore[assignment]  # find_spec("nvidia") -> None
    try:
        import decord
    except ImportError as e:
        raise ImportError("reading videos needs decord: pip install 'ger[video]' (decord2)") from e
    finally:
        if saved is _ABSENT:
            del sys.modules["nvidia"]
        else:
            sys.modules["nvidia"] = saved
    return decord


# ---------------------------------------------------------------- what the container says


@dataclass(frozen=True)
class VideoProbe:
    """One video file as its container describes it, and how ger reads it."""

    container: str  # ffmpeg demuxer name, e.g. "avi" or "mov,mp4,m4a,3gp,3g2,mj2"
    codec: str  # e.g. "h264", "mpeg4"
    frames: int  # coded frames that are displayed (edit-list discards left out)
    fps: float | None  # average rate of the displayed frames; None where missing or nonsense
    reader: str  # DECORD or DECODE
    why: str  # why the in-order decode was chosen ("" for decord)

    @property
    def kind(self) -> str:
        """'container/codec', as `ger prepare` lists them."""
        return f"{self.container.split(',')[0]}/{self.codec}"


def _open_container(path: Path) -> Any:
    av = _import_av()
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise _media_error(f"cannot open video {path}: {_short(e)}") from e
    if not container.streams.video:
        container.close()
        raise _media_error(f"cannot open video {path}: no video stream")
    return container


def _clean_cuts(pts: list[int], keys: list[bool]) -> bool:
    """Every keyframe splits the stream: all frames coded before it are displayed before it
    and all coded after it are displayed after it, so decoding from it yields exactly the
    frames from it on (false for open GOPs, whose leading frames follow their keyframe)."""
    before = [-math.inf, *accumulate(pts, max)][:-1]  # latest display time coded before frame i
    after = [*accumulate(reversed(pts), min)][::-1][1:] + [math.inf]  # earliest coded after it
    return all(before[i] < p < after[i] for i, p in enumerate(pts) if keys[i])


def _why_not_seekable(
    container: str, codec: str, pts: list[int | None], keys: list[bool], dropped: int
) -> str:
    """'' where decord's seek is exact, else the reason (shown by `ger prepare`)."""
    if container not in SEEKABLE_CONTAINERS:
        return f"{container.split(',')[0]} container: no reliable presentation times"
    if codec not in SEEKABLE_CODECS:
        return f"codec {codec}: seeking not verified"
    if dropped:
        return f"edit list: {dropped} coded frames not shown"
    if not pts or any(p is None for p in pts) or len(set(pts)) != len(pts):
        return "missing or repeated timestamps"
    if not keys[0] or not _clean_cuts(pts, keys):  # type: ignore[arg-type]
        return "open GOP: frames shown before a keyframe are coded after it"
    return ""


def _fps(stream: Any) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate is not None and float(rate) > 0:
            return float(rate)
    return None


def _probe(path: Path) -> VideoProbe:
    av = _import_av()
    with _open_container(path) as container:
        stream = container.streams.video[0]
        pts: list[int | None] = []
        keys: list[bool] = []
        dropped = empty = 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the flush packet at the end, or a coded "repeat the last frame"
                    empty += packet.dts is not None
                    continue
                if packet.is_discard:  # before an edit list's start: decoded for reference, not shown
                    dropped += 1
                    continue
                pts.append(packet.pts)
                keys.append(packet.is_keyframe)
        except av.FFmpegError as e:
            raise _media_error(f"cannot read video {path}: {_short(e)}") from e
        name, codec = container.format.name, stream.codec_context.name
        why = _why_not_seekable(name, codec, pts, keys, dropped)
        if not why and len(container.streams.video) > 1:
            why = "several video streams (decord might pick another)"
        if not pts:
            raise _media_error(f"video has no frames: {path}")
        if stream.frames and len(pts) + dropped + empty < stream.frames:
            # a cut file whose index survived (an mp4 with the index first, an AVI read without its index):
            # the frames that remain would be sampled as if they were the whole clip
            raise _media_error(
                f"video is truncated: {path} declares {stream.frames} frames, "
                f"{len(pts) + dropped + empty} can be read"
            )
        return VideoProbe(name, codec, len(pts), _fps(stream), DECODE if why else DECORD, why)


@functools.lru_cache(maxsize=4096)
def _probe_cached(path: str, stamp: tuple[int, ...]) -> VideoProbe:
    return _probe(Path(path))


def probe(path: Path | str) -> VideoProbe:
    """What the container says about a video, demuxed once per file version (its stamp) and process."""
    p = Path(path).resolve()
    return _probe_cached(str(p), stamp_of(p.stat()))


# ---------------------------------------------------------------- in-order decode (PyAV)

_TRANSPOSE = {90: "ROTATE_90", 180: "ROTATE_180", 270: "ROTATE_270"}  # counter-clockwise, as PIL names them


def _to_image(frame: Any, path: Path) -> Image.Image:
    """RGB, turned as the display matrix says (a player's view; decord does the same)."""
    from PIL import Image

    image = frame.to_image()
    turn = round(frame.rotation) % 360
    if turn == 0:
        return image
    if turn not in _TRANSPOSE:
        raise _media_error(f"{path}: display rotation of {frame.rotation} degrees is not a multiple of 90")
    return image.transpose(getattr(Image.Transpose, _TRANSPOSE[turn]))


def _decode_picks(path: Path, wanted: set[int], to_end: bool) -> tuple[dict[int, Image.Image], int]:
    """Frames at `wanted` (converted to RGB; the others never are) and the frames decoded.

    Decodes the first video stream in order, so frame n is the n-th frame displayed.
    Stops after the last wanted frame unless `to_end`, which counts every frame."""
    av = _import_av()
    last = max(wanted, default=-1)
    kept: dict[int, Image.Image] = {}
    n = 0
    with _open_container(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threads: output order and content are unchanged
        try:
            for frame in container.decode(stream):
                if n in wanted:
                    kept[n] = _to_image(frame, path)
                n += 1
                if n > last and not to_end:
                    break
        except av.FFmpegError as e:
            raise _media_error(f"cannot decode frame {n} of {path}: {_short(e)}") from e
    return kept, n


def count_frames(path: Path) -> int:
    """Frames that decoding in order yields (no colour conversion)."""
    return _decode_picks(path, set(), to_end=True)[1]


# ---------------------------------------------------------------- decord


def _decord_batch(path: Path, indices: list[int], frames: int) -> list[Image.Image] | None:
    """decord's frames, or None where decord fails on a file PyAV reads (e.g. it rejects some
    3:2 frame sizes), so the caller decodes in order instead."""
    from PIL import Image

    decord = _import_decord()
    try:
        # one decoding thread: frame threading makes ffmpeg decode ahead, wasted on 3 sparse frames
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        if len(reader) != frames:
            return None
        batch = reader.get_batch(indices).asnumpy()
    except Exception:  # decord raises RuntimeError or its own DECORDError
        return None
    if batch.shape[0] != len(indices):
        return None
    return [Image.fromarray(frame) for frame in batch]


# ---------------------------------------------------------------- the readers


def check_indices(indices: Sequence[int], n_frames: int, path: Path) -> list[int]:
    bad = [i for i in indices if not 0 <= int(i) < n_frames]
    if bad:
        raise _media_error(f"frame indices {bad} out of range for {path} ({n_frames} frames)")
    return [int(i) for i in indices]


def video_frames(path: Path) -> tuple[int, float | None]:
    """(displayed frames, fps); the in-order reader counts by decoding."""
    info = probe(path)
    return (info.frames if info.reader == DECORD else count_frames(path)), info.fps


def read_video(path: Path, indices: Sequence[int]) -> list[Image.Image]:
    """The frames at `indices` (any order, repeats allowed); decodes no further than the last."""
    info = probe(path)
    if info.reader == DECORD:
        idx = check_indices(indices, info.frames, path)
        frames = _decord_batch(path, idx, info.frames)
        if frames is not None:
            return frames
    check_indices(indices, sys.maxsize, path)  # negative indices fail before any decoding
    kept, n = _decode_picks(path, {int(i) for i in indices}, to_end=False)
    check_indices(indices, n, path)
    return [kept[int(i)] for i in indices]


def sample_video(
    path: Path, pick: Callable[[int], list[int]]
) -> tuple[list[Image.Image], list[int], int, float | None]:
    """`pick(n_frames) -> indices`, applied to the displayed frames: (frames, indices, n, fps).

    The in-order reader decodes to the end once, so the count it reports is the one it saw:
    where the container's count was wrong, the indices are picked again from the true count.
    """
    info = probe(path)
    indices = pick(info.frames)
    if info.reader == DECORD:
        frames = _decord_batch(path, indices, info.frames)
        if frames is not None:
            return frames, indices, info.frames, info.fps
    kept, n = _decode_picks(path, set(indices), to_end=True)
    if n != info.frames:
        indices = pick(n)
        kept, _ = _decode_picks(path, set(indices), to_end=False)
    return [kept[i] for i in indices], indices, n, info.fps
