"""Tiny random-weight vision-language models, built locally for tests.

Tests must never download weights, yet they should drive the real engines
(transformers, vLLM CPU) end to end. So we build, in seconds and deterministically,
complete Hugging Face model folders: a config with tiny sizes, random weights in
safetensors, a byte-level BPE tokenizer trained on a small built-in corpus, the
image/video processor configs and a chat template. The answers are gibberish, but
every code path (chat template, image/video placeholders, batching, decoding) is real.

Sizes obey what vLLM's CPU kernels accept: text attention head size 64 (16 fails)
and, for Qwen2-VL, a vision hidden size equal to the text hidden size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUILD_VERSION = 3  # bump when a builder changes in a way the spec hash does not see
SEED = 0
MAX_LEN = 4096  # context length of every tiny model
# Wider than the usual 0.02 so random weights react to their input: different images
# give different answers, which lets tests see that media reach the model.
INIT_RANGE = 0.1

# Text sizes shared by every kind: 2 heads of 64 = hidden 128.
TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "heads": 2, "kv_heads": 2}
# Qwen2-VL images: 14 px patches merged 2x2, so one token per 28x28 px; 4..16 tokens per image.
QWEN_PIXELS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}
LLAVA_IMAGE = {"image_size": 32, "patch_size": 8}  # 16 image tokens per image (CLS dropped)

EMOTIONS = (
    "Surprise Fear Disgust Happiness Sadness Anger Neutral Contempt Positive Negative "
    "happy sad angry worried surprised fearful disgusted neutral contempt positive negative "
    "happiness sadness anger fear disgust surprise"
)
# Tokenizer corpus in ger's own words (conf/prompts/ shapes), so common prompt words get few tokens.
PROMPT_WORDS = (
    "You are an expert in facial expression recognition. Several images follow. Look only at the "
    "expression and not at who the person is. Rank every candidate category by how well it fits, "
    "most similar first. Candidate categories: ... Answer with one record per image: {'name':, 'result':}. "
    "You are an expert in video expression recognition. Frames of a clip follow. "
    "You are an expert in multimodal emotion recognition. The speaker says: subtitle transcript. "
    "sentiment micro-expression dynamic facial expression. The answer is "
    "0 1 2 3 4 5 6 7 8 9 Image Video Text Sample frame name result score valence arousal -1 1.6 "
    "A small grey cat sleeps on a warm window sill. Yes no, I think it is a smile."
)
CORPUS = [EMOTIONS, PROMPT_WORDS, EMOTIONS.lower(), PROMPT_WORDS.upper()]

QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# Minimal chat templates in each family's format; they accept string or list content.
# Newlines are emitted as expressions because `{%- -%}` would strip literal ones.
QWEN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
LLAVA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] | upper + ': ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def _train_tokenizer(special: list[str], vocab_size: int = 640, bos: str | None = None) -> Any:
    """A byte-level BPE trained on CORPUS; every byte is covered, so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if bos is not None:  # LLaMA-style tokenizers prepend <s> to every encoded text
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tok


