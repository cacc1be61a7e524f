"""Loaded samples + a prompt template + the label set -> one chat Request.

The template (ger/prompting/templates.py) says what is asked; see there for its parts and
placeholders, and for why samples are never named in a prompt.

The request key hashes everything that reaches the model (the text; for each sample its
content hash, which covers the media files' bytes and how they become pixels, and how it is
shown: images, grid or video; with an audio modality, the sound track's rate, its content hash
covering the clip and how it becomes samples) plus the caller's `key_parts` (model, backend,
sampling), and nothing else. So a key needs no decoded pixels (`key_only=True`): a cached rerun
decodes nothing.
Samples built without a content hash are keyed by the digest of their pixels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ger.prompting.templates import FRAMES_AS, PromptTemplate, available_templates, render, sample_ids
from ger.records import LoadedSample, Request
from ger.run.cache import canonical_json, request_key

MODES = ("single", "batch")
# What a request gives the model: visual = images or frames, text = the transcript, multi = both;
# the audio_* choices add the clip's sound track (after the sample's frames, if any).
MODALITIES = ("visual", "text", "multi", "audio", "audio_visual", "audio_text", "audio_multi")
# Dataset/config spellings of a modality, accepted so callers need not translate.
_MODALITY_ALIASES = {"image": "visual", "video": "visual", "video+text": "multi"}


def modality_inputs(modality: str) -> tuple[bool, bool, bool]:
    """(visual, transcript, audio): what a prompt modality sends of each sample."""
    modality = _MODALITY_ALIASES.get(modality, modality)
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {list(MODALITIES)}")
    base = modality.removeprefix("audio_") if modality != "audio" else ""
    return base in ("visual", "multi"), base in ("text", "multi"), modality.startswith("audio")


_RESERVED_KEY_PARTS = ("messages", "choices", "max_tokens", "candidates")


def _image_digest(image: Any) -> str:
    """sha256 of the pixels actually sent, so greyscale, resizing or a new decoder change the key."""
    h = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


Segment = tuple[list[dict[str, Any]], list[dict[str, Any]]]  # (message parts, their key descriptions)


def _text(text: str) -> Segment:
    part = {"type": "text", "text": text}
    return [part], [dict(part)]


def _media_kind(loaded: LoadedSample, frames_as: str) -> str:
    """How one sample's media are shown; a still image (or a single frame) is an image whatever frames_as."""
    return frames_as if loaded.is_clip and loaded.image_count > 1 else "image"


def _media_desc(loaded: LoadedSample, frames_as: str) -> dict[str, Any]:
    """The key description of one sample's media, from its content hash: no pixels needed.

    content_hash (ger/data/media.py describe_sample) covers the file bytes and how they become pixels;
    what is added here is how they are shown: as images, one grid (and its layout) or a video.
    """
    kind = _media_kind(loaded, frames_as)
    desc: dict[str, Any] = {"type": kind, "media": loaded.content_hash, "images": loaded.image_count}
    if kind == "grid":
        from ger.prompting.grids import grid_shape

        desc["layout"] = list(grid_shape(loaded.image_count))
    return desc


def _pixel_descs(loaded: LoadedSample, frames_as: str) -> list[dict[str, Any]]:
    """Key descriptions from the pixels, for samples built without a content hash (tests, callers' own)."""
    images, indices = loaded.images, list(loaded.frame_indices)
    kind = _media_kind(loaded, frames_as)
    if kind == "image":
        return [{"type": "image", "sha256": _image_digest(im), "frames": indices[i : i + 1]}
                for i, im in enumerate(images)]  # fmt: skip
    if kind == "images":
        return [
            {"type": "image", "sha256": _image_digest(im), "frames": [i]}
            for im, i in zip(images, indices, strict=True)
        ]
    if kind == "grid":
        from ger.prompting.grids import make_grid

        return [{"type": "grid", "sha256": _image_digest(make_grid(images)), "frames": indices}]
    return [
        {
            "type": "video",
            "sha256": [_image_digest(img) for img in images],
            "fps": loaded.source_fps,
            "total_frames": loaded.source_frames,
            "indices": indices,
        }
    ]


def _media_parts(loaded: LoadedSample, frames_as: str, key_only: bool = False) -> Segment:
    """One sample's media as message parts (none when key_only) and their key descriptions."""
    name = loaded.sample.name
    if not loaded.image_count:
        raise ValueError(f"sample {name!r} has no images to send; was it loaded with its media?")
    if key_only and not loaded.content_hash:
        raise ValueError(f"sample {name!r} has no content hash; a key without pixels needs describe_sample")
    if not key_only and not loaded.images:
        raise ValueError(f"sample {name!r} has no images to send; was it loaded with its media?")
    descs = [_media_desc(loaded, frames_as)] if loaded.content_hash else _pixel_descs(loaded, frames_as)
    if key_only:
        return [], descs
    kind, images = _media_kind(loaded, frames_as), loaded.images
    if kind == "image" and loaded.source and len(images) == 1:  # a still: its file travels as it is
        return [{"type": "image", "image": images[0], "source": loaded.source}], descs
    if kind in ("image", "images"):
        return [{"type": "image", "image": img} for img in images], descs
    if kind == "grid":
        from ger.prompting.grids import make_grid

        return [{"type": "image", "image": make_grid(images)}], descs
    part = {
        "type": "video",
        "frames": list(images),
        "fps": loaded.source_fps,
        "total_frames": loaded.source_frames,
        "indices": list(loaded.frame_indices),
    }
    return [part], descs


