"""`ger prepare source=RAW_DIR`: synthetic raw downloads of all 21 test sets become layouts `ger` accepts.

Each raw tree is shaped like the dataset's official distribution (nested folders, mixed-case
extensions, decoys, frame folders, the multimodal sets' own transcript files) and built from the
release's label lists in ../shared/reference; media are tiny valid files, hard-linked.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import rows, run_ger

from ger.data.datasets import all_specs, load_samples, load_spec, read_label_list
from ger.data.raw_index import build_index, name_key, pattern_regex
from ger.data.transcripts import load_transcript
from ger.data.validate import check_dataset

REPO = Path(__file__).resolve().parents[1]
SUBSET = 8  # names per set for the per-set test (rafdb runs in full below)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """A 32x32 PNG and JPEG and a 4-frame 64x48 mp4, made once and hard-linked everywhere.

    (decord misreads 32-pixel-wide clips, so the clip is wider.)
    """
    from imageio_ffmpeg import get_ffmpeg_exe
    from PIL import Image

    d = tmp_path_factory.mktemp("media")
    img = Image.new("RGB", (32, 32), (180, 40, 40))
    img.save(d / "tiny.png")
    img.save(d / "tiny.jpg")
    cmd = [get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "color=c=red:s=64x48:d=0.4:r=10"]
    subprocess.run([*cmd, "-c:v", "mpeg4", "-pix_fmt", "yuv420p", "-y", str(d / "tiny.mp4")], check=True)
    return {"png": d / "tiny.png", "jpg": d / "tiny.jpg", "mp4": d / "tiny.mp4"}


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.link(src, dest)


def _upper_ext(rel: str, i: int) -> str:
    """Every third file gets an upper-case extension, as Windows-made archives do."""
    stem, ext = os.path.splitext(rel)
    return stem + ext.upper() if i % 3 == 1 else rel


def _mosi_video(name: str) -> tuple[str, str]:
    video, seg = name.rsplit("_", 1)
    return video, seg


# Where each set's official download keeps a listed sample (relative path in the raw tree).
SHAPES = {
    "ckplus": lambda n, g, i: f"cohn-kanade-images/{n.split('_')[0]}/{n.split('_')[1]}/{_upper_ext(n, i)}",
    "sfew2": lambda n, g, i: f"Val/{g}/{n}",
    "ferplus": lambda n, g, i: f"FER2013Test/{_upper_ext(n, i)}",
    "rafdb": lambda n, g, i: f"basic/Image/original/{_upper_ext(n, i)}",
    "affectnet": lambda n, g, i: f"Manually_Annotated/Manually_Annotated_Images/{n}",
    "twitter1_five": lambda n, g, i: f"twitter_images/{n}",
    "twitter1_four": lambda n, g, i: f"twitter_images/{n}",
    "twitter1_three": lambda n, g, i: f"twitter_images/{n}",
    "twitter2": lambda n, g, i: f"Twitter2/images/{_upper_ext(n, i)}",
    "abstract": lambda n, g, i: f"testImages_abstract/{n}",
    "artphoto": lambda n, g, i: f"testImages_artphoto/{n}{'.JPG' if i % 2 else '.jpg'}",
    "casme1": lambda n, g, i: f"CASME/apex/sub{i % 3:02d}/{n}",
    "casme2": lambda n, g, i: f"CASME2/apex/sub{i % 3:02d}/{_upper_ext(n, i)}",
    "samm": lambda n, g, i: f"SAMM/apex/{n[:3]}/{n}",
    "dfew": lambda n, g, i: f"Clip/original/{int(n):05d}.mp4",
    "ferv39k": lambda n, g, i: f"FERV39k/2_ClipsforFaceCrop/Scene{i % 3}/Sub{i % 2}/{n}",
    "ravdess": lambda n, g, i: f"Actor_{n[-6:-4]}/{n}",
    "enterface": lambda n, g, i: f"enterface database/{_upper_ext(n, i + 1)}",
    "mer2023": lambda n, g, i: f"MER2023/video/{n}.mp4",
    "sims": lambda n, g, i: f"Raw/{n.rsplit('_', 1)[0]}/{n.rsplit('_', 1)[1]}.mp4",
    "cmumosi": lambda n, g, i: f"Raw/Video/Segmented/{n}.mp4",
}


def test_every_test_set_has_a_raw_shape():
    assert set(SHAPES) == {s.key for s in all_specs()} and len(SHAPES) == 21


def trimmed_reference(reference_dir: Path, key: str, dest: Path, count: int | None) -> list[tuple[str, str]]:
    """The release's label list for `key` (its first `count` rows), in a results/-shaped folder."""
    spec = load_spec(key)
    rows_ = read_label_list(reference_dir / spec.reference.folder / spec.layout.label_file)
    rows_ = rows_[:count] if count else rows_
    out = dest / spec.reference.folder / spec.layout.label_file
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("name", "gt", "gpt4v"), *[(n, g, "") for n, g in rows_]])
    return rows_


