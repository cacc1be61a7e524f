"""The transformers backend, driven end to end with tiny random-weight models on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

# torch before anything imports decord: decord2 preloads libnvblas globally, and torch's CPU matmuls
# then segfault (see the report); importing torch first keeps its own BLAS bound.
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

from ger.backends import create_backend  # noqa: E402
from ger.records import Request, Response  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


def _backend(model_yaml: str, ger_cache: Path, **overrides):
    """Compose conf/backend/hf.yaml and a conf/model file the way the top-level config does."""
    from omegaconf import OmegaConf

    root = OmegaConf.create(
        {
            "sampling": {"temperature": 0.0, "max_tokens": 16, "seed": 0},
            "cache_dir": str(ger_cache),
            "backend": OmegaConf.load(CONF / "backend" / "hf.yaml"),
            "model": OmegaConf.load(CONF / "model" / f"{model_yaml}.yaml"),
        }
    )
    root.backend.device = "cpu"
    for key, value in overrides.items():
        OmegaConf.update(root, key, value)
    return create_backend(root.backend.name, root.backend, root.model)


@pytest.fixture(scope="module")
def qwen(ger_cache):
    backend = _backend("tiny-random-qwen2vl", ger_cache)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def llava(ger_cache):
    backend = _backend("tiny-random-llava", ger_cache)
    yield backend
    backend.close()


def _image(seed: int, size: tuple[int, int] = (64, 48)):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _request(key: str, *media: dict, text: str = "Which emotion is shown?", **kw) -> Request:
    content = [*media, {"type": "text", "text": text}]
    return Request(key=key, names=(key,), messages=[{"role": "user", "content": content}], **kw)


def _img(seed: int, **kw) -> dict:
    return {"type": "image", "image": _image(seed, **kw)}


def _video(n: int = 4) -> dict:
    frames = [_image(100 + i) for i in range(n)]
    return {
        "type": "video",
        "frames": frames,
        "fps": 25.0,
        "total_frames": 75,
        "indices": list(range(0, 75, 75 // n))[:n],
    }


def _answers(backend, requests: list[Request]) -> dict[str, Response]:
    responses = list(backend.generate(requests))
    assert len(responses) == len(requests)
    by_key = {r.key: r for r in responses}
    assert set(by_key) == {r.key for r in requests}
    return by_key


def _third(kind: str) -> Request:
    if kind == "qwen":
        return _request("video", _video(), text="What emotion does the video show?", max_tokens=6)
    return _request("text-only", text="Name one emotion.", max_tokens=6)


@pytest.mark.parametrize("kind", ["qwen", "llava"])
def test_batch_of_three_answers_every_key(kind, request):
    backend = request.getfixturevalue(kind)
    requests = [
        _request("one-image", _img(1), max_tokens=8),
        _request("two-images", _img(2), _img(3, size=(100, 80)), max_tokens=8),
        _third(kind),
    ]
    answers = _answers(backend, requests)
    for key, response in answers.items():
        assert response.error is None, (key, response.error)
        assert isinstance(response.text, str) and response.ok  # random weights still emit tokens
        assert response.seconds > 0 and not response.cached
        assert response.finish_reason in ("stop", "length")  # batch mode splits a cut answer


def test_broken_request_fails_alone(qwen):
    requests = [
        _request("good-1", _img(1), max_tokens=4),
        _request("not-an-image", {"type": "image", "image": "face.jpg"}),
        _request("good-2", _img(2), _img(3), max_tokens=4),
        _request("odd-part", {"type": "audio", "audio": b"..."}),
        _request("empty-video", {"type": "video", "frames": [], "fps": 25.0, "total_frames": 0}),
    ]
    answers = _answers(qwen, requests)
    assert answers["good-1"].ok and answers["good-2"].ok
    assert "not a PIL image" in answers["not-an-image"].error
    assert "takes no audio" in answers["odd-part"].error  # its config has supports_audio: false
    assert "no frames" in answers["empty-video"].error


def test_llava_takes_no_native_video_and_caps_images(llava):
    too_many = [_img(i) for i in range(21)]  # the config allows 20
    answers = _answers(
        llava,
        [_request("video", _video()), _request("many", *too_many), _request("ok", _img(1), max_tokens=4)],
    )
    assert "no native video" in answers["video"].error
    assert "max_images=20" in answers["many"].error
    assert answers["ok"].ok


def test_greedy_answers_do_not_depend_on_batching(qwen):
    requests = [
        _request("a", _img(1), max_tokens=6),
        _request(
            "b", _img(2), _img(3, size=(90, 120)), text="Sort: Happiness, Sadness, Anger.", max_tokens=6
        ),
        _request("c", _video(2), max_tokens=6),
    ]
    batched = {k: r.text for k, r in _answers(qwen, requests).items()}
    alone = {r.key: _answers(qwen, [r])[r.key].text for r in requests}
    assert batched == alone  # left padding and masks are right: a neighbour never changes an answer


def test_images_reach_the_model(qwen, llava):
    for backend in (qwen, llava):
        answers = _answers(
            backend, [_request("x", _img(1), max_tokens=8), _request("y", _img(7), max_tokens=8)]
        )
        assert answers["x"].text != answers["y"].text


def test_max_tokens_cuts_the_same_greedy_answer(qwen):
    short = _answers(qwen, [_request("s", _img(4), max_tokens=3)])["s"].text
    long = _answers(qwen, [_request("s", _img(4), max_tokens=12)])["s"].text
    assert len(short) < len(long)
    assert long.startswith(short.rstrip("\ufffd"))  # a cut may split a multi-byte character


@pytest.mark.parametrize("kind", ["qwen", "llava"])
def test_choices_constrain_the_answer_to_one_label(kind, request):
    backend = request.getfixturevalue(kind)
    labels = ["Happiness", "Sadness", "Neutral", "Anger"]
    requests = [
        _request("c1", _img(1), choices=labels),
        _request("c2", _img(2), choices=["Positive", "Negative"]),
        _request("free", _img(3), max_tokens=5),
    ]
    answers = _answers(backend, requests)
    assert answers["c1"].text in labels
    assert answers["c2"].text in ["Positive", "Negative"]
    assert answers["free"].ok


def test_prompt_longer_than_context_is_an_error(ger_cache):
    backend = _backend("tiny-random-qwen2vl", ger_cache, **{"model.max_model_len": 60})
    answers = _answers(
        backend, [_request("short", max_tokens=2, text="Hi"), _request("long", _img(1, size=(400, 400)))]
    )
    assert answers["short"].ok
    assert "exceeds max_model_len=60" in answers["long"].error


def test_unknown_backend_setting_is_refused(ger_cache):
    with pytest.raises(ValueError, match="batch_size"):
        create_backend("hf", {"name": "hf", "batchsize": 8}, {"name": "t", "tiny": "qwen2_vl"})
