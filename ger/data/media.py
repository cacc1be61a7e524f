"""The sample loader stage: images, frame sampling and transcripts.

Turns a `Sample` (paths) into a `LoadedSample` (decoded PIL images and text) plus a
hash of exactly what will be sent, so the response cache notices when media change.
Videos are read frame-exactly by ger/data/video.py: decord's random access where seeking is
exact, an in-order PyAV decode elsewhere; never the whole clip in memory as the paper's
release did. A clip's sound track (the audio modalities) is keyed and read by ger/data/audio.py.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ger.data.digests import _MEMORY as _DIGESTS  # noqa: F401  (tests look into it)
from ger.data.digests import Stamp, file_digest, file_status, stamp_of
from ger.data.video import read_video, sample_video, video_frames
from ger.records import LoadedSample, Sample

if TYPE_CHECKING:
    from PIL import Image

SAMPLERS = ("paper", "uniform")
MEDIA_KINDS = ("image", "video", "frames")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
log = logging.getLogger("ger")
_HASH_VERSION = b"ger-media-v2"  # bump when the meaning of content_hash changes
# The reader contract: frames are read frame-exactly as ger/data/video.py documents (bump when that changes).
_READER = "frame-contract:1"


class MediaError(ValueError):
    """A media file is missing, empty, truncated or cannot be decoded."""


class MediaChanged(MediaError):
    """A media file changed between its digest and its decoding (a rerun reads it afresh)."""


# ---------------------------------------------------------------- images


def _require_file(path: Path | str, what: str) -> Path:
    """Fail early with a message that names the file and the reason."""
    p = Path(path)
    try:
        st = os.stat(p)  # one system call: a rerun checks every file of the test set
    except OSError as e:
        _not_found(e, p, what)
    _check_status(st, p, what)
    return p


def checked_digest(path: Path | str, what: str) -> tuple[str, Stamp]:
    """file_digest() and the file's stamp after _require_file's checks, one lstat serving all (a rerun
    keys every file)."""
    try:
        status = file_status(path)
    except OSError as e:
        _not_found(e, path, what)
    _check_status(status[1], path, what)
    return file_digest(path, status), stamp_of(status[1])


def check_unchanged(path: Path | str, stamp: Stamp, what: str) -> None:
    """Fail if the file is not as it was when its digest was taken (checked after reading it).

    The cache key names the bytes describe_sample hashed; a file rewritten before a worker decodes
    it (a dataset re-extracted under a running evaluation) would have the new pixels' answer cached
    under the old bytes' key, and served for them later. The stamp tells, as for the digest table."""
    if stamp_of(os.stat(path)) != stamp:
        raise MediaChanged(f"{what} changed while the run was reading it: {path} (a rerun keys it again)")


def _not_found(e: OSError, path: Path | str, what: str) -> NoReturn:
    """As Path.exists() tells "not found"; a permission error stays itself."""
    if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
        raise MediaError(f"{what} not found: {path}") from None
    raise e


def _check_status(st: os.stat_result, path: Path | str, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise MediaError(f"{what} is not a file: {path}")
    if st.st_size == 0:
        raise MediaError(f"{what} is empty (0 bytes): {path}")


def to_greyscale(image: Image.Image) -> Image.Image:
    """Grey levels kept in 3 channels, so every model gets the input shape it expects."""
    return image.convert("L").convert("RGB")


def _high_depth_to_8bit(im: Image.Image, path: Path) -> Image.Image:
    """16-bit and 32-bit grey (modes I;16*, I, F) scaled to 8 bits; convert("RGB") would clip them to white.

    Pillow opens a 16-bit grey PNG or TIFF as I;16 (0-65535) and already reduces 48/64-bit colour
    to 8 bits per channel; modes I and F carry no declared range, so theirs is inferred.
    """
    import numpy as np
    from PIL import Image

    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        scaled = (arr.astype(np.uint32) * 255 + 32767) // 65535  # rounded v / 257
    else:
        a = arr.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        if im.mode == "F" and lo >= 0 and hi <= 1:
            top = 1.0
        elif lo >= 0 and hi <= 255:
            top = 255.0
        elif lo >= 0 and hi <= 65535:
            top = 65535.0
        else:
            log.warning("image %s (mode %s) has values %s..%s; stretched to 0..255", path, im.mode, lo, hi)
            a, top = a - lo, max(hi - lo, 1.0)
        scaled = np.rint(a * (255.0 / top))
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")


def load_image(path: Path | str, greyscale: bool = False) -> Image.Image:
    """Decode an image fully (truncation surfaces here, not inside a backend) as 8-bit RGB."""
    return load_still(path, greyscale)[0]


# Formats every OpenAI-compatible server (vLLM, OpenAI) reads; their decoded modes that servers and
# ger turn into the same RGB pixels (RGB as is, L as grey in 3 channels).
_SENT_AS_IS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_EXIF_ORIENTATION = 0x0112


def load_still(path: Path | str, greyscale: bool = False) -> tuple[Image.Image, tuple[str, bytes] | None]:
    """load_image, and the file itself as (MIME type, bytes) where it can be sent as it is.

    The file is read once. It travels as it is only when nothing was changed on the way to the pixels:
    no greyscale, no EXIF orientation (servers differ on whether they apply it), an 8-bit RGB or grey
    image in JPEG, PNG or WebP; otherwise (None) a backend sends the decoded pixels re-encoded.
    """
    from PIL import Image

    p = _require_file(path, "image")
    try:
        data = p.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # Image.open is lazy; force the full decode so truncated files fail now
            as_is = _SENT_AS_IS.get(im.format or "") if im.mode in ("RGB", "L") and not greyscale else None
            if as_is and im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                as_is = None
            if im.mode.startswith("I") or im.mode == "F":
                im = _high_depth_to_8bit(im, p)
            rgb = im if im.mode == "RGB" else im.convert("RGB")  # loaded: no copy needed
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"cannot decode image {p}: {e}") from e
    return (to_greyscale(rgb) if greyscale else rgb), ((as_is, data) if as_is else None)