def _audio_parts(loaded: LoadedSample, key_only: bool = False) -> Segment:
    """One sample's sound track as a message part (none when key_only) and its key description.

    content_hash covers the clip's bytes and how they become samples (rate, downmix, reader); samples
    built without one are keyed by the digest of the samples themselves."""
    name, track = loaded.sample.name, loaded.audio
    if key_only and not (loaded.content_hash and loaded.audio_rate):
        raise ValueError(f"sample {name!r} has no audio description; a key without samples needs one")
    if not key_only and track is None:
        raise ValueError(f"sample {name!r} has no sound track to send; was it loaded with audio_rate?")
    if loaded.content_hash and loaded.audio_rate:
        desc = {"type": "audio", "media": loaded.content_hash, "sampling_rate": loaded.audio_rate}
    else:
        digest = hashlib.sha256(track.samples.astype("<f4").tobytes()).hexdigest()
        desc = {"type": "audio", "sha256": digest, "sampling_rate": track.sampling_rate}
    return ([] if key_only else [track.part()]), [desc]


def _merge_texts(segments: list[Segment]) -> list[Segment]:
    """Join adjacent text parts with a blank line: fewer parts, same prompt, simpler for every backend."""
    merged: list[Segment] = []
    for parts, descs in segments:
        is_text = bool(descs) and descs[0]["type"] == "text"
        if is_text and merged and merged[-1][1] and merged[-1][1][0]["type"] == "text":
            merged[-1] = _text(merged[-1][1][0]["text"] + "\n\n" + descs[0]["text"])
        else:
            merged.append((parts, descs))
    return merged


def _check_modality(template: PromptTemplate, modality: str, samples: list[LoadedSample]) -> str:
    visual, wants_text, _ = modality_inputs(modality)
    modality = _MODALITY_ALIASES.get(modality, modality)
    if wants_text != template.uses_transcript:
        raise ValueError(
            f"prompt template {template.name!r} {'uses' if template.uses_transcript else 'has no'} "
            f"{{transcript}} but modality {modality!r} {'sends' if wants_text else 'does not send'} one; "
            f"pick a template that fits (available: {available_templates()})"
        )
    if not visual and template.uses_media:
        raise ValueError(
            f"prompt template {template.name!r} describes frames ({{media}}) "
            f"but modality {modality!r} sends none"
        )
    if wants_text:
        lacking = [s.sample.name for s in samples if not (s.text or "").strip()]
        if lacking:
            raise ValueError(f"modality {modality!r} needs transcripts; none loaded for {lacking[:5]}")
    return modality


