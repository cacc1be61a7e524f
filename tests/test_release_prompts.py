"""`prompt_source=release`: the release's own prompt strings, read from its code with `ast`.

The synthetic module below is shaped like the release's chatgpt.py (one function per task that
builds an f-string instruction with backslash-continued lines, the batch length, the candidate
list and the frame count, then appends each sample's parts) but holds our own text. Python
itself renders it (the test imports it) and ger's reading must give the same request text.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import re
import sys
import tarfile
import types
from pathlib import Path

import pytest
from PIL import Image

from ger.config import load_group_yaml
from ger.prompting.prompts import build_request
from ger.prompting.release_prompts import (
    ReleaseCodeMissing,
    find_release_code,
    release_template,
    select_template,
)
from ger.prompting.templates import load_template, render
from ger.records import LoadedSample, Sample
from ger.report.reference import ReleaseNotFound, download_release, find_release, release_cache

LABELS = ["happy", "sad", "angry", "neutral"]
KEY_PARTS = {"model": "tiny"}
TEMPLATES = {  # ger template -> (modality, clips)
    "facial": ("visual", False),
    "sentiment": ("visual", False),
    "micro": ("visual", False),
    "video": ("visual", True),
    "text": ("text", True),
    "multimodal": ("multi", True),
}

# Shaped like the release file; the import below needs a module that does not exist, so this file
# can only be read, not run, unless a test supplies that module.
SYNTHETIC = """
import not_installed_api_client as client

def get_image_emotion_batch(image_paths, candidate_list, sleeptime=0, grey_flag=False, model="m"):
    prompt = [
                {
                    "type":  "text",
                    "text": f"Be a face reader. Here come {len(image_paths)} pictures. Skip who it is. \\
                              Rank all of these, best first: {candidate_list}. \\
                              Reply as {{'name':, 'result':}} per picture."
                }
            ]
    for ii, image_path in enumerate(image_paths):
        prompt.append({"type": f"image-{ii+1}", "image": image_path})
    return prompt

