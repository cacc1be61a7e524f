"""Reading a clip's sound track (ger/data/audio.py) against ffmpeg's own decoder and resampler."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")  # a test dependency: its own ffmpeg binary

from ger.data.audio import NoAudioError, read_audio  # noqa: E402

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def _ffmpeg(*args: str) -> bytes:
    return subprocess.run([FFMPEG, "-v", "error", *args], check=True, capture_output=True).stdout


def _clip(path: Path, audio: str | None, codec: str = "aac") -> Path:
    """A 2 s video clip as datasets ship them: H.264 picture, optionally a stereo 44.1 kHz sound track."""
    args = ["-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=2"]
    if audio:
        args += ["-f", "lavfi", "-i", f"{audio}:sample_rate=44100:duration=2", "-ac", "2", "-c:a", codec]
    _ffmpeg(*args, "-c:v", "libx264", "-pix_fmt", "yuv420p", "-y", str(path))
    return path


def _peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("rate", [16000, 24000])
def test_sound_track_is_mono_at_the_rate_asked_with_its_pitch(tmp_path, rate):
    track = read_audio(_clip(tmp_path / "a.mp4", "sine=frequency=440"), rate=rate)
    assert track.sampling_rate == rate and track.samples.dtype == np.float32 and track.samples.ndim == 1
    assert abs(track.seconds - 2.0) < 0.1  # AAC adds at most a frame of priming
    assert abs(_peak_hz(track.samples, rate) - 440.0) < 2.0
    assert 0.05 < np.abs(track.samples).max() <= 1.0
    part = track.part()
    assert part["type"] == "audio" and part["sampling_rate"] == rate and part["audio"] is track.samples


def test_matches_ffmpegs_own_decode_and_resample(tmp_path):
    """Same samples as `ffmpeg -ac 1 -ar 16000` (a different resampler setup: compare loosely)."""
    clip = _clip(tmp_path / "b.mkv", "sine=frequency=300", codec="pcm_s16le")
    ours = read_audio(clip, rate=16000).samples
    theirs = np.frombuffer(
        _ffmpeg("-i", str(clip), "-vn", "-ac", "1", "-ar", "16000", "-f", "f32le", "-"), "<f4"
    )
    n = min(len(ours), len(theirs))
    assert abs(len(ours) - len(theirs)) <= 64
    assert np.corrcoef(ours[:n], theirs[:n])[0, 1] > 0.99
    assert np.abs(ours[:n] - theirs[:n]).mean() < 0.02


def test_a_clip_without_sound_names_the_file(tmp_path):
    clip = _clip(tmp_path / "silent.mp4", None)
    with pytest.raises(NoAudioError, match="silent.mp4: no audio stream"):
        read_audio(clip)