# ---------------------------------------------------------------- frame sampling


def sample_indices(n_frames: int, count: int, sampler: str = "paper") -> list[int]:
    """Indices of `count` frames of an `n_frames` clip.

    paper: the release's rule generalised to any count: step = n // count (the clip
    trimmed to a multiple of count), frames 0, step, 2*step, ...; a clip shorter than
    `count` gives all its frames then repeats the last one.
    uniform: the middle frame of each of `count` equal segments (centred in time).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {list(SAMPLERS)}")
    if count < 1:
        raise ValueError(f"frame count must be >= 1, got {count}")
    if n_frames < 1:
        raise MediaError(f"clip has no frames (n_frames={n_frames})")
    if sampler == "paper":
        if n_frames < count:
            return list(range(n_frames)) + [n_frames - 1] * (count - n_frames)
        step = n_frames // count
        return [i * step for i in range(count)]
    # floor((i + 1/2) * n / count) in integers, so no float rounding at segment edges
    return [((2 * i + 1) * n_frames) // (2 * count) for i in range(count)]


# ---------------------------------------------------------------- videos and frame folders


def _natural_key(path: Path) -> list[Any]:
    """frame_2 before frame_10, as the extraction tools number them."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def frame_files(folder: Path | str) -> list[Path]:
    """The image files of a folder of pre-extracted frames, in frame order.

    Hidden files are not frames: a Mac copying to a drive it did not format leaves an AppleDouble
    `._frame_001.jpg` beside each frame, which would double the count and shift every index."""
    d = Path(folder)
    frames = (f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))
    files = sorted((f for f in frames if f.is_file()), key=_natural_key)
    if not files:
        raise MediaError(f"frame folder holds no image files ({', '.join(IMAGE_EXTENSIONS)}): {d}")
    return files


def _check_indices(indices: Sequence[int], n_frames: int, path: Path) -> list[int]:
    bad = [i for i in indices if not 0 <= int(i) < n_frames]
    if bad:
        raise MediaError(f"frame indices {bad} out of range for {path} ({n_frames} frames)")
    return [int(i) for i in indices]


def video_info(path: Path | str) -> tuple[int, float | None]:
    """(frame count, frames per second) of a video file, or of a frame folder (fps None).

    For a file: the frames a player displays (ger/data/video.py, the frame contract)."""
    p = Path(path)
    if p.is_dir():
        return len(frame_files(p)), None
    return video_frames(_require_file(p, "video"))


def read_frames(path: Path | str, indices: Sequence[int]) -> list[Image.Image]:
    """The frames at `indices` (any order, repeats allowed) of a video or frame folder, as RGB."""
    p = Path(path)
    if not indices:
        return []
    if p.is_dir():
        files = frame_files(p)
        return [load_image(files[i]) for i in _check_indices(indices, len(files), p)]
    return read_video(_require_file(p, "video"), list(indices))


def sample_frames(
    path: Path | str, count: int, sampler: str = "paper"
) -> tuple[list[Image.Image], list[int], int, float | None]:
    """video_info + sample_indices + read_frames with the file opened once.

    Returns (frames, indices, n_frames, fps).
    """
    p = Path(path)
    if p.is_dir():
        n, fps = video_info(p)
        indices = sample_indices(n, count, sampler)
        return read_frames(p, indices), indices, n, fps
    sample_indices(1, count, sampler)  # bad arguments fail before any decoding
    return sample_video(_require_file(p, "video"), lambda n: sample_indices(n, count, sampler))


# ---------------------------------------------------------------- keys and the loader


