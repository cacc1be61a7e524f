"""A clip's sound track, decoded and resampled to what an audio model expects.

The speech sets (RAVDESS, eNTERFACE05, CMU-MOSI, CH-SIMS, MER2023) ship video files with
their speech inside; omni models (Qwen2.5-Omni) take it as mono samples at their feature
extractor's rate (16 kHz for Whisper-style encoders). PyAV decodes the first audio stream
and its resampler converts it (any layout, rate and sample format -> mono float32 at `rate`),
so no second tool is needed. The result goes into a Request as
`{"type": "audio", "audio": samples, "sampling_rate": rate}` (see ger/records.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ger.records import LoadedSample, Sample

DEFAULT_RATE = 16000  # Whisper-style audio encoders (Qwen2.5-Omni's feature extractor)
# How a file becomes samples, for cache keys (bump when read_audio's output changes): PyAV's first audio
# stream, libswresample's default downmix to mono and resampler, float32; nothing trimmed or normalised.
READER = "pyav-swr-mono-f32:2"


def describe_audio(rate: int) -> str:
    """The transform from file bytes to the samples sent, as a cache key part (no decoding)."""
    if rate <= 0:
        raise ValueError(f"sampling rate must be positive, got {rate}")
    return f"audio|rate:{rate}|{READER}"


class NoAudioError(ValueError):
    """The file has no audio stream (e.g. a silent clip, or a frames-only set)."""


@dataclass(frozen=True)
class AudioTrack:
    """Mono float32 samples in [-1, 1] at `sampling_rate` Hz."""

    samples: Any  # 1-D numpy float32
    sampling_rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sampling_rate

    def part(self) -> dict[str, Any]:
        """The Request content part backends read."""
        return {"type": "audio", "audio": self.samples, "sampling_rate": self.sampling_rate}


def read_audio(path: str | Path, rate: int = DEFAULT_RATE) -> AudioTrack:
    """Decode the first audio stream of `path`, downmixed to mono and resampled to `rate` Hz."""
    import av
    import numpy as np

    path = Path(path)
    if rate <= 0:
        raise ValueError(f"sampling rate must be positive, got {rate}")
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise NoAudioError(f"{path}: no audio stream; choose a modality without audio for this set")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks = []
        for frame in container.decode(stream):
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
        chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]  # flush its buffer
        keep, padding = _declared_length(stream, rate)
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if samples.size == 0:
        raise NoAudioError(f"{path}: the audio stream decodes to no samples")
    if keep is not None and 0 < samples.size - keep <= padding:
        samples = samples[:keep]
    return AudioTrack(samples=samples, sampling_rate=rate)


def _declared_length(stream: Any, rate: int) -> tuple[int | None, int]:
    """(samples at `rate` in the stream's declared duration, most padding to drop past it).

    Encoders pad the last frame (AAC: up to 1,024 samples) and the container declares the true length;
    ffmpeg's own CLI drops that padding, and so does ger. Never more than one codec frame: a longer
    excess means the header, not the padding, is off, and then every decoded sample is kept."""
    if not stream.duration or not stream.time_base:
        return None, 0
    seconds = float(stream.duration * stream.time_base)
    frame = stream.codec_context.frame_size or 0
    padding = math.ceil(frame * rate / (stream.rate or rate)) + 2 if frame else 0
    return (round(seconds * rate) if seconds > 0 else None), padding


# ---------------------------------------------------------------- samples (ger/data/media.py calls these)


def sound_key(sample: Sample, media_kind: str, rate: int) -> tuple[str, tuple[int, ...]]:
    """The cache key part of a sample's sound track (its clip's digest and how it becomes samples),
    and the clip's stamp (media.check_unchanged).

    Nothing is decoded (keys of a cached rerun cost no audio decoding); a frames folder or a still
    image, which cannot hold sound, fails here with the fix."""
    from ger.data.media import MediaError, checked_digest

    if sample.media is None:
        raise MediaError(f"sample {sample.name!r} of {sample.dataset!r} has no media path")
    media = Path(sample.media)
    if media_kind != "video" or media.is_dir():
        what = "folder of frames" if media.is_dir() else f"{media_kind} file"
        raise MediaError(
            f"{media}: a {what} has no sound track; the audio modalities need video files with their "
            "sound (use modality=video, text or multi for this set)"
        )
    digest, stamp = checked_digest(media, "video")
    return f"|sound:{digest}|{describe_audio(rate)}", stamp


def decode_sound(shell: LoadedSample) -> LoadedSample:
    """The shell's sound track read at its rate into `shell.audio`; MediaError when there is none."""
    import av

    from ger.data.media import MediaError

    media = Path(shell.sample.media)  # type: ignore[arg-type]  # sound_key checked it
    try:
        shell.audio = read_audio(media, shell.audio_rate)
    except (ValueError, OSError, av.error.FFmpegError) as e:  # NoAudioError, or a broken file
        raise MediaError(f"cannot read the sound track: {e}") from e
    return shell
