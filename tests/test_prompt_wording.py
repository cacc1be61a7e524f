"""The rendered prompt of every task, single and batch: the paper's elements in the paper's order.

The paper's prompt (PROTOCOL.md, "How the paper queried the model") has, in this order: an expert
role for the task, the number of samples, "ignore the person's identity" (not for text), the
instruction to sort the candidate labels by similarity ("top 5" for facial, video, text and
multimodal; the micro-expression prompt adds that the expression may be subtle, the sentiment
prompt asks how a viewer would feel), the candidate list, and one record `{'name': ..., 'result':
[...]}` per sample. The sample names (which can carry the label, as RAVDESS's do) never appear.

docs/PROMPTS.md is generated from these renderings: `python tests/test_prompt_wording.py`.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ger.config import load_group_yaml
from ger.data.audio import AudioTrack
from ger.prompting.prompts import build_request, modality_inputs
from ger.prompting.templates import load_template
from ger.records import LoadedSample, Request, Sample

DOCS = Path(__file__).resolve().parents[1] / "docs" / "PROMPTS.md"
KEY_PARTS = {"model": "tiny", "sampling": {"temperature": 0.0}}


@dataclass(frozen=True)
class Task:
    template: str
    dataset: str  # whose label set the example uses
    modality: str  # visual | text | multi | audio | audio_visual | audio_text | audio_multi
    noun: str  # what one sample is called in the prompt
    clips: bool
    identity: bool
    top5: bool
    extra: str | None  # the task's own sentence, between count and ranking (viewer) or after it (subtle)


TASKS = [
    Task("facial", "rafdb", "visual", "image", False, True, True, None),
    Task("sentiment", "artphoto", "visual", "image", False, True, False, "how a viewer would"),
    Task("micro", "casme2", "visual", "image", False, True, False, "hard to see"),
    Task("video", "ravdess", "visual", "video", True, True, True, None),
    Task("text", "mer2023", "text", "text", True, False, True, None),
    Task("multimodal", "mer2023", "multi", "video", True, True, True, None),
    # The audio choices (no paper counterpart: GPT-4V could not hear), built from the same elements.
    Task("audio", "ravdess", "audio", "recording", True, True, True, None),
    Task("audio_video", "ravdess", "audio_visual", "video", True, True, True, None),
    Task("audio_text", "mer2023", "audio_text", "recording", True, True, True, None),
    Task("audio_multimodal", "mer2023", "audio_multi", "video", True, True, True, None),
]
# Names shaped like the real ones, label included (RAVDESS's third field 03 = happy).
CLIP_NAMES = ["03-01-03-01-01-01-12", "03-01-06-02-02-01-07", "sad_clip_0009"]
STILL_NAMES = ["S05_happy_take2.jpg", "fear_0117.jpg", "anger_0042.jpg"]
TRANSCRIPTS = [
    "I really didn't expect the results to come out this way.",
    "We can talk about it tomorrow, it's fine.",
    "Why would anyone leave the door open all night?",
]


def _sample(task: Task, i: int) -> LoadedSample:
    shade = 40 * i + 20
    if not task.clips:
        img = Image.new("RGB", (12, 12), (shade, 90, 200 - shade))
        return LoadedSample(Sample(task.dataset, STILL_NAMES[i], "Happiness"), images=[img])
    frames = [Image.new("RGB", (12, 12), (shade + k, 90, 100)) for k in range(3)]
    visual, _, audio = modality_inputs(task.modality)
    return LoadedSample(
        Sample(task.dataset, CLIP_NAMES[i], "happy"),
        images=frames if visual else [],
        frame_indices=[0, 10, 20] if visual else [],
        source_fps=25.0,
        source_frames=30,
        text=TRANSCRIPTS[i],
        audio=AudioTrack(np.full(1600, 0.01 * (i + 1), np.float32), 16000) if audio else None,
        audio_rate=16000 if audio else 0,
    )


def _labels(task: Task) -> list[str]:
    return list(load_group_yaml("dataset", task.dataset)["labels"])


def _request(task: Task, mode: str, n: int) -> Request:
    return build_request(
        [_sample(task, i) for i in range(n)],
        load_template(task.template),
        _labels(task),
        mode=mode,
        frames_as="images",
        key_parts=KEY_PARTS,
        max_tokens=1000,
        modality=task.modality,
    )


def _text(request: Request) -> str:
    return "\n\n".join(p["text"] for p in request.messages[0]["content"] if p["type"] == "text")


def _elements(task: Task, n: int) -> list[tuple[str, str]]:
    """(element, regex) in the paper's order for this task."""
    noun = task.noun + ("s" if n > 1 else "")
    labels = re.escape(", ".join(_labels(task)))
    ranking = r"[Oo]rder the candidate categories from the most to the least similar to [^.;]+"
    elements = [("role", r"\bAct as an expert in \w+"), ("count", rf"\bgiven {n} {noun}\b")]
    if task.extra == "how a viewer would":
        elements.append(("viewer", task.extra))
    if task.identity:
        elements.append(("identity", r"[Dd]isregard who"))
    elements.append(("ranking", ranking + ("; give at least the top 5" if task.top5 else r"\.")))
    if task.extra == "hard to see":
        elements.append(("subtle", task.extra))
    elements.append(("candidates", rf"Candidate categories: {labels}\."))
    if task.identity:
        elements.append(("identity again", r"Again, [^.]*disregard"))
    elements.append(
        ("record", rf"\{{'name': <{task.noun} number>, 'result': \[<categories, most similar first>\]\}}")
    )
    return elements