def _wrap_tokenizer(raw: Any, chat_template: str, **special: str) -> Any:
    """Wrap a `tokenizers.Tokenizer` as a transformers fast tokenizer with named special tokens."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, padding_side="left", model_max_length=MAX_LEN, **special
    )
    tok.chat_template = chat_template
    return tok


def _padded_vocab(tokenizer: Any) -> int:
    return ((len(tokenizer) + 63) // 64) * 64  # room for every id, rounded like real checkpoints


def _text_sizes() -> dict[str, Any]:
    return {
        "hidden_size": TEXT["hidden_size"],
        "intermediate_size": TEXT["intermediate_size"],
        "num_hidden_layers": TEXT["num_hidden_layers"],
        "num_attention_heads": TEXT["heads"],
        "num_key_value_heads": TEXT["kv_heads"],
        "max_position_embeddings": MAX_LEN,
    }


def _qwen_tokenizer() -> Any:
    raw = _train_tokenizer(QWEN_SPECIAL)
    return _wrap_tokenizer(raw, QWEN_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _qwen_ids(tok: Any) -> dict[str, int]:
    """The placeholder token ids a Qwen-VL config names."""
    names = {"image": "<|image_pad|>", "video": "<|video_pad|>"}
    names |= {"vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"}
    return {f"{key}_token_id": tok.convert_tokens_to_ids(token) for key, token in names.items()}


def _qwen_text(tok: Any) -> dict[str, Any]:
    return _text_sizes() | {
        "vocab_size": _padded_vocab(tok),
        # M-RoPE splits the 32 rotary frequency pairs of a 64-wide head over (time, height, width)
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def _qwen_processor(kind: str, tok: Any) -> Any:
    """Image + video processors sized so a frame is 4-16 tokens; shared by Qwen2-VL and 2.5-VL."""
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    common = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    size = {"shortest_edge": QWEN_PIXELS["min_pixels"], "longest_edge": QWEN_PIXELS["max_pixels"]}
    image = Qwen2VLImageProcessor(size=size, **common)
    video = Qwen2VLVideoProcessor(size=size, **common)
    cls = Qwen2VLProcessor if kind == "qwen2_vl" else Qwen2_5_VLProcessor
    return cls(image_processor=image, tokenizer=tok, video_processor=video, chat_template=QWEN_TEMPLATE)


def _qwen2_vl_config(tok: Any) -> Any:
    from transformers import Qwen2VLConfig

    vision = {
        "depth": 2,
        "embed_dim": TEXT["hidden_size"],
        "hidden_size": TEXT["hidden_size"],  # = text hidden size (vLLM CPU needs it)
        "mlp_ratio": 2,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(text_config=_qwen_text(tok), vision_config=vision, **_qwen_ids(tok))


def _qwen2_5_vl_config(tok: Any) -> Any:
    from transformers import Qwen2_5_VLConfig

    vision = {
        "depth": 2,
        "hidden_size": TEXT["hidden_size"],
        "out_hidden_size": TEXT["hidden_size"],
        "intermediate_size": 256,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    }
    return Qwen2_5_VLConfig(text_config=_qwen_text(tok), vision_config=vision, **_qwen_ids(tok))


def _llava_parts() -> tuple[Any, Any, Any]:
    """LLaVA-1.5 layout: a llama text model, a CLIP vision tower and `<image>` placeholders."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    raw = _train_tokenizer(LLAVA_SPECIAL, bos="<s>")
    tok = _wrap_tokenizer(
        raw, LLAVA_TEMPLATE, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.image_token = "<image>"
    text = LlamaConfig(
        **_text_sizes(),
        vocab_size=_padded_vocab(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=128,
        **LLAVA_IMAGE,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    side = LLAVA_IMAGE["image_size"]
    image = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = LlavaProcessor(
        image_processor=image,
        tokenizer=tok,
        patch_size=LLAVA_IMAGE["patch_size"],
        vision_feature_select_strategy="default",
        chat_template=LLAVA_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's CLS token
    )
    return config, processor, tok


def _qwen_parts(kind: str) -> tuple[Any, Any, Any]:
    tok = _qwen_tokenizer()
    config = _qwen2_vl_config(tok) if kind == "qwen2_vl" else _qwen2_5_vl_config(tok)
    return config, _qwen_processor(kind, tok), tok


_BUILDERS: dict[str, Callable[[], tuple[Any, Any, Any]]] = {
    "qwen2_vl": lambda: _qwen_parts("qwen2_vl"),
    "qwen2_5_vl": lambda: _qwen_parts("qwen2_5_vl"),
    "llava": _llava_parts,
}


def _all_builders() -> dict[str, Callable[[], tuple[Any, Any, Any]]]:
    from ger.testing.tiny_families import BUILDERS  # imported late: that module reuses the helpers above

    return _BUILDERS | BUILDERS


def tiny_kinds() -> list[str]:
    return sorted(_all_builders())


def _llava_hf_layout(out_dir: Path) -> None:
    """Save the CLIP tower under `vision_tower.vision_model.`, the llava-hf layout.

    transformers 5 writes `vision_tower.embeddings...`, which vLLM's LLaVA loader does
    not map; transformers itself loads both layouts to the same tensors.
    """
    from safetensors.torch import load_file, save_file

    path = out_dir / "model.safetensors"
    tensors = load_file(path)
    renamed = {
        (
            k.replace("vision_tower.", "vision_tower.vision_model.", 1)
            if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
            else k
        ): v
        for k, v in tensors.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})


def build_tiny_model(kind: str, out_dir: Path) -> Path:
    """Write a complete, offline-loadable HF model folder of the given kind into `out_dir`."""
    builders = _all_builders()
    if kind not in builders:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {tiny_kinds()}")
    import torch
    from transformers import AutoModelForMultimodalLM, GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config, processor, tok = builders[kind]()
    for sub in (config, *(getattr(config, k) for k in config.sub_configs)):
        sub.initializer_range = INIT_RANGE
    torch.manual_seed(SEED)  # same weights on every machine and run
    model = AutoModelForMultimodalLM.from_config(config, dtype=torch.float32)  # image-text models and omni
    if kind not in _BUILDERS:
        from ger.testing.tiny_families import finish_weights

        finish_weights(kind, model, INIT_RANGE)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir)
    if kind in ("llava", "llava_onevision", "gemma3"):
        _llava_hf_layout(out_dir)
    if kind == "qwen2_5_omni":  # Qwen2.5-Omni loads its voices file; the twin has no voices
        torch.save({}, out_dir / "spk_dict.pt")
    processor.save_pretrained(out_dir)
    for part in ("image_processor", "video_processor"):  # also the per-part files older releases read
        if getattr(processor, part, None) is not None:
            getattr(processor, part).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)  # also at top level, for engines that load only a tokenizer
    _portable_tokenizer_class(out_dir)
    (out_dir / "ger_tiny.json").write_text(json.dumps({"kind": kind, "version": tiny_version(kind)}))
    return out_dir


