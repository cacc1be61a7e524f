"""Tiny twins of InternVL3, LLaVA-OneVision, Qwen3-VL, Qwen2.5-VL, Qwen2.5-Omni, Gemma 3 on transformers.

Each twin is its family's real architecture and processor class with random weights; a single
image, a multi-image prompt and a video (native, or as frames for Gemma 3, which has no video
input) run through `HFBackend` as the pipeline sends them. The vLLM CPU engine runs the same
twins in tests/test_backend_vllm.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

from test_backend_hf import _answers, _backend, _img, _request, _video  # noqa: E402

from ger.testing.tiny_models import ensure_tiny_model  # noqa: E402

# conf/model option -> (builder kind, architecture class, placeholder token in the chat template)
FAMILIES = {
    "tiny-random-internvl3": ("internvl3", "InternVLForConditionalGeneration", "<IMG_CONTEXT>"),
    "tiny-random-llava-onevision": (
        "llava_onevision",
        "LlavaOnevisionForConditionalGeneration",
        "<image>",
    ),
    "tiny-random-qwen3vl": ("qwen3_vl", "Qwen3VLForConditionalGeneration", "<|image_pad|>"),
    "tiny-random-qwen2_5vl": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "<|image_pad|>"),
    "tiny-random-qwen2_5omni": ("qwen2_5_omni", "Qwen2_5OmniForConditionalGeneration", "<|IMAGE|>"),
    "tiny-random-gemma3": ("gemma3", "Gemma3ForConditionalGeneration", "<start_of_image>"),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, ger_cache):
    backend = _backend(request.param, ger_cache)
    yield request.param, backend
    backend.close()


def test_twin_is_the_family_architecture_and_small(family, ger_cache):
    import json

    name, backend = family
    kind, arch, placeholder = FAMILIES[name]
    folder = Path(ensure_tiny_model(kind, ger_cache))
    assert json.loads((folder / "config.json").read_text())["architectures"] == [arch]
    assert type(backend.model).__name__.replace("Thinker", "") == arch  # omni: the backend runs the thinker
    assert sum(p.numel() for p in backend.model.parameters()) < 2_000_000
    text_cfg = backend.model.config.get_text_config()
    assert text_cfg.hidden_size // text_cfg.num_attention_heads == 64  # vLLM CPU kernels need 64
    parts = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]
    chat = [{"role": "user", "content": parts}]
    prompt = backend.processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt.count(placeholder) == 2


def test_single_image_multi_image_and_video(family):
    name, backend = family
    video = _video(4)
    if not backend.spec.supports_video:  # Gemma 3: the pipeline sends a clip's frames as images
        video = {"type": "video", **{k: v for k, v in video.items() if k != "type"}}
    requests = [
        _request("one", _img(1), max_tokens=6),
        _request("three", _img(2), _img(3, size=(100, 80)), _img(4, size=(40, 90)), max_tokens=6),
        _request("clip", video, max_tokens=6),
        _request("frames", *[_img(10 + i) for i in range(4)], max_tokens=6),
    ]
    answers = _answers(backend, requests)
    for key in ("one", "three", "frames"):
        assert answers[key].error is None and answers[key].ok, (name, key, answers[key].error)
    if backend.spec.supports_video:
        assert answers["clip"].error is None and answers["clip"].ok, (name, answers["clip"].error)
    else:
        assert "no native video" in answers["clip"].error


def test_images_reach_the_model(family):
    name, backend = family
    answers = _answers(backend, [_request("x", _img(1), max_tokens=8), _request("y", _img(7), max_tokens=8)])
    assert answers["x"].text != answers["y"].text, name


def test_greedy_answers_do_not_depend_on_batching(family):
    _, backend = family
    requests = [
        _request("a", _img(1), max_tokens=5),
        _request("b", _img(2), _img(3, size=(90, 120)), text="Sort: Happiness, Sadness.", max_tokens=5),
    ]
    batched = {k: r.text for k, r in _answers(backend, requests).items()}
    alone = {r.key: _answers(backend, [r])[r.key].text for r in requests}
    assert batched == alone


def test_choices_constrain_the_answer(family):
    _, backend = family
    labels = ["Happiness", "Sadness", "Neutral", "Anger"]
    answers = _answers(backend, [_request("c", _img(1), choices=labels)])
    assert answers["c"].text in labels


def _tone(freq: float, rate: int = 16000, seconds: float = 1.5) -> dict:
    """A sound track as ger's audio parts carry it: mono float samples and their rate."""
    import numpy as np

    t = np.arange(int(rate * seconds)) / rate
    samples = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return {"type": "audio", "audio": samples, "sampling_rate": rate}


@pytest.fixture(scope="module")
def omni(ger_cache):
    backend = _backend("tiny-random-qwen2_5omni", ger_cache)
    yield backend
    backend.close()


def test_omni_twin_hears_audio_alone_and_with_video(omni):
    answers = _answers(
        omni,
        [
            _request("low", _tone(220.0), max_tokens=8),
            _request("high", _tone(1760.0), max_tokens=8),
            _request("with-video", _video(4), _tone(440.0), max_tokens=8),
            _request("choice", _tone(440.0), choices=["Happiness", "Sadness"]),
            _request("8k", _tone(440.0, rate=8000)),
            _request("two", _tone(220.0), _tone(440.0)),
        ],
    )
    for key in ("low", "high", "with-video"):  # random weights may stop at once (empty text): no error
        assert answers[key].error is None, (key, answers[key].error)
    assert answers["low"].ok and answers["high"].ok
    assert answers["low"].text != answers["high"].text  # the sound reaches the text model
    assert answers["choice"].text in ("Happiness", "Sadness")
    assert "8000 Hz; this model takes 16000 Hz" in answers["8k"].error
    assert "max_audios=1" in answers["two"].error


def test_model_without_audio_refuses_it(ger_cache):
    backend = _backend("tiny-random-qwen3vl", ger_cache)
    try:
        (answer,) = _answers(backend, [_request("a", _tone(440.0))]).values()
    finally:
        backend.close()
    assert "takes no audio" in answer.error and "supports_audio" in answer.error


def test_omni_twin_hears_a_clips_own_sound_track_with_its_frames(omni, tmp_path):
    """A video's speech track read by ger.data.audio, its frames by ger.data.video, in one request."""
    from test_audio import _clip

    from ger.data.audio import read_audio
    from ger.data.media import read_frames

    clip = _clip(tmp_path / "clip.mp4", "sine=frequency=440")
    frames = read_frames(clip, [0, 12, 25, 37])
    video = {"type": "video", "frames": frames, "fps": 25.0, "total_frames": 50, "indices": [0, 12, 25, 37]}
    (answer,) = _answers(omni, [_request("clip", video, read_audio(clip).part(), max_tokens=6)]).values()
    assert answer.error is None, answer.error