def describe_sample(
    sample: Sample,
    media_kind: str,
    *,
    frames: int = 3,
    sampler: str = "paper",
    greyscale: bool = False,
    with_text: bool = False,
    with_visual: bool = True,
    audio_rate: int = 0,
) -> LoadedSample:
    """A sample as far as its prompt and cache key need, without decoding a pixel.

    content_hash covers the media files' bytes (sha256, remembered per path/size/mtime by
    ger/data/digests.py) and everything that turns them into the pixels sent: frame count, sampler,
    greyscale and the reader's version; the transcript (cheap text) is read here. `audio_rate` > 0
    adds the clip's sound track at that rate (its file digest and ger/data/audio.py's transform).
    Raises MediaError for what can be told without decoding (missing, empty, not a folder).
    """
    if media_kind not in MEDIA_KINDS:
        raise ValueError(f"unknown media kind {media_kind!r}; expected one of {list(MEDIA_KINDS)}")
    if sample.problem:  # the manifest found the path unusable (e.g. a link out of the data root)
        raise MediaError(sample.problem)
    shell = LoadedSample(sample=sample)
    h = hashlib.sha256(_HASH_VERSION)
    if with_visual:
        if sample.media is None:
            raise MediaError(f"sample {sample.name!r} of {sample.dataset!r} has no media path")
        if media_kind == "image":
            digest, shell.stamp = checked_digest(sample.media, "image")
            h.update(b"image:" + digest.encode())
            shell.n_images = 1
        else:
            media = Path(sample.media)
            if media_kind == "frames" and not media.is_dir():
                raise MediaError(f"expected a folder of frames for {sample.name!r}: {media}")
            sample_indices(1, frames, sampler)  # bad arguments fail before anything is read
            if media.is_dir():
                files = frame_files(media)
                picked = sample_indices(len(files), frames, sampler)
                h.update(f"folder:{len(files)}:".encode())
                h.update(",".join(file_digest(files[i]) for i in picked).encode())
            else:
                digest, shell.stamp = checked_digest(media, "video")
                h.update(b"video:" + digest.encode())
            h.update(f"|frames:{frames}|sampler:{sampler}|{_READER}".encode())
            shell.n_images, shell.clip = frames, True
        h.update(f"|grey:{int(greyscale)}".encode())
    if with_text:
        if sample.transcript is None:
            raise MediaError(f"sample {sample.name!r} of {sample.dataset!r} has no transcript path")
        from ger.data.transcripts import load_transcript

        shell.text = load_transcript(sample.transcript)
        h.update(b"|text:" + shell.text.encode("utf-8"))
    if audio_rate:
        from ger.data.audio import sound_key

        key, shell.stamp = sound_key(sample, media_kind, audio_rate)
        h.update(key.encode())
        shell.audio_rate = audio_rate
    shell.content_hash = h.hexdigest()
    return shell


# What decode adds to a shell: all a decoding worker hands back (ger/run/stream.py), so the shell's
# paths and text never travel back from it.
DECODED_FIELDS = ("images", "source", "frame_indices", "source_frames", "source_fps", "audio")


def decode(
    shell: LoadedSample, media_kind: str, *, frames: int, sampler: str, greyscale: bool
) -> LoadedSample:
    """describe_sample's shell with its pixels (and sound) decoded; raises MediaError when they cannot be,
    or when the media file is no longer the one its key was made from."""
    if shell.audio_rate:
        from ger.data.audio import decode_sound

        decode_sound(shell)
    if shell.n_images:  # something visual to show (not the text and audio ablations)
        _decode_visual(shell, media_kind, frames, sampler, greyscale)
    if shell.stamp is not None:  # one media file, keyed by its bytes (not a frames folder)
        check_unchanged(shell.sample.media, shell.stamp, "image" if media_kind == "image" else "video")  # type: ignore[arg-type]
    return shell


def _decode_visual(shell: LoadedSample, media_kind: str, frames: int, sampler: str, greyscale: bool) -> None:
    media = Path(shell.sample.media)  # type: ignore[arg-type]  # describe_sample checked it
    if media_kind == "image":
        image, shell.source = load_still(media, greyscale)
        shell.images = [image]
        return
    imgs, idx, n, fps = sample_frames(media, frames, sampler)
    shell.images = [to_greyscale(im) for im in imgs] if greyscale else imgs
    shell.frame_indices, shell.source_frames, shell.source_fps = idx, n, fps
    if len(shell.images) != shell.n_images:
        raise MediaError(f"read {len(shell.images)} frames of {media}, expected {shell.n_images}")


def load_sample(
    sample: Sample,
    media_kind: str,
    *,
    frames: int = 3,
    sampler: str = "paper",
    greyscale: bool = False,
    with_text: bool = False,
    with_visual: bool = True,
    audio_rate: int = 0,
) -> LoadedSample:
    """Decode what the prompt will show of one sample; raises MediaError when it cannot."""
    shell = describe_sample(
        sample,
        media_kind,
        frames=frames,
        sampler=sampler,
        greyscale=greyscale,
        with_text=with_text,
        with_visual=with_visual,
        audio_rate=audio_rate,
    )
    return decode(shell, media_kind, frames=frames, sampler=sampler, greyscale=greyscale)
