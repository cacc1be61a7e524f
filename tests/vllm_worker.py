"""Run VLLMBackend once on a tiny model and write every answer to JSON (used by test_backend_vllm.py).

vLLM spawns worker processes, which re-import the main module; pytest's process
cannot be that module, so the engine lives in this script and the test asserts on
its JSON. One engine answers every case in one `generate` call, with a small
chunk_size so that several engine calls (and the error split) are exercised.

Usage: python tests/vllm_worker.py MODEL OUT.json [LOAD_FORMAT]
  MODEL: a conf/model name or a model YAML path; LOAD_FORMAT: auto (the folder's weights) | dummy
Exit code 3 means `import vllm` failed (the reason is in the JSON).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

from ger.config import load_group_yaml
from ger.records import Request

LABELS = ["Happiness", "Sadness", "Neutral", "Anger"]
MAX_TOKENS = 8
# CPU test settings on top of conf/backend/vllm.yaml.
OVERRIDES = {
    "enforce_eager": True,
    "cpu_kvcache_space_gb": 1,
    "in_process": True,  # no engine/worker processes to spawn: each would re-import torch and vLLM
    "chunk_size": 3,
    "max_num_seqs": 8,
}


def image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A small deterministic RGB picture (gradient plus a seed-dependent square)."""
    img = Image.new("RGB", size)
    px = img.load()
    for x in range(size[0]):
        for y in range(size[1]):
            px[x, y] = ((x * 4 + seed * 40) % 256, (y * 5) % 256, (x + y + seed * 17) % 256)
    return img


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


def text(s: str) -> dict[str, Any]:
    return {"type": "text", "text": s}


def img(seed: int) -> dict[str, Any]:
    return {"type": "image", "image": image(seed)}