def transcript_text(name: str) -> str:
    return f"what {name} says"


def make_raw(key: str, rows_: list[tuple[str, str]], raw: Path, media: dict[str, Path]) -> dict[str, str]:
    """Lay out a raw download; returns name -> the relative path of its true media."""
    spec = load_spec(key)
    placed = {}
    for i, (name, gt) in enumerate(rows_):
        rel = SHAPES[key](name, gt, i)
        placed[name] = rel
        if spec.layout.media_kind == "frames":
            for j in range(3):
                _link(media["jpg"], raw / rel / f"{j + 1:03d}.jpg")
        elif spec.layout.media_kind == "video":
            _link(media["mp4"], raw / rel)
        else:
            _link(media["png" if rel.lower().endswith(".png") else "jpg"], raw / rel)
    name0, gt0 = rows_[0]
    decoys = {  # files a naive search would also pick up
        "sfew2": f"Train/{gt0}/{name0}",  # same file name in the training split: ambiguous until narrowed
        "affectnet": f"Manually_Annotated/Manually_Annotated_Images/999/{name0.split('/')[-1]}",
        "rafdb": f"basic/Image/aligned/{Path(name0).stem}_aligned.jpg",
        "ravdess": f"Actor_01/03{name0[2:-4]}.wav",
        "ferplus": "FER2013Train/fer0000001.png",
    }
    if key in decoys:
        _link(media["jpg"], raw / decoys[key])
    if key == "ferv39k":  # an annotation folder named like a clip, holding no images
        (raw / "annotations" / name0).mkdir(parents=True)
        (raw / "annotations" / name0 / "meta.json").write_text("{}")
    _write_transcripts(key, [n for n, _ in rows_], raw)
    return placed


