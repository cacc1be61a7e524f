"""Tiny random models: built locally, deterministic, loadable offline; model configs resolve."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

# torch before anything imports decord: decord2 preloads libnvblas globally, and torch's CPU matmuls
# then segfault (see the report); importing torch first keeps its own BLAS bound.
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

from ger.backends.models import ModelSpec, resolve_model  # noqa: E402
from ger.testing.tiny_models import build_tiny_model, ensure_tiny_model, tiny_kinds, tiny_version  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
KINDS = ["qwen2_vl", "qwen2_5_vl", "llava"]


@pytest.fixture(scope="session")
def tiny_model(ger_cache: Path):
    """`tiny_model("qwen2_vl")` -> folder of that tiny model, built on first use into the session cache."""
    return lambda kind: ensure_tiny_model(kind, ger_cache)


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _image(color: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (64, 48)):
    from PIL import Image

    return Image.new("RGB", size, color)


def test_kinds_listed_and_unknown_kind_names_the_valid_ones(tmp_path):
    assert set(KINDS) <= set(tiny_kinds())
    with pytest.raises(ValueError, match="qwen2_vl"):
        build_tiny_model("gpt5", tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_loads_offline_and_respects_vllm_cpu_sizes(kind, tiny_model, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tiny_model(kind)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    text_cfg = model.config.get_text_config()
    assert text_cfg.hidden_size // text_cfg.num_attention_heads == 64  # vLLM CPU kernels need 64
    assert text_cfg.num_hidden_layers == 2
    assert model.get_output_embeddings().weight.shape[0] >= len(processor.tokenizer)
    if kind.startswith("qwen"):
        vision_out = model.config.vision_config.hidden_size
        assert vision_out == text_cfg.hidden_size
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_has_family_special_tokens_and_encodes_labels(kind, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model(kind))
    special = (
        ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_end|>"]
        if kind.startswith("qwen")
        else ["<image>", "<s>", "</s>"]
    )
    for token in special:  # each a single id, never split into bytes
        assert tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(token)) == token
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1
    text = "Happiness, Sadness; Neutral: {'name': 'a.jpg', 'result': 'Surprise'}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.padding_side == "left"


@pytest.mark.parametrize("kind", KINDS)
def test_chat_template_and_processor_expand_image_placeholders(kind, tiny_model):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model(kind))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Emotion?"}],
        }
    ]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    placeholder = "<|image_pad|>" if kind.startswith("qwen") else "<image>"
    assert prompt.count(placeholder) == 2 and "Emotion?" in prompt
    inputs = processor(text=[prompt], images=[_image(), _image(size=(112, 112))], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(placeholder)
    n_image_tokens = int((inputs["input_ids"] == image_id).sum())
    # qwen: 64x48 -> 2x2 merged patches (4 tokens), 112x112 -> 4x4 (16); llava: 16 per image
    assert n_image_tokens == (4 + 16 if kind.startswith("qwen") else 2 * 16)


def test_build_is_deterministic(tmp_path):
    a = build_tiny_model("qwen2_vl", tmp_path / "a")
    b = build_tiny_model("qwen2_vl", tmp_path / "b")
    assert _tree_digest(a) == _tree_digest(b)
    assert "model.safetensors" in _tree_digest(a)


def test_ensure_builds_once_atomically_under_concurrency(tmp_path):
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_tiny_model("llava", tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = tmp_path / "tiny-models" / f"llava-{tiny_version('llava')}"
    assert results == [expected] * 3
    assert (expected / "model.safetensors").exists() and (expected / "ger_tiny.json").exists()
    leftovers = [p.name for p in (tmp_path / "tiny-models").iterdir() if p != expected]
    assert leftovers == []  # losing builders cleaned up their temp folders
    before = (expected / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model("llava", tmp_path) == expected
    assert (expected / "model.safetensors").stat().st_mtime_ns == before  # reused, not rebuilt


def test_resolve_tiny_model_builds_into_cache_and_names_it_portably(ger_cache):
    spec = resolve_model({"name": "t", "tiny": "qwen2_vl", "max_images": 3, "quirk": 1}, cache_dir=ger_cache)
    assert Path(spec.path).parent == ger_cache / "tiny-models"
    assert (Path(spec.path) / "config.json").exists()
    assert spec.max_images == 3 and spec.extra == {"quirk": 1}
    assert spec.identity()["path"] == f"tiny:qwen2_vl-{tiny_version('qwen2_vl')}"  # no machine path in keys


def test_resolve_hub_id_and_errors():
    spec = resolve_model({"name": "q", "path": "Qwen/Qwen2.5-VL-7B-Instruct", "revision": "abc"})
    assert spec.path == "Qwen/Qwen2.5-VL-7B-Instruct" and spec.revision == "abc" and spec.tiny is None
    assert resolve_model(spec) is spec
    with pytest.raises(ValueError, match="path"):
        resolve_model({"name": "nothing"})
    with pytest.raises(ValueError, match="name"):
        resolve_model({"path": "x"})


@pytest.mark.parametrize("yaml_file", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_model_config_resolves(yaml_file, ger_cache):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(yaml_file)
    assert cfg.name == yaml_file.stem
    spec = resolve_model(cfg, cache_dir=ger_cache)
    assert isinstance(spec, ModelSpec) and spec.extra == {}
    assert spec.max_images >= 1 and spec.max_model_len >= 4096
    assert (spec.max_videos >= 1 and spec.max_frames >= 1) == spec.supports_video
    if spec.tiny:
        assert (Path(spec.path) / "model.safetensors").exists()
    else:
        assert "/" in spec.path and not spec.path.startswith("/")  # a hub id
