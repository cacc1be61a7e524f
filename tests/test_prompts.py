"""Prompt templates and request building: rendering, media parts, modalities, keys."""

from __future__ import annotations

import hashlib
import re
import shutil

import pytest
from PIL import Image

from ger.config import conf_dir
from ger.prompting.prompts import KeyOnlyRequests, build_request
from ger.prompting.templates import PromptTemplate, available_templates, load_template, placeholders, render
from ger.records import LoadedSample, Sample

LABELS = ["Happiness", "Sadness", "Anger", "Neutral"]
KEY_PARTS = {"model": "tiny", "revision": None, "sampling": {"temperature": 0.0, "seed": 0}}
TEMPLATES = ["facial", "sentiment", "micro", "video", "text", "multimodal"]


def _image(shade: int, size: tuple[int, int] = (16, 12), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, (shade, 255 - shade, 7)[: len(mode)] if mode == "RGB" else shade)


def _still(i: int, gt: str = "Happiness") -> LoadedSample:
    return LoadedSample(Sample("demo", f"img_{i}.jpg", gt), images=[_image(10 * i)], text=f"words {i}")


def _clip(i: int, indices: tuple[int, ...] = (0, 10, 20), fps: float = 25.0) -> LoadedSample:
    return LoadedSample(
        Sample("demo", f"clip_{i}", "Sadness"),
        images=[_image(10 * i + k) for k in range(len(indices))],
        frame_indices=list(indices),
        source_fps=fps,
        source_frames=30,
        text=f"I said thing number {i}",
    )


def _setup(name: str) -> tuple[str, bool]:
    """(modality, whether samples are clips) that fit a template."""
    t = load_template(name)
    modality = "text" if name == "text" else ("multi" if t.uses_transcript else "visual")
    return modality, t.uses_media


def _build(samples, template="facial", labels=LABELS, mode="batch", frames_as="images", **kw):
    kw.setdefault("key_parts", KEY_PARTS)
    kw.setdefault("max_tokens", 256)
    tmpl = template if isinstance(template, PromptTemplate) else load_template(template)
    return build_request(samples, tmpl, labels, mode=mode, frames_as=frames_as, **kw)


def _parts(request, kind):
    return [p for p in request.messages[0]["content"] if p["type"] == kind]


def _all_text(request) -> str:
    return "\n".join(p["text"] for p in _parts(request, "text"))


def test_shipped_templates_are_all_there():
    assert set(TEMPLATES) <= set(available_templates())


@pytest.mark.parametrize("name", TEMPLATES)
def test_every_template_renders_single_and_batch(name):
    modality, clips = _setup(name)
    make = _clip if clips else _still
    samples = [make(i) for i in range(3)]

    single = _build(samples[:1], name, mode="single", modality=modality)
    text = _all_text(single)
    assert ", ".join(LABELS) in text and re.search(r"\b1 (image|video|text)\b", text)
    assert not placeholders(text)  # nothing left unrendered
    assert single.names == (samples[0].sample.name,)
    assert single.choices is None and single.max_tokens == 256
    assert "{'name': " in text and "'result': [" in text  # the paper's record shape

    batch = _build(samples, name, mode="batch", modality=modality)
    text = _all_text(batch)
    assert f"{len(samples)} " in text and ", ".join(LABELS) in text
    assert not any(s.sample.name in text for s in samples)  # samples are named by position only
    assert "{'name': " in text and "'result': [" in text  # one record per sample
    kind = {"facial": "Image", "sentiment": "Image", "micro": "Image", "text": "Text"}.get(name, "Video")
    assert batch.ids == tuple(f"{kind} {i}" for i in (1, 2, 3))  # the ids the answer's records are matched by
    assert not placeholders(text)
    assert batch.names == tuple(s.sample.name for s in samples)
    identity = "disregard who" in text.lower()
    assert identity == (name != "text")  # the paper's text prompt alone has no identity clause
    if modality != "visual":
        assert all(s.text in text for s in samples)


def test_constrained_single_mode_sets_choices_and_asks_for_one_label():
    parts = {**KEY_PARTS, "structured_output": True}
    req = _build([_still(0)], mode="single", key_parts=parts)
    assert req.choices == LABELS
    assert "one label only" in _all_text(req)
    with pytest.raises(ValueError, match="mode=single"):
        _build([_still(0), _still(1)], mode="batch", key_parts=parts)