@pytest.mark.parametrize("mode, n", [("single", 1), ("batch", 3)])
@pytest.mark.parametrize("task", TASKS, ids=[t.template for t in TASKS])
def test_rendered_prompt_has_the_papers_elements_in_order(task, mode, n):
    text = _text(_request(task, mode, n))
    where = []
    for element, pattern in _elements(task, n):
        found = re.search(pattern, text[where[-1][1] if where else 0 :])
        assert found, f"{task.template}/{mode}: {element!r} ({pattern}) not found after {where}:\n{text}"
        start = (where[-1][1] if where else 0) + found.end()
        where.append((element, start))
    assert ("top 5" in text) == task.top5
    assert ("identity" in text or "disregard who" in text.lower()) == task.identity


@pytest.mark.parametrize("mode, n", [("single", 1), ("batch", 3)])
@pytest.mark.parametrize("task", TASKS, ids=[t.template for t in TASKS])
def test_no_sample_name_reaches_the_prompt(task, mode, n):
    request = _request(task, mode, n)
    text = _text(request)
    names = CLIP_NAMES if task.clips else STILL_NAMES
    assert not [name for name in names if name in text or name.rsplit(".", 1)[0] in text]
    assert request.names == tuple(names[:n])  # the pipeline still knows whose answer is whose


@pytest.mark.parametrize("task", TASKS, ids=[t.template for t in TASKS])
def test_each_sample_follows_its_positional_id(task):
    """Batch mode: an `Image 3:`-style line, then that sample's transcript (if any) and media."""
    id_line = re.compile(rf"^{task.noun.capitalize()} (\d+)[:.](.*)$", re.MULTILINE)
    owner, lines, media = None, {}, {}
    for part in _request(task, "batch", 3).messages[0]["content"]:
        if part["type"] != "text":
            media[owner] = media.get(owner, 0) + 1
            continue
        for m in id_line.finditer(part["text"]):
            owner = int(m.group(1))
            lines[owner] = m.group(2)
    assert list(lines) == [1, 2, 3]
    visual, transcript, audio = modality_inputs(task.modality)
    if transcript:
        assert [TRANSCRIPTS[i] in lines[i + 1] for i in range(3)] == [True] * 3
    if visual or audio:
        per_sample = (3 if task.clips else 1) * visual + audio
        assert media == {i: per_sample for i in (1, 2, 3)}


# ------------------------------------------------------------------ docs/PROMPTS.md


def _show(request: Request) -> str:
    parts = []
    for p in request.messages[0]["content"]:
        if p["type"] == "text":
            parts.append(p["text"])
        else:
            parts.append(f"<{p['type']}>")
    return "\n".join(parts)


def render_docs() -> str:
    """docs/PROMPTS.md: every task's prompt as sent, single mode and a batch of 2."""
    lines = [
        "# The prompts as sent",
        "",
        "Generated by `python tests/test_prompt_wording.py` from conf/prompts/*.yaml (do not edit by hand;",
        "tests/test_prompt_wording.py fails when this file is out of date). Each `<image>` is one image",
        "part of the message (a video clip with `frames=3 frames_as=images` is three), each `<audio>` one",
        "clip's sound track (the audio choices of `modality`, for models with `supports_audio`). The label",
        "set is the one named in each heading. `prompt_source=release` sends the release's own strings",
        "instead; they are not reproduced here (README, *Prompts*).",
        "",
    ]
    for task in TASKS:
        for mode, n in (("single", 1), ("batch", 2)):
            lines += [f"## {task.template}, {mode} mode ({task.dataset} labels)", "", "```text"]
            lines += [_show(_request(task, mode, n)), "```", ""]
    return "\n".join(lines)


def test_docs_prompts_md_is_current():
    assert DOCS.is_file(), "docs/PROMPTS.md is missing; run `python tests/test_prompt_wording.py`"
    assert DOCS.read_text(encoding="utf-8") == render_docs(), (
        "docs/PROMPTS.md is out of date; run `python tests/test_prompt_wording.py`"
    )


if __name__ == "__main__":
    DOCS.write_text(render_docs(), encoding="utf-8")
    print(f"wrote {DOCS}", file=sys.stderr)
