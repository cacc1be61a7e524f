"""What a run shows the model: the `modality=` ablations of the multimodal sets (video, text, both,
and the sound track for audio models), the prompt template each one takes, and the refusals that
must come before any model is built or file decoded."""

from __future__ import annotations

from omegaconf import DictConfig

from ger.data.audio import DEFAULT_RATE
from ger.data.datasets import DatasetSpec
from ger.errors import UserError
from ger.prompting.prompts import modality_inputs

# `modality=` choices -> what the prompt sends (ger/prompting/prompts.py MODALITIES). The audio
# choices add the clip's sound track for models with `supports_audio` and sets with `speech: true`.
MODALITY_CHOICES = {
    "video": "visual",
    "text": "text",
    "multi": "multi",
    "audio": "audio",
    "audio_video": "audio_visual",
    "audio_text": "audio_text",
    "audio_video_text": "audio_multi",
}


def modality_plan(cfg: DictConfig, spec: DatasetSpec) -> tuple[str, str]:
    """(prompt modality, template name): the multimodal ablations swap the template with the inputs.

    Every refusal here comes before a model is built or a file decoded: a set without transcripts or
    speech, or a model without audio input, is a one-line user error naming the fix."""
    transcripts = spec.modality == "video+text"
    choice = cfg.modality or ("multi" if transcripts else "video")
    if choice not in MODALITY_CHOICES:
        raise UserError(f"unknown modality {choice!r}; expected one of {list(MODALITY_CHOICES)} (or null)")
    prompt_modality = MODALITY_CHOICES[choice]
    _, text, audio = modality_inputs(prompt_modality)
    if text and not transcripts:
        raise UserError(f"dataset {spec.key} has no transcripts; modality must not be {choice!r}")
    if audio:
        check_audio_choice(cfg, spec, choice)
    if not audio and not transcripts:
        if cfg.modality not in (None, "video"):
            raise UserError(
                f"dataset {spec.key} has no transcripts; modality must stay null, not {cfg.modality!r}"
            )
        return "visual", cfg.prompt or spec.prompt
    if choice not in cfg.modality_prompts:
        raise UserError(f"modality {choice!r} has no template in modality_prompts (conf/config.yaml)")
    return prompt_modality, cfg.prompt or cfg.modality_prompts[choice]


def check_audio_choice(cfg: DictConfig, spec: DatasetSpec, choice: str) -> None:
    """An audio modality needs a set whose clips carry speech and a model that takes audio."""
    if not spec.speech:
        raise UserError(
            f"dataset {spec.key} has no speech in its media (no `speech: true` in its conf/dataset YAML); "
            f"modality={choice} needs a set with speech, e.g. ravdess, enterface, cmumosi, sims, mer2023"
        )
    if not cfg.model.get("supports_audio"):
        raise UserError(
            f"model {cfg.model.name} takes no audio (supports_audio is false in its config); "
            f"modality={choice} needs an audio model, e.g. model=qwen2_5_omni_7b, or choose modality=video"
            + (", text or multi" if spec.modality == "video+text" else "")
        )


def audio_rate(cfg: DictConfig, modality: str) -> int:
    """The sampling rate the sound track is resampled to (the model's `audio_rate`); 0 without audio."""
    if not modality_inputs(modality)[2]:
        return 0
    rate = cfg.model.get("audio_rate") or DEFAULT_RATE
    if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
        raise UserError(f"model {cfg.model.name}: audio_rate={rate!r} is not valid; expected Hz, e.g. 16000")
    return rate
