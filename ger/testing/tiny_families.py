"""Tiny twins of the newer families (InternVL3, LLaVA-OneVision, Qwen3-VL, Gemma 3, Qwen2.5-Omni).

Same recipe as ger/testing/tiny_models.py (tiny sizes, random weights, a small trained BPE
tokenizer), but each with its family's real architecture class, processor class,
special tokens and chat-template structure, so the placeholder expansion, vision
tower, projector and position handling a real checkpoint uses are all exercised.
Text attention heads are 64 wide and vision towers 128 wide for vLLM's CPU kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ger.testing.tiny_models import (
    INIT_RANGE,
    TEXT,
    _padded_vocab,
    _text_sizes,
    _train_tokenizer,
    _wrap_tokenizer,
)

# ChatML (Qwen2 / Qwen3 / InternVL3 / LLaVA-OneVision-Qwen2 language models); `{image}` and
# `{video}` are the family's placeholder strings, filled in by `_chatml`.
CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ 'IMAGE' }}"
    "{%- elif part['type'] == 'video' -%}{{ 'VIDEO' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# Gemma 3: <bos>, user/model turns, images as <start_of_image>, the system prompt folded into the first turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
OMNI_AUDIO = "{%- elif part['type'] == 'audio' -%}{{ '<|audio_bos|><|AUDIO|><|audio_eos|>' }}"
CHATML_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VISION = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2}


def _chatml(image: str, video: str) -> str:
    return CHATML.replace("IMAGE", image).replace("VIDEO", video)


def _chatml_tokenizer(template: str, extra: list[str], named: dict[str, str]) -> Any:
    """A ChatML tokenizer with the family's media tokens as single ids, named as its processor expects."""
    return _wrap_tokenizer(
        _train_tokenizer(CHATML_SPECIAL + extra),
        template,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=named,
    )