def build_request(
    samples: list[LoadedSample],
    template: PromptTemplate,
    labels: list[str],
    *,
    mode: str,
    frames_as: str,
    key_parts: dict[str, Any],
    max_tokens: int,
    modality: str = "visual",
    key_only: bool = False,
    candidates: list[str] | None = None,
    keyer: Callable[[dict[str, Any]], str] = request_key,
) -> Request:
    """One user message asking about `samples` (one in single mode), keyed for the cache.

    key_only: the key (and names, ids, budget) from describe_sample's shells, no message parts
    built and no pixels needed; the same samples decoded give the same key.

    `key_parts` holds everything outside the prompt that changes the answer (model,
    revision, backend settings, sampling); a truthy `structured_output` in it
    constrains a single-mode answer to one of `labels`. `candidates` (answer=likelihood): the labels
    the backend scores as the whole answer; the prompt takes the constrained form (answer with one
    label) and the key the candidates. `keyer` turns what the key covers into the key (request_key);
    KeyOnlyRequests asks for the canonical text itself.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(MODES)}")
    if frames_as not in FRAMES_AS:
        raise ValueError(f"unknown frames_as {frames_as!r}; expected one of {list(FRAMES_AS)}")
    if not samples:
        raise ValueError("build_request needs at least one sample")
    if mode == "single" and len(samples) != 1:
        raise ValueError(f"single mode takes one sample per request, got {len(samples)}")
    if not labels:
        raise ValueError("build_request needs the label set")
    reserved = [k for k in _RESERVED_KEY_PARTS if k in key_parts]
    if reserved:
        raise ValueError(f"key_parts must not set {reserved}; build_request adds them")
    constrained = bool(key_parts.get("structured_output"))
    if constrained and mode == "batch":
        raise ValueError("structured_output constrains a single answer to one label; it needs mode=single")
    if candidates is not None and mode == "batch":
        raise ValueError("candidates (answer=likelihood) score one sample's answer; they need mode=single")
    modality = _check_modality(template, modality, samples)
    visual, _, audio = modality_inputs(modality)

    names = [s.sample.name for s in samples]
    frames = max(s.image_count for s in samples) if visual else 0
    still = all(not s.is_clip for s in samples)
    media_kind = "images" if still else frames_as
    ids = sample_ids(template, len(samples))
    values = {
        "labels": ", ".join(labels),
        "count": str(len(samples)),
        "ids": ", ".join(ids),
        "frames": str(frames),
        "transcript": (samples[0].text or "").strip(),
    }
    if template.media:
        values["media"] = render(template.media[media_kind], values)

    pairs: list[Segment] = []
    if mode == "single":
        one_label = (constrained or candidates) and template.constrained
        form = template.constrained if one_label else template.single
        pairs.append(_text(render(form, values)))
        if visual:
            pairs.append(_media_parts(samples[0], frames_as, key_only))
        if audio:
            pairs.append(_audio_parts(samples[0], key_only))
    else:
        pairs.append(_text(render(template.batch, values)))
        for index, loaded in enumerate(samples, start=1):
            item_values = {
                "id": ids[index - 1],
                "index": str(index),
                "frames": str(loaded.image_count),
                "transcript": (loaded.text or "").strip(),
            }
            if template.item:
                pairs.append(_text(render(template.item, item_values)))
            if visual:
                pairs.append(_media_parts(loaded, frames_as, key_only))
            if audio:
                pairs.append(_audio_parts(loaded, key_only))
    pairs = _merge_texts(pairs)

    choices = list(labels) if constrained else None
    keyed = {
        **key_parts,
        "messages": [{"role": "user", "content": [d for _, descs in pairs for d in descs]}],
        "choices": choices,
        "max_tokens": max_tokens,
    }
    if candidates is not None:  # only likelihood keys carry them: the other keys stay as they were
        keyed["candidates"] = list(candidates)
    messages = [] if key_only else [{"role": "user", "content": [p for parts, _ in pairs for p in parts]}]
    return Request(
        key=keyer(keyed),
        names=tuple(names),
        messages=messages,
        choices=choices,
        candidates=list(candidates) if candidates is not None else None,
        max_tokens=max_tokens,
        ids=tuple(ids) if mode == "batch" else (),
    )


_HASH_MARK = "\ue000content hash\ue000"  # where a sample's content hash goes in a shared key text


class KeyOnlyRequests:
    """build_request(samples, ..., key_only=True) for one run's fixed arguments, cheap in single mode.

    A cached rerun keys every sample before it knows what to ask. In single mode two samples whose
    prompts read the same (the same frame count, transcript and sound rate, as every still of a test
    set) have keys that differ only in their content hash; so the canonical text a key hashes is
    composed once per such shape, with a mark where the hash goes, and each sample's key hashes that
    text with its own hash put in: 7 us a sample, where composing and encoding it all took 75 (a
    seventh of a cached rerun of 4,000 images). Anything else is build_request itself.
    """

    def __init__(self, template: PromptTemplate, labels: list[str], **fixed: Any) -> None:
        self.template, self.labels, self.fixed = template, labels, fixed
        self._shapes: dict[tuple[Any, ...], tuple[list[bytes], Request]] = {}

    def __call__(self, samples: list[LoadedSample], max_tokens: int) -> Request:
        one, args = samples[0], (self.template, self.labels)
        digest = one.content_hash
        plain = digest.isascii() and digest.isalnum() and _HASH_MARK not in (one.text or "")
        if len(samples) != 1 or self.fixed.get("mode") != "single" or not plain:
            return build_request(samples, *args, max_tokens=max_tokens, key_only=True, **self.fixed)
        shape = (max_tokens, one.image_count, one.is_clip, one.text, one.audio_rate)
        made = self._shapes.get(shape)
        if made is None:
            marked = build_request([replace(one, content_hash=_HASH_MARK)], *args, max_tokens=max_tokens,
                                   key_only=True, keyer=canonical_json, **self.fixed)  # fmt: skip
            made = self._shapes[shape] = ([piece.encode() for piece in marked.key.split(_HASH_MARK)], marked)
        pieces, marked = made
        key = hashlib.sha256(digest.encode().join(pieces)).hexdigest()
        choices, candidates = marked.choices, marked.candidates
        return Request(key, (one.sample.name,), [], None if choices is None else list(choices),
                       None if candidates is None else list(candidates), max_tokens)  # fmt: skip