def test_micro_prompt_says_subtle_and_sentiment_asks_about_the_viewer():
    assert "hard to see" in _all_text(_build([_still(0)], "micro", mode="single"))
    assert "viewer" in _all_text(_build([_still(0)], "sentiment", mode="single"))


def test_each_sample_media_follows_its_id():
    clips = [_clip(0), _clip(1)]
    req = _build(clips, "video", frames_as="images")
    content = req.messages[0]["content"]
    assert [p["type"] for p in content] == [
        "text",
        "image",
        "image",
        "image",
        "text",
        "image",
        "image",
        "image",
    ]
    assert content[0]["text"].endswith("Video 1:") and content[4]["text"] == "Video 2:"
    assert [p["image"] for p in content[5:]] == clips[1].images


def test_frames_as_images_sends_one_image_per_frame():
    req = _build([_clip(0), _clip(1)], "video", frames_as="images")
    assert len(_parts(req, "image")) == 6 and not _parts(req, "video")
    assert "3 frames sampled uniformly" in _all_text(req)


def test_frames_as_grid_sends_one_mosaic_per_clip():
    req = _build([_clip(0), _clip(1)], "video", frames_as="grid")
    images = _parts(req, "image")
    assert len(images) == 2 and not _parts(req, "video")
    assert all(p["image"].size == (16 * 3, 12) for p in images)  # 3 frames -> a 1x3 mosaic
    assert "grid image of 3 frames" in _all_text(req)


def test_frames_as_video_sends_one_video_part_per_clip():
    clips = [_clip(0), _clip(1, indices=(1, 2, 3, 4), fps=30.0)]
    req = _build(clips, "video", frames_as="video")
    videos = _parts(req, "video")
    assert len(videos) == 2 and not _parts(req, "image")
    assert [len(v["frames"]) for v in videos] == [3, 4]
    assert (
        videos[1]["fps"] == 30.0 and videos[1]["total_frames"] == 30 and videos[1]["indices"] == [1, 2, 3, 4]
    )


@pytest.mark.parametrize("frames_as", ["images", "grid", "video"])
def test_still_images_stay_images_whatever_frames_as(frames_as):
    req = _build([_still(0), _still(1)], "facial", frames_as=frames_as)
    assert [p["type"] for p in req.messages[0]["content"]] == ["text", "image", "text", "image"]


def test_text_modality_sends_no_media():
    req = _build([_clip(0), _clip(1)], "text", modality="text")
    assert [p["type"] for p in req.messages[0]["content"]] == ["text"]
    assert "Text 2: I said thing number 1" in _all_text(req)
    single = _build([_clip(0)], "text", mode="single", modality="text")
    assert [p["type"] for p in single.messages[0]["content"]] == ["text"]
    assert "I said thing number 0" in _all_text(single)


def test_multi_modality_sends_frames_and_transcript():
    req = _build([_clip(0)], "multimodal", mode="single", modality="multi")
    assert len(_parts(req, "image")) == 3 and "I said thing number 0" in _all_text(req)


def test_template_and_modality_must_agree():
    with pytest.raises(ValueError, match="transcript"):
        _build([_clip(0)], "facial", mode="single", modality="text")
    with pytest.raises(ValueError, match="transcript"):
        _build([_clip(0)], "multimodal", mode="single", modality="visual")
    with pytest.raises(ValueError, match="needs transcripts"):
        _build(
            [LoadedSample(Sample("d", "x", "y"), images=[_image(1)])], "text", mode="single", modality="text"
        )
    with pytest.raises(ValueError, match="unknown modality"):
        _build([_clip(0)], "video", modality="smell")
    with pytest.raises(ValueError, match=r"describes frames \(\{media\}\) but modality 'audio' sends none"):
        _build([_heard(0)], "video", modality="audio")
    with pytest.raises(ValueError, match="transcript"):
        _build([_heard(0)], "audio", modality="audio_text")
    with pytest.raises(ValueError, match="no sound track to send"):
        _build([_clip(0)], "audio_video", modality="audio_visual")


# ------------------------------------------------------------------ the audio modalities