def _qwen2_text(tok: Any) -> dict[str, Any]:
    return _text_sizes() | {
        "model_type": "qwen2",
        "vocab_size": _padded_vocab(tok),
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def _internvl_parts() -> tuple[Any, Any, Any]:
    """InternVL3 in the -hf format: InternViT (here 32 px, 8 px patches) -> pixel shuffle -> Qwen2."""
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLProcessor, InternVLVideoProcessor

    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    template = _chatml("<IMG_CONTEXT>\\n", "<video>\\n")
    tok = _chatml_tokenizer(template, list(named.values()), named)
    side, patch = 32, 8
    vision = VISION | {"image_size": [side, side], "patch_size": [patch, patch]}
    vision["model_type"] = "internvl_vision"
    config = InternVLConfig(
        vision_config=vision,
        text_config=_qwen2_text(tok),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    size = {"height": side, "width": side}
    # tiles plus a thumbnail, as InternVL3 does (up to 12 tiles there, 4 here)
    image = GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=4)
    video = InternVLVideoProcessor(size=size)
    seq = (side // patch) ** 2 // 4  # pixel shuffle 0.5: 16 patches -> 4 tokens
    processor = InternVLProcessor(
        image_processor=image,
        tokenizer=tok,
        video_processor=video,
        image_seq_length=seq,
        chat_template=template,
    )
    return config, processor, tok


def _onevision_parts() -> tuple[Any, Any, Any]:
    """LLaVA-OneVision: SigLIP (32 px, 8 px patches) + anyres grid + Qwen2, `<image>`/`<video>` tokens."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    named = {"image_token": "<image>", "video_token": "<video>"}
    template = _chatml("<image>\\n", "<video>\\n")
    tok = _chatml_tokenizer(template, list(named.values()), named)
    side, patch = 32, 8
    grid = [[32, 32], [32, 64], [64, 32], [64, 64]]
    vision = VISION | {"image_size": side, "patch_size": patch, "model_type": "siglip_vision_model"}
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=_qwen2_text(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=grid,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    size = {"height": side, "width": side}
    image = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=grid)
    video = LlavaOnevisionVideoProcessor(size=size)
    processor = LlavaOnevisionProcessor(
        image_processor=image,
        tokenizer=tok,
        video_processor=video,
        num_image_tokens=(side // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=template,
        vision_aspect_ratio="anyres_max_9",
    )
    return config, processor, tok


def _qwen3_vl_parts() -> tuple[Any, Any, Any]:
    """Qwen3-VL: 16 px patches merged 2x2 (one token per 32x32 px), DeepStack, interleaved M-RoPE."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor

    from ger.testing.tiny_models import QWEN_SPECIAL, QWEN_TEMPLATE, _qwen_ids

    tok = _wrap_tokenizer(
        _train_tokenizer(QWEN_SPECIAL), QWEN_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    text = _qwen2_text(tok) | {
        "model_type": "qwen3_vl_text",
        "head_dim": TEXT["hidden_size"] // TEXT["heads"],
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": [8, 12, 12],
            "mrope_interleaved": True,
        },
    }
    vision = VISION | {
        "model_type": "qwen3_vl_vision",
        "depth": 2,
        "num_heads": 2,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": TEXT["hidden_size"],
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    }
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
    common = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2}
    size = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 16}  # 4..16 tokens per image
    image = Qwen2VLImageProcessor(size=size, **common)
    # Qwen3-VL's video budget is for all frames together (T * H * W pixels): room for 16 small frames
    video = Qwen3VLVideoProcessor(size={"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64}, **common)
    processor = Qwen3VLProcessor(
        image_processor=image, tokenizer=tok, video_processor=video, chat_template=QWEN_TEMPLATE
    )
    return config, processor, tok


def _gemma3_parts() -> tuple[Any, Any, Any]:
    """Gemma 3: SigLIP (32 px, 8 px patches) pooled to 4 soft tokens per image, Gemma 3 text model."""
    from tokenizers import AddedToken
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    named = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>"}
    named["eoi_token"] = "<end_of_image>"
    raw = _train_tokenizer(special + list(named.values()))
    # Gemma's vocabulary has runs of newlines as single tokens, which vLLM's Gemma 3 processor looks up
    raw.add_tokens([AddedToken("\n" * n, normalized=False) for n in range(1, 5)])
    tok = _wrap_tokenizer(
        raw,
        GEMMA_TEMPLATE,
        bos_token="<bos>",
        eos_token="<end_of_turn>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=named,
    )
    tokens_per_image = 4
    text = _text_sizes() | {
        "model_type": "gemma3_text",
        "vocab_size": _padded_vocab(tok),
        "head_dim": TEXT["hidden_size"] // TEXT["heads"],
        "query_pre_attn_scalar": TEXT["hidden_size"] // TEXT["heads"],
        "sliding_window": 64,
        "layer_types": ["sliding_attention", "full_attention"],
        "tie_word_embeddings": False,  # tied random embeddings answer one token whatever the image
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    side, patch = 32, 8
    vision = VISION | {"image_size": side, "patch_size": patch, "model_type": "siglip_vision_model"}
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=tokens_per_image,
        tie_word_embeddings=False,
        boi_token_id=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_id=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_id=tok.convert_tokens_to_ids("<image_soft_token>"),
    )
    image = Gemma3ImageProcessor(size={"height": side, "width": side})
    processor = Gemma3Processor(
        image_processor=image, tokenizer=tok, image_seq_length=tokens_per_image, chat_template=GEMMA_TEMPLATE
    )
    return config, processor, tok


def _omni_parts() -> tuple[Any, Any, Any]:
    """Qwen2.5-Omni's thinker (the text-answering half): Qwen2.5-VL vision, Whisper-style audio, Qwen2."""
    from transformers import (
        Qwen2_5OmniConfig,
        Qwen2_5OmniProcessor,
        Qwen2_5OmniThinkerConfig,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    named = {
        "image_token": "<|IMAGE|>",
        "video_token": "<|VIDEO|>",
        "audio_token": "<|AUDIO|>",
        "vision_bos_token": "<|vision_bos|>",
        "vision_eos_token": "<|vision_eos|>",
        "audio_bos_token": "<|audio_bos|>",
        "audio_eos_token": "<|audio_eos|>",
    }
    template = _chatml(
        "<|vision_bos|><|IMAGE|><|vision_eos|>", "<|vision_bos|><|VIDEO|><|vision_eos|>"
    ).replace("{%- elif part['type'] == 'text' -%}", OMNI_AUDIO + "{%- elif part['type'] == 'text' -%}")
    tok = _chatml_tokenizer(template, list(named.values()), named)
    ids = {f"{k.removesuffix('_token')}_token_index": tok.convert_tokens_to_ids(v) for k, v in named.items()}
    text = _qwen2_text(tok) | {
        "model_type": "qwen2_5_omni_text",
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
    }
    vision = VISION | {
        "depth": 2,
        "num_heads": 2,
        "out_hidden_size": TEXT["hidden_size"],
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    audio = {
        "num_mel_bins": 128,
        "encoder_layers": 2,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 256,
        "d_model": 128,
        "output_dim": TEXT["hidden_size"],
        "n_window": 100,
    }
    thinker = Qwen2_5OmniThinkerConfig(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        image_token_index=ids["image_token_index"],
        video_token_index=ids["video_token_index"],
        audio_token_index=ids["audio_token_index"],
        audio_start_token_id=ids["audio_bos_token_index"],
        audio_end_token_id=ids["audio_eos_token_index"],
        vision_start_token_id=ids["vision_bos_token_index"],
        vision_end_token_id=ids["vision_eos_token_index"],
        initializer_range=INIT_RANGE,
    )
    for sub in (thinker.text_config, thinker.vision_config, thinker.audio_config):
        sub.initializer_range = INIT_RANGE
    # The released layout: a Qwen2_5OmniModel folder holding the thinker; no talker (speech output).
    config = Qwen2_5OmniConfig(thinker_config=thinker.to_dict(), enable_audio_output=False)
    common = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    size = {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16}
    processor = Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **common),
        video_processor=Qwen2VLVideoProcessor(size=size, **common),
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=tok,
        chat_template=template,
    )
    return config, processor, tok


def finish_weights(kind: str, model: Any, init_range: float) -> None:
    """Randomise weights the family's init leaves at zero (Gemma 3's projector), so images reach the text."""
    import torch

    if kind == "gemma3":
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, init_range)


BUILDERS: dict[str, Callable[[], tuple[Any, Any, Any]]] = {
    "internvl3": _internvl_parts,
    "llava_onevision": _onevision_parts,
    "qwen3_vl": _qwen3_vl_parts,
    "gemma3": _gemma3_parts,
    "qwen2_5_omni": _omni_parts,
}
# What shapes these folders beyond the shared sizes (goes into tiny_version).
SPEC = {"chatml": CHATML, "gemma": GEMMA_TEMPLATE, "vision": VISION, "version": 4}  # bump on builder changes