def _write_transcripts(key: str, names: list[str], raw: Path) -> None:
    if key == "mer2023":  # the transcription CSV, and one sample only as a per-sample .txt (the fallback)
        with (raw / "MER2023" / "transcription.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["name", "chinese", "english"])
            w.writerows([(n, "中文", transcript_text(n)) for n in names[:-1]])
        (raw / "MER2023" / "txt").mkdir()
        (raw / "MER2023" / "txt" / f"{names[-1]}.txt").write_text(transcript_text(names[-1]))
    elif key == "sims":  # CH-SIMS label.csv: clip ids without zero padding
        with (raw / "label.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(
                [
                    "video_id",
                    "clip_id",
                    "text",
                    "label",
                    "label_T",
                    "label_A",
                    "label_V",
                    "annotation",
                    "mode",
                ]
            )
            for n in names:
                vid, clip = n.rsplit("_", 1)
                w.writerow([vid, int(clip), transcript_text(n), 0.0, 0.0, 0.0, 0.0, "Neutral", "test"])
    elif key == "cmumosi":  # Transcript/Segmented/<video>.annotprocessed, `<segment>_DELIM_<text>`
        by_video: dict[str, list[str]] = {}
        for n in names:
            video, seg = _mosi_video(n)
            by_video.setdefault(video, []).append(f"{seg}_DELIM_{transcript_text(n)} ")
        folder = raw / "Raw" / "Transcript" / "Segmented"
        folder.mkdir(parents=True)
        for video, lines in by_video.items():
            (folder / f"{video}.annotprocessed").write_text("\n".join(lines) + "\n")


def prepare(key: str, raw: Path, ref: Path, data: Path, cache: Path, *extra: str, check: bool = True):
    args = ["prepare", f"dataset={key}", f"source={raw}", f"reference_dir={ref}", f"data_root={data}"]
    return run_ger([*args, "progress=false", *extra], cache, data.parent, check=check)


def assert_layout(
    key: str, rows_: list[tuple[str, str]], placed: dict[str, str], raw: Path, data: Path
) -> None:
    """The layout lists the release's rows, links each to its true file, and passes today's checks."""
    spec = load_spec(key)
    root = data / key
    assert read_label_list(root / spec.layout.label_file) == rows_
    samples = load_samples(spec, data)
    for s in samples:
        assert s.media.is_symlink(), s.media
        assert os.path.samefile(s.media, raw / placed[s.name]), s.name
        if spec.layout.transcript_dir:
            assert load_transcript(s.transcript) == transcript_text(s.name)
    report = check_dataset(spec, samples, media=True, transcripts=bool(spec.layout.transcript_dir))
    assert report.problems == 0, report.summary()


@pytest.mark.parametrize("key", sorted(SHAPES))
def test_a_raw_download_becomes_a_layout_ger_prepare_and_run_accept(
    key, reference_dir, media, ger_cache, tmp_path, stub_server
):
    ref, raw, data = tmp_path / "ref", tmp_path / "raw", tmp_path / "data"
    rows_ = trimmed_reference(reference_dir, key, ref, SUBSET)
    placed = make_raw(key, rows_, raw, media)
    extra = ["source_include=Val/**"] if key == "sfew2" else []
    proc = prepare(key, raw, ref, data, ger_cache, *extra)
    assert f"found {len(rows_)}, missing 0, ambiguous 0" in proc.stdout
    assert_layout(key, rows_, placed, raw, data)
    # and the plain check of the finished layout, as a user runs it before `ger run`
    run_ger(["prepare", f"dataset={key}", f"data_root={data}", "progress=false"], ger_cache, tmp_path)
    # then `ger run` takes it: media decoded, requests sent (a loopback stub answering with the label
    # list in order), answers read and scored
    labels = load_spec(key).labels
    stub_server.model = lambda body: (json.dumps(labels), "stop")
    run_ger(
        [
            "run",
            f"dataset={key}",
            f"data_root={data}",
            "model=qwen2_5_vl_7b",  # a real model config: the stub serves it, nothing is loaded
            "backend=server",
            f"backend.base_url={stub_server.url}",
            "limit=2",
            "progress=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        ger_cache,
        tmp_path,
    )
    assert [(r["status"], r["top1"]) for r in rows(tmp_path / "run")] == [("ok", labels[0])] * 2


def test_a_name_in_train_and_test_folders_is_ambiguous_until_narrowed(
    reference_dir, media, ger_cache, tmp_path
):
    ref, raw, data = tmp_path / "ref", tmp_path / "raw", tmp_path / "data"
    rows_ = trimmed_reference(reference_dir, "sfew2", ref, SUBSET)
    make_raw("sfew2", rows_, raw, media)
    proc = prepare("sfew2", raw, ref, data, ger_cache, check=False)
    name, gt = rows_[0]
    assert proc.returncode == 1
    assert "ambiguous 1" in proc.stdout and f"{name}: Train/{gt}/{name}, Val/{gt}/{name}" in proc.stdout
    assert "source_include" in proc.stdout and not data.exists()  # nothing half-written
    prepare("sfew2", raw, ref, data, ger_cache, "source_exclude=Train")
    assert (data / "sfew2" / "label.csv").is_file()


def test_missing_samples_fail_unless_allowed(reference_dir, media, ger_cache, tmp_path):
    ref, raw, data = tmp_path / "ref", tmp_path / "raw", tmp_path / "data"
    rows_ = trimmed_reference(reference_dir, "dfew", ref, SUBSET)
    placed = make_raw("dfew", rows_, raw, media)
    gone = [rows_[2][0], rows_[5][0]]
    for name in gone:
        (raw / placed[name]).unlink()
    proc = prepare("dfew", raw, ref, data, ger_cache, check=False)
    assert proc.returncode == 1 and "2 missing samples:" in proc.stdout
    assert all(f"    {n}\n" in proc.stdout for n in gone) and not data.exists()
    prepare("dfew", raw, ref, data, ger_cache, "allow_missing=true")
    # the missing samples stay listed (a run scores them as wrong instead of dropping them)
    assert [n for n, _ in read_label_list(data / "dfew" / "label.csv")] == [n for n, _ in rows_]
    assert sorted(p.stem for p in (data / "dfew" / "videos").iterdir()) == sorted(
        n for n, _ in rows_ if n not in gone
    )


def test_copy_mode_copies_frame_folders_and_an_existing_layout_needs_overwrite(
    reference_dir, media, ger_cache, tmp_path
):
    ref, raw, data = tmp_path / "ref", tmp_path / "raw", tmp_path / "data"
    rows_ = trimmed_reference(reference_dir, "ferv39k", ref, 4)
    make_raw("ferv39k", rows_, raw, media)
    prepare("ferv39k", raw, ref, data, ger_cache, "copy=true")
    clip = data / "ferv39k" / "frames" / rows_[0][0]
    assert clip.is_dir() and not clip.is_symlink() and len(list(clip.iterdir())) == 3
    again = prepare("ferv39k", raw, ref, data, ger_cache, check=False)
    assert again.returncode != 0 and "overwrite=true" in again.stderr
    prepare("ferv39k", raw, ref, data, ger_cache, "overwrite=true")
    assert (data / "ferv39k" / "frames" / rows_[0][0]).is_symlink()
    assert sorted(p.name for p in data.iterdir()) == ["ferv39k"]  # no temporary or old folders left


def test_a_full_size_set_end_to_end(reference_dir, media, ger_cache, tmp_path):
    ref, raw, data = tmp_path / "ref", tmp_path / "raw", tmp_path / "data"
    rows_ = trimmed_reference(reference_dir, "rafdb", ref, None)
    assert len(rows_) == 3068
    placed = make_raw("rafdb", rows_, raw, media)
    proc = prepare("rafdb", raw, ref, data, ger_cache)
    assert (
        "found 3068, missing 0, ambiguous 0" in proc.stdout
        and "rafdb: 3068 samples, 0 problems" in proc.stdout
    )
    assert_layout("rafdb", rows_, placed, raw, data)


# ------------------------------------------------------------------ the index on its own


@pytest.mark.parametrize(
    "patterns, path, hit",
    [
        (["Test/**"], "test/a/b.jpg", True),
        (["Test/**"], "train/test/b.jpg", False),
        (["Test"], "test/b.jpg", True),
        (["**/Val/**"], "sfew/val/angry/x.png", True),
        (["**/Val/**"], "val/x.png", True),
        (["*/original/*"], "image/original/x.jpg", True),
        (["*/original/*"], "basic/image/original/x.jpg", False),
        (["a/**", "b/**"], "b/x.jpg", True),
    ],
)
def test_path_patterns(patterns, path, hit):
    assert (pattern_regex(patterns).match(path) is not None) is hit


def test_name_keys_ignore_case_and_leading_zeros():
    assert name_key("Sample_0001") == "sample_0001" and name_key("00042") == name_key("42") == "42"


def test_one_walk_indexes_files_frame_folders_and_transcript_files(tmp_path, media):
    _link(media["jpg"], tmp_path / "A" / "clip1" / "001.jpg")
    _link(media["mp4"], tmp_path / "B" / "Clip1.MP4")
    (tmp_path / "B" / "clip1.annotprocessed").write_text("1_DELIM_hi\n")
    frames = build_index(tmp_path, extensions=(), frames=True, source_files=["*.annotprocessed"])
    videos = build_index(tmp_path, extensions=(".mp4",))
    assert [e.rel for e in frames.media["clip1"]] == ["A/clip1"] and frames.media["clip1"][0].is_dir
    assert [e.rel for e in frames.sources] == ["B/clip1.annotprocessed"]
    assert [e.rel for e in videos.media["clip1"]] == ["B/Clip1.MP4"]
    assert videos.files == 3 and videos.dirs == 3
    # unpacked from a Mac's zip: a __MACOSX/ mirror of AppleDouble files, and ._ files beside the data
    for rel in ("__MACOSX/A/clip1/._001.jpg", "__MACOSX/B/._Clip1.MP4", "A/clip1/._001.jpg", "B/._Clip1.MP4"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    frames = build_index(tmp_path, extensions=(), frames=True, source_files=["*.annotprocessed"])
    videos = build_index(tmp_path, extensions=(".mp4",))
    assert [e.rel for e in frames.media["clip1"]] == ["A/clip1"] and len(frames.media) == 1
    assert [e.rel for e in videos.media["clip1"]] == ["B/Clip1.MP4"] and len(videos.media) == 1
    assert videos.files == 3 and videos.dirs == 3


def test_one_file_is_never_laid_out_for_two_samples(tmp_path):
    """Names that key alike (case, leading zeros) where the download holds one file for them: both
    names are ambiguous, never two samples on one file."""
    from ger.data.layout import match

    for rel in ("DFEW/00012.mp4", "FERV/AbC.mp4", "MAFW/00007.mp4", "DFEW/00008.mp4"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(rel.encode())
    index = build_index(tmp_path, extensions=(".mp4",))
    report = match(["12", "012", "AbC", "aBc", "7", "8"], index, "video")
    assert sorted(report.found) == ["7", "8"]  # 7 is still taken from MAFW: one claim, nothing to compare
    assert sorted(report.ambiguous) == ["012", "12", "AbC", "aBc"]
    assert report.ambiguous["aBc"] == ["FERV/AbC.mp4 (also the file found for AbC)"]


def test_keys_take_ascii_digits_only_and_transcript_files_obey_include_and_exclude(tmp_path):
    assert name_key("00012") == "12" and name_key("\u00b2") == "\u00b2" and name_key("\u0661\u0662") != "12"
    for rel in ("test/transcription.csv", "train_old/transcription.csv"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("name,english\ns1,hi\n", encoding="utf-8")
    index = build_index(tmp_path, extensions=(".mp4",), exclude=["train_old/**"], source_files=["*.csv"])
    assert [e.rel for e in index.sources] == ["test/transcription.csv"]


# ------------------------------------------------------------------ ger run on prepared layouts

RUN = ["model=tiny-random-qwen2vl", "backend=hf", "sampling.max_tokens=8", "progress=false", "limit=2"]


@pytest.mark.parametrize("key", ["rafdb", "dfew", "sims"])
def test_ger_run_accepts_a_prepared_layout(key, reference_dir, media, ger_cache, tmp_path):
    pytest.importorskip("transformers")
    ref, raw, data = tmp_path / "ref", tmp_path / "raw", tmp_path / "data"
    rows_ = trimmed_reference(reference_dir, key, ref, 4)
    make_raw(key, rows_, raw, media)
    prepare(key, raw, ref, data, ger_cache)
    run = tmp_path / "run"
    run_ger(["run", f"dataset={key}", f"data_root={data}", *RUN, f"hydra.run.dir={run}"], ger_cache, tmp_path)
    preds = rows(run)
    assert [r["name"] for r in preds] == [n for n, _ in rows_[:2]]
    assert all(r["status"] != "error" and r["response_key"] for r in preds), preds


# ------------------------------------------------------------------ transcript files


@pytest.mark.parametrize(
    "header, row, name, text, expect",
    [
        # MER2023 baseline (MERTools) reads `name, sentence`; later MER releases `name, chinese, english`
        (
            "name,sentence",
            "sample_01,hello there",
            "{name}",
            ["english", "sentence", "chinese"],
            "hello there",
        ),
        ("name,chinese,english", "sample_01,你好,hi", "{name}", ["english", "sentence", "chinese"], "hi"),
        ("name,chinese,english", "sample_01,你好,", "{name}", ["english", "sentence", "chinese"], "你好"),
        # CH-SIMS label.csv: clip ids unpadded in the file, padded to 4 in the file tree and the release
        (
            "video_id,clip_id,text,mode",
            "video_0001,2,good,test",
            "{video_id}_{clip_id:0>4}",
            ["text"],
            "good",
        ),
    ],
)
def test_transcript_csv_columns(tmp_path, header, row, name, text, expect):
    from ger.data.raw_index import Entry
    from ger.data.raw_transcripts import TranscriptSource, read_sources

    path = tmp_path / "t.csv"
    path.write_text(f"{header}\n{row}\n", encoding="utf-8")
    texts, conflicts, used = read_sources(
        TranscriptSource("csv", ["t.csv"], name, text), [Entry(str(path), "t.csv", False)]
    )
    key = "video_0001_0002" if "video_id" in header else "sample_01"
    assert texts == {key: expect} and used == ["t.csv"] and conflicts == {}


def test_a_csv_of_another_shape_is_not_read_as_transcripts(tmp_path):
    from ger.data.raw_index import Entry
    from ger.data.raw_transcripts import TranscriptSource, read_sources

    path = tmp_path / "label.csv"
    path.write_text("name,gt\nx,happy\n", encoding="utf-8")  # a label list, not CH-SIMS's label.csv
    src = TranscriptSource("csv", ["label.csv"], "{video_id}_{clip_id:0>4}", ["text"])
    assert read_sources(src, [Entry(str(path), "label.csv", False)]) == ({}, {}, [])


def test_transcripts_follow_the_preferred_column_across_files_and_disagreements_are_reported(tmp_path):
    """The last row read used to win: a duplicated row, or an older copy of the CSV elsewhere in the
    download, silently gave a sample another clip's words, and a Chinese-only CSV read after the
    English one replaced every English text."""
    from ger.data.raw_index import Entry
    from ger.data.raw_transcripts import TranscriptSource, read_sources

    files = {
        "a/transcription-engchi.csv": "name,chinese,english\ns1,zh1,en1\ns2,zh2,en2\ns3,zh3,en3\n",
        "b/transcription.csv": "name,sentence\ns1,zh1\ns2,zh2\ns3,zh3\n",  # read after a/: less preferred
        "c/transcription-old.csv": "name,english\ns3,an older en3\n",  # disagrees at the same column
        "d/transcription-dup.csv": "name,english\ns2,en2\ns2,en2\n",  # agrees: no conflict
    }
    entries = []
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
        entries.append(Entry(str(tmp_path / rel), rel, False))
    src = TranscriptSource("csv", ["*transcription*.csv"], "{name}", ["english", "sentence", "chinese"])
    texts, conflicts, used = read_sources(src, entries)
    assert texts == {"s1": "en1", "s2": "en2"} and len(used) == 4
    assert conflicts == {"s3": ["a/transcription-engchi.csv", "c/transcription-old.csv"]}