def _heard(i: int, rate: int = 16000) -> LoadedSample:
    """A clip with its sound track decoded (ger/data/audio.py AudioTrack): a tone per sample."""
    import numpy as np

    from ger.data.audio import AudioTrack

    t = np.arange(rate) / rate
    track = AudioTrack((0.2 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32), rate)
    loaded = _clip(i)
    loaded.audio, loaded.audio_rate = track, rate
    return loaded


AUDIO_CASES = [  # template, prompt modality, one sample's parts after its text, what a sample is called
    ("audio", "audio", ["audio"], "Recording"),
    ("audio_video", "audio_visual", ["image"] * 3 + ["audio"], "Video"),
    ("audio_text", "audio_text", ["audio"], "Recording"),
    ("audio_multimodal", "audio_multi", ["image"] * 3 + ["audio"], "Video"),
]


@pytest.mark.parametrize("template, modality, media, noun", AUDIO_CASES, ids=[c[0] for c in AUDIO_CASES])
def test_audio_modalities_send_the_sound_track_after_the_frames(template, modality, media, noun):
    samples = [_heard(i) for i in range(3)]
    single = _build(samples[:1], template, mode="single", modality=modality)
    assert [p["type"] for p in single.messages[0]["content"]] == ["text", *media]
    (part,) = _parts(single, "audio")
    assert part["audio"] is samples[0].audio.samples and part["sampling_rate"] == 16000
    text = _all_text(single)
    assert re.search(r"\b(listen|hear)", text) and f"{noun} 1" in text
    assert (samples[0].text in text) == ("text" in modality or "multi" in modality)

    batch = _build(samples, template, mode="batch", modality=modality)
    content = batch.messages[0]["content"]
    assert [p["type"] for p in content] == ["text", *media] + ["text", *media] * 2
    heard = [p["audio"] for p in content if p["type"] == "audio"]
    assert all(a is s.audio.samples for a, s in zip(heard, samples, strict=True))  # each after its own id
    assert batch.ids == tuple(f"{noun} {i}" for i in (1, 2, 3))
    assert not placeholders(_all_text(batch))


def test_the_sound_is_in_the_key():
    """Samples built without describe_sample are keyed by their samples; rate and sound both count."""
    base = _build([_heard(0)], "audio", mode="single", modality="audio").key
    assert _build([_heard(0)], "audio", mode="single", modality="audio").key == base
    other = _heard(0)
    other.audio = _heard(1).audio  # same frames, another sound
    assert _build([other], "audio", mode="single", modality="audio").key != base
    slower = _heard(0, rate=8000)
    assert _build([slower], "audio", mode="single", modality="audio").key != base


def test_bad_calls_fail_loudly():
    with pytest.raises(ValueError, match="one sample per request"):
        _build([_still(0), _still(1)], mode="single")
    with pytest.raises(ValueError, match="frames_as"):
        _build([_still(0)], frames_as="gif")
    with pytest.raises(ValueError, match="key_parts must not set"):
        _build([_still(0)], key_parts={"max_tokens": 3})
    with pytest.raises(ValueError, match="no images"):
        _build([LoadedSample(Sample("d", "x", "y"))])


# ------------------------------------------------------------------ request keys


def _key(samples=None, template="video", **kw) -> str:
    return _build(samples or [_clip(0), _clip(1)], template, **kw).key


def test_key_is_stable_across_calls_and_fresh_objects():
    assert _key() == _key()
    assert (
        _key(key_parts={"sampling": {"seed": 0, "temperature": 0.0}, "revision": None, "model": "tiny"})
        == _key()
    )


@pytest.mark.parametrize(
    "change",
    [
        {"key_parts": {**KEY_PARTS, "model": "other"}},
        {"key_parts": {**KEY_PARTS, "sampling": {"temperature": 0.5, "seed": 0}}},
        {"max_tokens": 64},
        {"labels": list(reversed(LABELS))},  # prompt text
        {"template": "multimodal", "modality": "multi"},  # prompt text
        {"frames_as": "video"},
        {"samples": [_clip(0), _clip(1, indices=(0, 10, 21))]},  # frame indices
        {"samples": [_clip(0), _clip(2)]},  # pixels (and name)
    ],
)
def test_key_changes_with_what_reaches_the_model(change):
    kw = dict(change)
    samples = kw.pop("samples", None)
    assert _key(samples, **kw) != _key()