def _portable_tokenizer_class(out_dir: Path) -> None:
    """Name the tokenizer class every transformers release knows (v5 writes "TokenizersBackend")."""
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def tiny_version(kind: str) -> str:
    """A short hash of what shapes the built folder, so a changed builder rebuilds, not reuses."""
    import importlib.metadata

    from ger.testing.tiny_families import SPEC

    spec = {
        "build": BUILD_VERSION,
        "kind": kind,
        "text": TEXT,
        "init": INIT_RANGE,
        "qwen": QWEN_PIXELS,
        "llava": LLAVA_IMAGE,
        "corpus": CORPUS,
        "templates": [QWEN_TEMPLATE, LLAVA_TEMPLATE],
        **({"families": SPEC} if kind not in _BUILDERS else {}),
        # saved formats differ across releases; read without importing (a cached rerun never loads it)
        "transformers": importlib.metadata.version("transformers"),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def cache_root() -> Path:
    return Path(os.environ.get("GER_CACHE_DIR", "~/.cache/ger")).expanduser()


def ensure_tiny_model(kind: str, cache_dir: Path | None = None) -> Path:
    """Build the tiny model once into `<cache>/tiny-models/<kind>-<version>` and return its folder.

    Built in a temporary folder and renamed into place, so concurrent test processes
    either see a complete model or build their own copy and discard it.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / "tiny-models" / f"{kind}-{tiny_version(kind)}"
    if (final / "ger_tiny.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=final.parent))
    try:
        build_tiny_model(kind, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        os.rename(tmp, final)  # atomic on one filesystem; fails if another process won the race
    except OSError:
        if not (final / "ger_tiny.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