def get_evoke_emotion_batch(image_paths, candidate_list, sleeptime=0, model="m"):
    prompt = [{"type": "text", "text": f"Mood of {len(image_paths)} scenes? \\
                              Options: {candidate_list}."}]
    for ii, image_path in enumerate(image_paths):
        prompt.append({"type": f"image-{ii+1}", "image": image_path})
    return prompt

def get_micro_emotion_batch(image_paths, candidate_list, sleeptime=0, model="m"):
    prompt = [{"type": "text", "text": f"Tiny twitches in {len(image_paths)} faces: {candidate_list}"}]
    for ii, image_path in enumerate(image_paths):
        prompt.append({"type": f"image-{ii+1}", "image": image_path})
    return prompt

def get_text_emotion_batch(npy_paths, candidate_list, sleeptime=0, model="m"):
    prompt = [{"type": "text", "text": f"{len(npy_paths)} lines follow. \\
                              Pick from {candidate_list}."}]
    for ii, npy_path in enumerate(npy_paths):
        prompt.append({"type": "text", "text": f"{npy_path}"})
    return prompt

def get_video_emotion_batch(video_paths, candidate_list, sleeptime=0, samplenum=3, model="m"):
    prompt = [{"type": "text", "text": f"{len(video_paths)} clips of {samplenum} stills; {candidate_list}"}]
    for ii, video_path in enumerate(video_paths):
        for jj in range(samplenum):
            prompt.append({"type": f"video{ii+1}_image{jj+1}", "image": video_path})
    return prompt

def get_multi_emotion_batch(video_paths, candidate_list, sleeptime=0, samplenum=3, model="m"):
    prompt = [{"type": "text", "text": f"{len(video_paths)} talks, words and {samplenum} stills: \\
                              {candidate_list} -- {{'name':, 'result':}}"}]
    for ii, video_path in enumerate(video_paths):
        prompt.append({"type": "text", "text": f"{video_path}"})
        for jj in range(samplenum):
            prompt.append({"type": f"video{ii+1}_image{jj+1}", "image": video_path})
    return prompt
"""
FUNCTIONS = {
    "facial": "get_image_emotion_batch",
    "sentiment": "get_evoke_emotion_batch",
    "micro": "get_micro_emotion_batch",
    "video": "get_video_emotion_batch",
    "text": "get_text_emotion_batch",
    "multimodal": "get_multi_emotion_batch",
}
TRANSCRIPTS = ["first words here", "and the second", "third one, said slowly"]


@pytest.fixture
def no_release(tmp_path, monkeypatch):
    """No release anywhere: no GER_REFERENCE_DIR, an empty cache."""
    monkeypatch.delenv("GER_REFERENCE_DIR", raising=False)
    monkeypatch.setenv("GER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def synthetic(no_release) -> Path:
    folder = no_release / "release"
    (folder / "results").mkdir(parents=True)
    (folder / "chatgpt.py").write_text(SYNTHETIC, encoding="utf-8")
    return folder


def _python_renders(folder: Path, function: str, samples: list[str], labels: list[str]) -> list[dict]:
    """What the release-shaped code itself builds (imported with a stand-in for its API client)."""
    sys.modules.setdefault("not_installed_api_client", types.ModuleType("not_installed_api_client"))
    spec = importlib.util.spec_from_file_location("synthetic_chatgpt", folder / "chatgpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, function)(samples, labels)


def _samples(name: str, n: int) -> list[LoadedSample]:
    modality, clips = TEMPLATES[name]
    out = []
    for i in range(n):
        frames = [Image.new("RGB", (8, 8), (30 * i + k, 0, 0)) for k in range(3 if clips else 1)]
        out.append(
            LoadedSample(
                Sample("d", f"sample_{i}", "happy"),
                images=frames if modality != "text" else [],
                frame_indices=[0, 5, 10] if clips and modality != "text" else [],
                source_fps=25.0,
                source_frames=15,
                text=TRANSCRIPTS[i],
            )
        )
    return out


@pytest.mark.parametrize("mode, n", [("batch", 3), ("single", 1)])
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_release_shaped_code_is_sent_as_python_renders_it(synthetic, name, mode, n):
    modality, _ = TEMPLATES[name]
    template = release_template(name, LABELS, release_dir=synthetic)
    request = build_request(
        _samples(name, n),
        template,
        LABELS,
        mode=mode,
        frames_as="images",
        key_parts=KEY_PARTS,
        max_tokens=1000,
        modality=modality,
    )
    sent = request.messages[0]["content"]
    expected = _python_renders(synthetic, FUNCTIONS[name], TRANSCRIPTS[:n], LABELS)
    # ger joins adjacent text parts with a blank line; images stay where the release put them.
    want = []
    for part in expected:
        if part["type"] == "text" and want and want[-1][0] == "text":
            want[-1] = ("text", want[-1][1] + "\n\n" + part["text"])
        else:
            want.append(("text", part["text"]) if part["type"] == "text" else ("image", None))
    assert [(p["type"], p.get("text")) for p in sent] == want


def test_extraction_reads_the_code_without_running_it(synthetic):
    sys.modules.pop("not_installed_api_client", None)
    template = release_template("facial", LABELS, release_dir=synthetic)
    assert "not_installed_api_client" not in sys.modules
    assert "['happy', 'sad', 'angry', 'neutral']" in template.batch  # the list as Python formats it
    assert "{count}" in template.batch and "{'name':, 'result':}" in template.batch
    assert " " * 30 in template.batch  # the release's continuation-line indentation is kept, byte for byte


def test_missing_release_code_is_a_clear_error(no_release):
    with pytest.raises(ReleaseCodeMissing) as err:
        release_template("facial", LABELS, release_dir=no_release / "nowhere" / "results")
    message = str(err.value)
    for needed in (
        "prompt_source=release",
        "chatgpt.py",
        str(no_release / "nowhere" / "chatgpt.py"),  # a results/ folder is taken as the release root
        "ger reproduce",
        "GER_REFERENCE_DIR",
        "release_dir=",
        "82d24bcdba81",
    ):
        assert needed in message
    with pytest.raises(ReleaseCodeMissing):
        select_template("video", LABELS, "release", None)
    assert select_template("video", LABELS, "ours", None) == load_template("video")
    with pytest.raises(ValueError, match=r"prompt_source 'paper'.*'ours', 'release'"):
        select_template("video", LABELS, "paper", None)


def test_code_the_reader_does_not_understand_is_an_error(synthetic):
    code = synthetic / "chatgpt.py"
    code.write_text(SYNTHETIC.replace("{len(image_paths)} pictures", "{image_paths[0]} pictures"))
    with pytest.raises(
        ValueError, match=r"get_image_emotion_batch: unexpected expression \{image_paths\[0\]\}"
    ):
        release_template("facial", LABELS, release_dir=synthetic)
    code.write_text(SYNTHETIC.replace("def get_micro_emotion_batch", "def get_micro_batch"))
    with pytest.raises(
        ValueError, match=r"no function 'get_micro_emotion_batch'; it defines \[.*get_micro_batch"
    ):
        release_template("micro", LABELS, release_dir=synthetic)
    with pytest.raises(ValueError, match=r"no release prompt for template 'terse'"):
        release_template("terse", LABELS, release_dir=synthetic)


def test_found_through_the_reference_dir_variable(synthetic, monkeypatch):
    monkeypatch.setenv("GER_REFERENCE_DIR", str(synthetic / "results"))
    assert find_release_code() == synthetic
    with pytest.raises(ReleaseCodeMissing):  # an explicit release_dir is never silently replaced
        find_release_code(synthetic / "elsewhere")


def test_one_lookup_gives_results_to_scoring_and_the_checkout_to_prompts(synthetic, monkeypatch):
    monkeypatch.setenv("GER_REFERENCE_DIR", str(synthetic / "results"))
    assert find_release() == synthetic / "results"  # scoring views, ger prepare
    assert find_release(holding="chatgpt.py") == synthetic  # prompt_source=release
    with pytest.raises(ReleaseNotFound, match=r"reference_dir=.*nowhere is not a folder"):
        find_release(synthetic / "nowhere")  # named explicitly: never replaced by the variable
    monkeypatch.setenv("GER_REFERENCE_DIR", str(synthetic / "gone"))
    with pytest.raises(ReleaseNotFound, match=r"GER_REFERENCE_DIR=.*gone is not a folder"):
        find_release()  # nor the variable by the cache
    monkeypatch.delenv("GER_REFERENCE_DIR")
    with pytest.raises(ReleaseNotFound, match=r"run `ger reproduce` once"):
        find_release()


def _archive(path: Path) -> Path:
    """A release-shaped archive: <top>/results/ckplus and <top>/chatgpt.py."""
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo("top/results/ckplus")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        code = tarfile.TarInfo("top/chatgpt.py")
        code.size = len(SYNTHETIC.encode())
        tar.addfile(code, io.BytesIO(SYNTHETIC.encode()))
    return path


def test_the_release_download_keeps_the_code_and_completes_an_older_cache(no_release):
    archive = _archive(no_release / "release.tar.gz")
    fresh = download_release(archive.as_uri(), no_release / "fresh")
    assert (fresh.parent / "chatgpt.py").read_text() == SYNTHETIC and (fresh / "ckplus").is_dir()
    dest = release_cache()
    (dest / "results").mkdir(parents=True)  # an older download: results only
    assert download_release(archive.as_uri()) == dest / "results"
    assert (dest / "chatgpt.py").read_text() == SYNTHETIC
    assert find_release_code() == dest  # the default place prompt_source=release looks
    archive.unlink()  # complete now: never fetched again
    assert download_release(archive.as_uri()) == dest / "results"
    assert "Be a face reader" in release_template("facial", LABELS).batch


# ------------------------------------------------------------------ the real release, when present

# Element markers, ours vs the release's: the same elements must come in the same order.
OURS = {
    "role": r"\bexpert in\b",
    "count": r"\bgiven \d+ (images|videos|texts)\b",
    "identity": r"[Dd]isregard",
    "ranking": r"[Oo]rder the candidate",
    "candidates": r"categories: ",
    "record": r"in the form \{'name'",
}
RELEASE = {
    "role": r"\brole\b",
    "count": r"\bprovide \d+ (images|videos|texts)\b",
    "identity": r"identity",
    "ranking": r"\bsort\b",
    "candidates": r"categories: \[",
    "record": r"\bformat\b",
}
RELEASE_KEYS = {"casme1": "casme", "ferplus": "fer2013", "sfew2": "sfew", "twitter1_five": "twitter1"}


def _sequence(text: str, markers: dict[str, str]) -> list[str]:
    hits = sorted((m.start(), element) for element, rx in markers.items() for m in re.finditer(rx, text))
    seq = [element for _, element in hits]
    return [e for i, e in enumerate(seq) if i == 0 or e != seq[i - 1]]  # a repeated clause counts once


@pytest.fixture(scope="module")
def release_code() -> Path:
    try:
        return find_release_code()
    except ReleaseCodeMissing:
        pytest.skip("the release's code is not on this machine (run `ger reproduce` once to download it)")


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_real_release_prompts_render_as_python_would_and_ours_follow_their_order(release_code, name):
    source = (release_code / "chatgpt.py").read_text(encoding="utf-8")
    func = next(n for n in ast.walk(ast.parse(source)) if getattr(n, "name", None) == FUNCTIONS[name])
    fstring = next(n for n in ast.walk(func) if isinstance(n, ast.JoinedStr) and len(n.values) > 2)
    params = [a.arg for a in func.args.args]
    namespace = {params[0]: ["x"] * 4, params[1]: LABELS, "samplenum": 3, "len": len}
    python = eval(compile(ast.Expression(fstring), "<release>", "eval"), {"__builtins__": {}}, namespace)
    ours = release_template(name, LABELS)
    assert render(ours.batch, {"count": "4", "frames": "3"}) == python

    own = render(
        load_template(name).batch, {"count": "4", "labels": ", ".join(LABELS), "media": "m", "frames": "3"}
    )
    assert _sequence(own, OURS) == _sequence(python, RELEASE)
    assert ("top 5" in own) == ("top 5" in python)


def test_real_release_label_lists_are_ours(release_code):
    tree = ast.parse((release_code / "config.py").read_text(encoding="utf-8"))
    emos = next(
        ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "dataset2emos"
    )
    for key in (
        "rafdb",
        "ckplus",
        "sfew2",
        "ferplus",
        "casme1",
        "samm",
        "ravdess",
        "mer2023",
        "twitter1_five",
    ):
        assert emos[RELEASE_KEYS.get(key, key)] == load_group_yaml("dataset", key)["labels"], key