def test_video_timing_changes_the_key_only_when_sent():
    timed = [_clip(0), _clip(1, fps=30.0)]
    assert _key(timed, frames_as="video") != _key(frames_as="video")
    assert _key(timed, frames_as="images") == _key(frames_as="images")  # fps is not sent with still frames


def test_key_changes_with_pixels_and_choices():
    base = _build([_still(0)], mode="single")
    grey = LoadedSample(_still(0).sample, images=[_still(0).images[0].convert("L")])
    assert _build([grey], mode="single").key != base.key
    constrained = _build([_still(0)], mode="single", key_parts={**KEY_PARTS, "structured_output": True})
    assert constrained.key != base.key


def test_key_ignores_what_the_model_never_sees():
    # The ground-truth label and unsent metadata must neither leak into the prompt nor split the cache.
    a = _build([_still(0, gt="Happiness")], mode="single")
    b = _build([_still(0, gt="Sadness")], mode="single")
    assert a.key == b.key
    assert "Happiness" not in _all_text(a).replace(", ".join(LABELS), "")


# ------------------------------------------------------------------ templates as files


def test_placeholders_are_identifiers_and_json_braces_stay():
    text = 'Sort {labels}; answer [{"name": ..., "result": [...]}] or {\'name\': x}'
    assert placeholders(text) == {"labels"}
    assert render(text, {"labels": "a, b"}).startswith('Sort a, b; answer [{"name"')


def test_unknown_placeholder_is_rejected():
    with pytest.raises(ValueError, match=r"\{label\}.*allowed there"):
        PromptTemplate(name="t", single="Sort {label}", batch="{count} {labels}")
    with pytest.raises(ValueError, match=r"\{transcript\}"):
        PromptTemplate(name="t", single="x", batch="{transcript}")  # whose transcript?


def test_template_consistency_checks():
    with pytest.raises(ValueError, match="media"):
        PromptTemplate(name="t", single="as {media}", batch="x")
    with pytest.raises(ValueError, match="transcript"):
        PromptTemplate(name="t", single="{transcript}", batch="x", item="{id}")
    with pytest.raises(ValueError, match="unknown key"):
        PromptTemplate.from_dict("t", {"single": "x", "batch": "y", "singel": "z"})
    with pytest.raises(ValueError, match="missing"):
        PromptTemplate.from_dict("t", {"single": "x"})


def test_missing_template_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown prompt 'nope'.*facial"):
        load_template("nope")


def test_a_dropped_yaml_file_is_a_new_template(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf)
    (conf / "prompts" / "terse.yaml").write_text(
        "single: 'Rank {labels}.'\n"
        "batch: 'Rank {labels} for {count} faces: {ids}.'\n"
        "item: '#{index} {id}'\n"
        "id: 'Face {index}'\n"
    )
    (conf / "prompts" / "broken.yaml").write_text("single: 'Rank {labelz}.'\nbatch: 'x'\n")
    monkeypatch.setenv("GER_CONF_DIR", str(conf))
    assert "terse" in available_templates()
    req = _build([_still(0), _still(1)], load_template("terse"))
    assert (
        _all_text(req) == "Rank Happiness, Sadness, Anger, Neutral for 2 faces: Face 1, Face 2."
        "\n\n#1 Face 1\n#2 Face 2"
    )
    with pytest.raises(ValueError, match="labelz"):
        load_template("broken")


def test_the_prompt_override_picks_a_template_on_the_command_line(stub_server, tmp_path):
    """`ger run prompt=<name>` (conf/config.yaml's `prompt`): while the templates sat in conf/prompt/,
    Hydra took `prompt=` for a config group choice and refused every value."""
    from conftest import run_ger

    args = ["run", "dataset=demo", "limit=2", "model=qwen2_5_vl_7b", "backend=server", "progress=false",
            f"backend.base_url={stub_server.url}", "backend.max_retries=0"]  # fmt: skip
    run_ger([*args, f"hydra.run.dir={tmp_path / 'run'}", "prompt=micro"], tmp_path / "cache", tmp_path)
    micro = load_template("micro").single.split("\n")[0]
    assert len(stub_server.texts) == 2 and all(t.startswith(micro) for t in stub_server.texts)
    assert "prompt: micro" in (tmp_path / "run" / "config.yaml").read_text()


# ------------------------------------------------------------------ keys without building each request