def video(n: int, fps: float = 25.0, total: int = 100) -> dict[str, Any]:
    indices = [i * total // n for i in range(n)]
    return {
        "type": "video",
        "frames": [image(i) for i in range(n)],
        "fps": fps,
        "total_frames": total,
        "indices": indices,
    }


def tone(freq: float, rate: int = 16000, seconds: float = 1.5) -> dict[str, Any]:
    """A mono sound track as ger's audio parts carry it (samples and their rate)."""
    import numpy as np

    t = np.arange(int(rate * seconds)) / rate
    samples = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return {"type": "audio", "audio": samples, "sampling_rate": rate}


def cases(model: dict[str, Any]) -> dict[str, list[Request]]:
    """case name -> its requests; keys are unique across cases."""
    ask = text("Which emotion does the face show? Answer with one label.")
    # Order matters: with chunk_size 3 the over-long prompt shares an engine call with two
    # good ones, so the backend must split that call and still answer those two.
    out: dict[str, list[Request]] = {
        "single_image": [
            Request(f"single-{i}", (f"s{i}",), user(img(i), ask), max_tokens=MAX_TOKENS) for i in range(3)
        ],
        # Longer than max_model_len: the engine rejects it; that request alone must fail.
        "too_long": [Request("too-long", ("t",), user(img(0), text("happy sad " * model["max_model_len"])))],
        "choice": [
            Request(f"choice-{i}", (f"c{i}",), user(img(i), ask), choices=LABELS, max_tokens=MAX_TOKENS)
            for i in range(2)
        ],
        "multi_image": [
            Request("multi-3", ("a", "b", "c"), user(img(1), img(2), img(3), ask), max_tokens=MAX_TOKENS)
        ],
        "too_many_images": [
            Request("too-many", ("m",), user(*[img(i) for i in range(model["max_images"] + 1)], ask))
        ],
    }
    if model.get("supports_video"):
        out["video"] = [Request("video-4", ("v",), user(video(4), ask), max_tokens=MAX_TOKENS)]
        out["video_choice"] = [
            Request("video-c", ("w",), user(video(3), ask), choices=LABELS, max_tokens=MAX_TOKENS)
        ]
    else:
        out["video_unsupported"] = [Request("video-x", ("x",), user(video(2), ask), max_tokens=MAX_TOKENS)]
    if model.get("supports_audio"):
        out["audio"] = [
            Request("audio-low", ("al",), user(tone(220.0), ask), max_tokens=MAX_TOKENS),
            Request("audio-high", ("ah",), user(tone(1760.0), ask), max_tokens=MAX_TOKENS),
            Request("audio-video", ("av",), user(video(4), tone(440.0), ask), max_tokens=MAX_TOKENS),
        ]
        out["audio_wrong_rate"] = [Request("audio-8k", ("a8",), user(tone(440.0, rate=8000), ask))]
    else:
        refused = Request("audio-x", ("ax",), user(tone(440.0), ask), max_tokens=MAX_TOKENS)
        out["audio_unsupported"] = [refused]
    return out


def video_tokens(backend: Any) -> dict[str, int]:
    """Frames sent -> video placeholder tokens in the engine's prompt, for one 4 s clip at 25 fps.

    If vLLM re-sampled the clip by its fps, every count would map to the same frames.
    """
    counts = {}
    tokenizer = backend.llm.get_tokenizer()
    pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    for n in (2, 4, 8):
        req = Request(f"frames-{n}", ("f",), user(video(n), text("?")), max_tokens=1)
        (out,) = backend.llm.generate(
            [backend.engine_prompt(req)], [backend.sampling_params(req)], use_tqdm=False
        )
        counts[str(n)] = out.prompt_token_ids.count(pad)
    return counts


def backend_config(overrides: dict[str, Any]) -> dict[str, Any]:
    """conf/backend/vllm.yaml resolved as the `ger` command would (no `sampling` block: defaults)."""
    from omegaconf import OmegaConf

    root = OmegaConf.create({"backend": load_group_yaml("backend", "vllm") | overrides})
    return OmegaConf.to_container(root.backend, resolve=True)  # type: ignore[return-value]


def load_model(name: str) -> dict[str, Any]:
    """A conf/model option by name, or a model YAML file by path (for trying other folders)."""
    if name.endswith(".yaml"):
        import yaml

        return yaml.safe_load(Path(name).read_text())
    return load_group_yaml("model", name)


def main(model_name: str, out_path: Path, load_format: str = "auto") -> int:
    result: dict[str, Any] = {"model": model_name}
    try:
        import vllm

        result["vllm"] = vllm.__version__
    except Exception as exc:  # not installed, or a broken install: the test skips with this reason
        result["import_error"] = f"{type(exc).__name__}: {exc}"
        out_path.write_text(json.dumps(result, indent=2))
        return 3
    from ger.backends import create_backend

    t0 = time.perf_counter()
    model = load_model(model_name)
    backend_cfg = backend_config(OVERRIDES | {"load_format": load_format})
    backend = create_backend(backend_cfg["name"], backend_cfg, model)
    result["start_seconds"] = round(time.perf_counter() - t0, 2)
    result["engine_seconds"] = round(backend.start_seconds, 2)
    by_case = cases(model)
    requests = [r for reqs in by_case.values() for r in reqs]
    t1 = time.perf_counter()
    answers = [
        dict(key=r.key, text=r.text, error=r.error, seconds=r.seconds, finish_reason=r.finish_reason)
        for r in backend.generate(requests)
    ]
    result["generate_seconds"] = round(time.perf_counter() - t1, 2)
    result["request_order"] = [r.key for r in requests]
    result["answer_order"] = [a["key"] for a in answers]
    by_key = {a["key"]: a for a in answers}
    result["cases"] = {name: [by_key.get(r.key) for r in reqs] for name, reqs in by_case.items()}
    result["labels"] = LABELS
    if model.get("supports_video"):
        result["video_tokens"] = video_tokens(backend)
    backend.close()
    out_path.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":  # required: vLLM's workers re-import this module
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:]))