def _shell(i: int, n_images: int = 1, clip: bool = False, text: str | None = None, rate: int = 0):
    """A sample as describe_sample leaves it: a content hash and counts, no pixels."""
    digest = hashlib.sha256(f"media {i}".encode()).hexdigest()
    return LoadedSample(Sample("demo", f"s_{i}", "Happiness"), content_hash=digest, n_images=n_images,
                        clip=clip, text=text, audio_rate=rate)  # fmt: skip


CHOICE = {"key_parts": {**KEY_PARTS, "structured_output": True}}
KEY_ONLY_CASES = [  # template, modality, frames_as, shells (shapes repeat and differ), extra arguments
    ("facial", "visual", "images", [_shell(i) for i in range(5)], {}),
    ("facial", "visual", "images", [_shell(i) for i in range(3)], CHOICE),
    ("facial", "visual", "images", [_shell(i) for i in range(3)], {"candidates": ["Sadness", "Happiness"]}),
    ("video", "visual", "images", [_shell(i, n_images=3 + i % 2 * 5, clip=True) for i in range(6)], {}),
    ("video", "visual", "grid", [_shell(i, n_images=3 + i % 2 * 5, clip=True) for i in range(6)], {}),
    ("video", "visual", "video", [_shell(i, n_images=1 + i % 2, clip=True) for i in range(6)], {}),
    ("multimodal", "multi", "images", [_shell(i, 3, True, f'said {i % 3} "so" ü') for i in range(7)], {}),
    ("audio_multimodal", "audio_multi", "images", [_shell(i, 3, True, "said", 16000) for i in range(4)], {}),
    ("audio", "audio", "images", [_shell(i, 3, True, None, 8000 * (1 + i % 2)) for i in range(4)], {}),
]


@pytest.mark.parametrize("template, modality, frames_as, shells, extra", KEY_ONLY_CASES,
                         ids=[f"{c[0]}-{c[2]}-{sorted(c[4])}" for c in KEY_ONLY_CASES])  # fmt: skip
def test_key_only_requests_are_build_requests_own(template, modality, frames_as, shells, extra):
    """KeyOnlyRequests composes a single-mode key once per prompt shape and puts each sample's hash
    in: every request, key included, must be the one build_request(key_only=True) makes."""
    kw = {"key_parts": KEY_PARTS, "modality": modality, "candidates": None, **extra}
    tmpl = load_template(template)
    keys = KeyOnlyRequests(tmpl, LABELS, mode="single", frames_as=frames_as, **kw)
    for max_tokens in (256, 64):
        for shell in shells:
            made = keys([shell], max_tokens)
            assert made == build_request([shell], tmpl, LABELS, mode="single", frames_as=frames_as,
                                         max_tokens=max_tokens, key_only=True, **kw)  # fmt: skip
    assert 1 <= len(keys._shapes) <= 2 * len(shells)  # the shortcut was taken, shared where shapes agree
    assert len({keys([s], 256).key for s in shells}) == len(shells)


def test_key_only_requests_fall_back_to_build_request_elsewhere():
    """Batches, a hash that is not plain hex, and a transcript holding the hash's mark: build_request."""
    tmpl = load_template("multimodal")
    kw = {"frames_as": "images", "key_parts": KEY_PARTS, "modality": "multi", "candidates": None}
    batch = [_shell(i, 3, True, "said") for i in range(3)]
    assert KeyOnlyRequests(tmpl, LABELS, mode="batch", **kw)(batch, 300) == build_request(
        batch, tmpl, LABELS, mode="batch", max_tokens=300, key_only=True, **kw)  # fmt: skip
    odd = [_shell(0, 3, True, "said \ue000content hash\ue000 it"), _shell(1, 3, True, "said")]
    odd[1].content_hash = "sha256:" + odd[1].content_hash
    keys = KeyOnlyRequests(tmpl, LABELS, mode="single", **kw)
    for shell in odd:
        assert keys([shell], 256) == build_request([shell], tmpl, LABELS, mode="single", max_tokens=256,
                                                   key_only=True, **kw)  # fmt: skip
    assert not keys._shapes
    with pytest.raises(ValueError, match="no content hash"):
        keys([LoadedSample(Sample("demo", "x", "y"), n_images=3, clip=True, text="said")], 256)
