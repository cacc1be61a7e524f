"""Bad and hostile input, round two (issue 11): each case made the way the world makes it.

Rules checked: data files never execute code; one bad sample gives one error row and the run
finishes; a bad label list stops the run before any request, listing every problem with file and
line; a bad run folder is skipped by `ger report` with a warning naming it; user errors print one
clear line and exit non-zero without a traceback (`--debug` / HYDRA_FULL_ERROR=1 keep it).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import rows, run_ger
from PIL import Image

from ger.data.datasets import LabelListError, load_samples, load_spec, read_label_rows
from ger.data.media import MediaError, load_image
from ger.data.transcripts import load_transcript
from ger.data.validate import check_labels
from ger.options import check_option
from ger.records import OK, Prediction, Sample
from ger.run.pipeline import select
from ger.run.predictions import write_predictions
from ger.scoring.metrics import score

QUIET = ["model=tiny-random-qwen2vl", "backend=hf", "sampling.max_tokens=8", "progress=false"]


def write_labels(root: Path, label_rows: list[tuple[str, str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{n},{g}\n" for n, g in [("name", "gt"), *label_rows])
    (root / "label.csv").write_text(text, encoding="utf-8")


def faces(folder: Path, names: list[str], label: str = "happy") -> None:
    from ger.data.demo import draw_face

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        draw_face((64, 64), label, variant=i).save(folder / name)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2, no traceback, the message on stderr naming what is wrong."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error:" in proc.stderr, proc.stderr[-3000:]
    assert all(w in proc.stderr for w in words), proc.stderr[-3000:]


# ---------------------------------------------------------------- transcripts: no code from data


class _Call:
    """Pickles as a call of `func(*args)`: what an attacker puts into a transcript .npy."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _npy_with_pickle(path: Path, payload: bytes) -> None:
    """A valid .npy header announcing an object array, followed by an arbitrary pickle."""
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    path.write_bytes(f.getvalue() + payload)


def _hostile_files(folder: Path, marker: Path) -> dict[str, Path]:
    """Transcripts whose loading with np.load(allow_pickle=True) would create `marker`."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "system": folder / "system.npy",
        "open": folder / "open.npy",
        "exec": folder / "exec.npy",
        "nested": folder / "nested.npy",
    }
    np.save(files["system"], np.array([_Call(os.system, f"touch {marker}")], dtype=object))
    np.save(files["open"], np.array([_Call(open, str(marker), "w")], dtype=object))
    _npy_with_pickle(files["exec"], pickle.dumps(_Call(exec, f"open({str(marker)!r}, 'w').close()")))
    inner = _Call(subprocess.run, ["touch", str(marker)])
    np.save(files["nested"], np.array([["text", inner]], dtype=object))
    return files


def test_a_pickle_in_a_transcript_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    files = _hostile_files(tmp_path / "t", marker)
    np.load(files["open"], allow_pickle=True)  # the old loader: the payload runs
    assert marker.exists()
    marker.unlink()
    for path in files.values():
        with pytest.raises(MediaError, match=f"transcript {path}.*not a plain array of strings"):
            load_transcript(path)
    assert not marker.exists()


def _numpy1_object_npy(path: Path, items: list[str]) -> None:
    """An object array as numpy 1.x saved it (globals in numpy.core.multiarray, pickle protocol 3)."""
    arr = np.array(items, dtype=object)
    data = pickle.dumps(arr, protocol=3)
    new, old = b"numpy._core.multiarray", b"numpy.core.multiarray"
    data = data.replace(b"c" + new + b"\n", b"c" + old + b"\n")  # protocol 3: GLOBAL "module\nname\n"
    assert old in data and new not in data
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(arr))
    path.write_bytes(f.getvalue() + data)


def test_release_style_transcripts_still_load(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array(["I can't believe it.", "Really?"], dtype=object))
    np.save(tmp_path / "np_str.npy", np.array([np.str_("numpy string items")], dtype=object))
    np.save(tmp_path / "zero_d.npy", np.array("  我很担心结果。 "))
    np.save(tmp_path / "grid.npy", np.array([["a", "b"], ["c", "d"]], dtype=object))
    _numpy1_object_npy(tmp_path / "numpy1.npy", ["saved by numpy 1"])
    assert load_transcript(tmp_path / "obj.npy") == "I can't believe it. Really?"
    assert load_transcript(tmp_path / "np_str.npy") == "numpy string items"
    assert load_transcript(tmp_path / "zero_d.npy") == "我很担心结果。"
    assert load_transcript(tmp_path / "grid.npy") == "a b c d"
    assert load_transcript(tmp_path / "numpy1.npy") == "saved by numpy 1"
    np.save(tmp_path / "ints.npy", np.array([1, "a"], dtype=object))  # pickles fine, but not text
    with pytest.raises(MediaError, match="expected a string"):
        load_transcript(tmp_path / "ints.npy")


@pytest.mark.parametrize("content", [b"", b"   \n\t  \r\n"], ids=["empty", "whitespace"])
def test_an_empty_text_transcript_is_a_media_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "t.txt").write_bytes(content)
    np.save(tmp_path / "t.npy", np.array(content.decode()))
    for name in ("t.txt", "t.npy"):
        with pytest.raises(MediaError, match=f"empty.*{name}"):
            load_transcript(tmp_path / name)


def test_empty_and_hostile_transcripts_are_error_rows_and_prepare_lists_them(cache: Path, tmp_path: Path):
    from test_reliability import assert_error_row, write_clip

    root = tmp_path / "data" / "demo_multimodal"
    marker = tmp_path / "pwned"
    hostile = _hostile_files(root / "transcripts", marker)
    np.save(root / "transcripts" / "good.npy", np.array("We won, I cannot stop smiling."))
    np.save(root / "transcripts" / "empty.npy", np.array(""))
    np.save(root / "transcripts" / "blank.npy", np.array(["  ", "\n"], dtype=object))
    names = ["good", "empty", "blank", *hostile]
    for i, name in enumerate(names):
        write_clip(root / "videos" / f"{name}.mp4", "happy", variant=i)
    write_labels(root, [(n, "happy") for n in names])
    run = tmp_path / "run"
    args = ["dataset=demo_multimodal", f"data_root={tmp_path / 'data'}", "frames=2"]

    run_ger(["run", *args, *QUIET, f"hydra.run.dir={run}"], cache, tmp_path)
    by_name = {r["name"]: r for r in rows(run)}
    assert list(by_name) == names
    assert by_name["good"]["status"] != "error" and by_name["good"]["response_key"]
    assert_error_row(by_name["empty"], "empty.npy", "transcript is empty")
    assert_error_row(by_name["blank"], "blank.npy", "transcript is empty")
    for name in hostile:
        assert_error_row(by_name[name], f"{name}.npy", "not a plain array of strings")
    assert json.loads((run / "metrics.json").read_text())["requests"]["sent"] == 1
    assert not marker.exists()

    proc = run_ger(["prepare", *args, "progress=false"], cache, tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"{len(names) - 1} unreadable files" in proc.stdout, proc.stdout
    for name in names[1:]:
        assert f"{name}.npy" in proc.stdout, proc.stdout
    assert not marker.exists()


# ---------------------------------------------------------------- options


def test_select_limit_table() -> None:
    samples = [Sample("d", f"s{i}", "happy") for i in range(5)]
    assert select(samples, None, None) == samples
    assert select(samples, 2, None) == samples[:2]
    assert select(samples, 9, None) == samples
    assert [s.name for s in select(samples, 1, "1/2")] == ["s1"]
    for bad in (0, -1, "abc", 2.5, True):
        with pytest.raises(
            ValueError, match=f"option limit={bad!r} is not valid; expected a whole number >= 1"
        ):
            select(samples, bad, None)
    with pytest.raises(ValueError, match="greyscale='maybe'.*expected true or false"):
        check_option("greyscale", "maybe")


@pytest.mark.parametrize(
    "override, words",
    [
        ("limit=0", ["limit=0", "whole number >= 1", "null"]),
        ("limit=-1", ["limit=-1", "whole number >= 1"]),
        ("limit=abc", ["limit='abc'", "whole number >= 1"]),
        ("greyscale=maybe", ["greyscale='maybe'", "true or false"]),
        ("follow_symlinks=sometimes", ["follow_symlinks='sometimes'", "true or false"]),
    ],
)
def test_bad_options_print_one_line_naming_the_option(cache: Path, tmp_path: Path, override, words) -> None:
    root = tmp_path / "data" / "demo"
    faces(root / "images", ["a.png", "b.png"])
    write_labels(root, [("a.png", "happy"), ("b.png", "sad")])
    run = tmp_path / "run"
    args = ["run", "dataset=demo", f"data_root={tmp_path / 'data'}", *QUIET, override, f"hydra.run.dir={run}"]
    proc = run_ger(args, cache, tmp_path, check=False)
    assert_one_line_error(proc, "ger run: error: option", *words)
    assert len(proc.stderr.strip().splitlines()) == 2  # the message and the --debug hint
    assert not (run / "predictions.csv").exists()


def test_debug_and_hydra_full_error_keep_the_traceback(cache: Path, tmp_path: Path) -> None:
    args = [
        "run",
        "dataset=demo",
        f"data_root={tmp_path}",
        *QUIET,
        "limit=0",
        f"hydra.run.dir={tmp_path / 'r'}",
    ]
    for extra, env in (([], {"HYDRA_FULL_ERROR": "1"}), (["--debug"], {})):
        proc = run_ger([*args, *extra], cache, tmp_path, env=env, check=False)
        assert proc.returncode != 0 and "Traceback" in proc.stderr, proc.stderr[-2000:]
        assert "UserError: option limit=0 is not valid" in proc.stderr


# ---------------------------------------------------------------- 16-bit images


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")  # PIL writes a 16-bit greyscale PNG
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode == "I;16"
    got = np.asarray(load_image(tmp_path / "grey16.png"), dtype=np.int32)
    expected = np.rint(ramp / 257.0).astype(np.int32)
    assert got.shape == (48, 64, 3) and np.all(got[..., 0] == got[..., 2])
    assert np.abs(got[..., 0] - expected).max() <= 1
    assert got.min() == 0 and got.max() == 255 and (got[..., 0] < 128).mean() > 0.45  # not all white


def test_16_bit_tiff_and_32_bit_modes_are_scaled(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32)
    Image.fromarray(ramp.astype(np.int32), mode="I").save(tmp_path / "i32.tif")
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "i16.tif")
    Image.fromarray((ramp / 65535).astype(np.float32), mode="F").save(tmp_path / "f32.tif")
    expected = np.rint(ramp / 257.0)
    for name in ("i32.tif", "i16.tif", "f32.tif"):
        got = np.asarray(load_image(tmp_path / name), dtype=np.float64)[..., 0]
        assert np.abs(got - expected).max() <= 1, name


def test_48_bit_colour_png_keeps_its_colours(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, (24, 32, 3), dtype=np.uint16)
    assert cv2.imwrite(str(tmp_path / "rgb48.png"), rgb16[..., ::-1].copy())  # OpenCV writes 16-bit BGR
    assert cv2.imread(str(tmp_path / "rgb48.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    got = np.asarray(load_image(tmp_path / "rgb48.png"), dtype=np.int32)
    assert np.abs(got - np.rint(rgb16 / 257.0)).max() <= 1
    grey = np.asarray(load_image(tmp_path / "rgb48.png", greyscale=True))
    assert grey.std() > 20  # not a flat white picture


def test_16_bit_png_written_by_ffmpeg(tmp_path: Path) -> None:
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")  # a test dependency: its own ffmpeg binary
    out = tmp_path / "ff.png"
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-v",
        "error",
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x48",
        "-frames:v",
        "1",
        "-pix_fmt",
        "gray16be",
    ]
    subprocess.run([*cmd, str(out)], check=True)
    with Image.open(out) as im:
        assert im.mode.startswith("I")
        ref = np.rint(np.asarray(im, dtype=np.float64) / 257.0)
    got = np.asarray(load_image(out), dtype=np.float64)[..., 0]
    assert np.abs(got - ref).max() <= 1 and got.max() > got.min()


# ---------------------------------------------------------------- label lists


FACES = ["a.png", "b.png", "c.png"]
ROWS = [("a.png", "happy"), ("b.png", "sad"), ("c.png", "neutral")]


def _saved_by_spreadsheet(path: Path, how: str) -> None:
    """label.csv as spreadsheet programs and pandas save it."""
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(ROWS, columns=["name", "gt"])
    if how == "utf8-bom-crlf":  # Excel "CSV UTF-8"
        df.to_csv(path, index=False, encoding="utf-8-sig", lineterminator="\r\n")
    elif how == "utf16-tabs":  # Excel "Unicode text": UTF-16 with a BOM, tab-separated
        df.to_csv(path, index=False, encoding="utf-16", sep="\t", lineterminator="\r\n")
    elif how == "semicolons":  # Excel "CSV" in locales whose decimal mark is a comma
        df.to_csv(path, index=False, encoding="utf-8", sep=";")
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["utf8-bom-crlf", "utf16-tabs", "semicolons"])
def test_label_lists_saved_by_spreadsheets_load(tmp_path: Path, how: str, cache: Path) -> None:
    root = tmp_path / "data" / "demo"
    faces(root / "images", FACES)
    _saved_by_spreadsheet(root / "label.csv", how)
    assert [(n, g) for _, n, g in read_label_rows(root / "label.csv")] == ROWS
    assert [s.line for s in load_samples(load_spec("demo"), tmp_path / "data")] == [2, 3, 4]
    proc = run_ger(
        ["prepare", "dataset=demo", f"data_root={tmp_path / 'data'}", "progress=false"], cache, tmp_path
    )
    assert "3 samples, 0 problems" in proc.stdout


@pytest.mark.parametrize(
    "encoding, words",
    [
        ("latin-1", ["label.csv:3", "not UTF-8", "CSV UTF-8"]),
        ("utf-16-le", ["UTF-16 without a byte-order mark"]),
    ],
)
def test_label_list_in_another_encoding_fails_naming_the_file(
    tmp_path: Path, cache: Path, encoding, words
) -> None:
    root = tmp_path / "data" / "demo"
    faces(root / "images", ["a.png", "é.png"])
    (root / "label.csv").write_bytes("name,gt\r\na.png,happy\r\né.png,sad\r\n".encode(encoding))
    with pytest.raises(LabelListError, match=str(root / "label.csv")):
        read_label_rows(root / "label.csv")
    proc = run_ger(
        ["prepare", "dataset=demo", f"data_root={tmp_path / 'data'}"], cache, tmp_path, check=False
    )
    assert_one_line_error(proc, "ger prepare: error:", str(root / "label.csv"), *words)


def test_header_only_label_list_fails_prepare_and_run(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data" / "demo"
    faces(root / "images", ["a.png"])
    (root / "label.csv").write_text("name,gt\n")
    for command in ("prepare", "run"):
        args = [
            command,
            "dataset=demo",
            f"data_root={tmp_path / 'data'}",
            *QUIET,
            f"hydra.run.dir={tmp_path / 'r'}",
        ]
        proc = run_ger(args, cache, tmp_path, check=False)
        assert_one_line_error(proc, f"ger {command}: error:", str(root / "label.csv"), "no samples")


def test_every_label_list_problem_is_listed_with_file_and_line(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data" / "demo"
    faces(root / "images", FACES)
    write_labels(
        root, [("a.png", "happy"), ("../../etc/passwd", "sad"), ("b.png", "joyful"), ("a.png", "sad")]
    )
    run = tmp_path / "run"
    args = ["run", "dataset=demo", f"data_root={tmp_path / 'data'}", *QUIET, f"hydra.run.dir={run}"]
    proc = run_ger(args, cache, tmp_path, check=False)
    label_file = root / "label.csv"
    assert_one_line_error(
        proc,
        "3 problems",
        f"{label_file}:3: sample '../../etc/passwd' points outside the media folder",
        f"{label_file}:4: b.png: 'joyful' is not one of",
        f"{label_file}: a.png (lines 2, 5)",
    )
    assert not run.exists() or not (run / "predictions.csv").exists()
    assert not (cache / "responses.sqlite").exists()


def test_names_that_lead_to_one_file_stop_the_run_before_any_request(tmp_path: Path, cache: Path) -> None:
    """A transcript is found by the name's stem alone, and a name without an extension takes the
    layout's: `a/clip1.mp4` and `b/clip1.mp4` would read one transcript, `x` and `x.mp4` one clip."""
    root = tmp_path / "data" / "demo_multimodal"
    root.mkdir(parents=True)
    write_labels(root, [("a/clip1.mp4", "happy"), ("b/clip1.mp4", "sad"), ("x", "happy"), ("x.mp4", "sad")])
    args = ["run", "dataset=demo_multimodal", f"data_root={tmp_path / 'data'}", *QUIET]
    proc = run_ger([*args, f"hydra.run.dir={tmp_path / 'run'}"], cache, tmp_path, check=False)
    label_file = root / "label.csv"
    assert_one_line_error(
        proc,
        "3 problems",  # x and x.mp4 share their clip and their transcript
        f"{label_file}: a/clip1.mp4, b/clip1.mp4 all read {root / 'transcripts' / 'clip1.npy'}",
        f"{label_file}: x, x.mp4 all read {root / 'videos' / 'x.mp4'}",
        f"{label_file}: x, x.mp4 all read {root / 'transcripts' / 'x.npy'}",
    )
    assert not (cache / "responses.sqlite").exists()


@pytest.mark.parametrize("gt", ["nan", "NaN", "inf", "-inf", "", "positive"])
def test_continuous_labels_must_be_finite_numbers(tmp_path: Path, gt: str) -> None:
    spec = load_spec("cmumosi")
    samples = [Sample("cmumosi", "a", "1.4", line=2), Sample("cmumosi", "b", gt, line=3)]
    report = check_labels(spec, samples, "mosi/label.csv")
    assert report.bad_labels == [f"mosi/label.csv:3: b: {gt!r} is not a finite number"]
    preds = [Prediction(s.name, s.gt, ["positive"], OK) for s in samples]
    with pytest.raises(ValueError, match="not a finite number"):
        score(preds, spec)


def test_nan_and_inf_labels_stop_a_run_before_any_request(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data" / "cmumosi"
    write_labels(root, [("a", "1.4"), ("b", "nan"), ("c", "-0.6"), ("d", "inf")])
    run = tmp_path / "run"
    args = ["run", "dataset=cmumosi", f"data_root={tmp_path / 'data'}", *QUIET, f"hydra.run.dir={run}"]
    proc = run_ger(args, cache, tmp_path, check=False)
    label_file = root / "label.csv"
    assert_one_line_error(proc, f"{label_file}:3: b: 'nan'", f"{label_file}:5: d: 'inf'", "2 labels outside")
    assert not (cache / "responses.sqlite").exists()


# ---------------------------------------------------------------- symlinks


def test_links_out_of_the_data_root_are_listed_with_every_other_problem(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data" / "demo"
    faces(root / "images", ["a.png", "b.png"])
    faces(tmp_path / "elsewhere", ["x.png", "y.png"])
    (root / "images" / "x.png").symlink_to(tmp_path / "elsewhere" / "x.png")
    (root / "images" / "y.png").symlink_to(tmp_path / "elsewhere" / "y.png")
    (root / "images" / "b.png").write_bytes(b"not a png")
    write_labels(
        root, [("a.png", "happy"), ("x.png", "happy"), ("b.png", "sad"), ("y.png", "sad"), ("m.png", "sad")]
    )
    args = ["dataset=demo", f"data_root={tmp_path / 'data'}", "progress=false"]

    proc = run_ger(["prepare", *args], cache, tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    out = proc.stdout
    assert "5 samples, 4 problems" in out and "2 symlinks to files outside" in out, out
    assert f"{root / 'label.csv'}:3: {root / 'images' / 'x.png'} is a symlink to" in out, out
    assert f"label.csv:5: {root / 'images' / 'y.png'}" in out and "follow_symlinks=true" in out, out
    assert "1 missing files" in out and "1 unreadable files" in out, out

    proc = run_ger(["prepare", *args, "follow_symlinks=true"], cache, tmp_path, check=False)
    assert "5 samples, 2 problems" in proc.stdout and "symlink" not in proc.stdout, proc.stdout

    run = tmp_path / "run"
    run_ger(["run", *args, *QUIET, f"hydra.run.dir={run}"], cache, tmp_path)
    by_name = {r["name"]: r for r in rows(run)}
    assert by_name["x.png"]["status"] == "error" and "follow_symlinks=true" in by_name["x.png"]["detail"]
    assert by_name["a.png"]["status"] != "error"
    followed = tmp_path / "run_followed"
    run_ger(["run", *args, *QUIET, "follow_symlinks=true", f"hydra.run.dir={followed}"], cache, tmp_path)
    assert [r["status"] != "error" for r in rows(followed)] == [True, True, False, True, False]


# ---------------------------------------------------------------- ger report on bad run folders


def make_run(folder: Path, dataset: str, n: int, gt: list[str] | None = None) -> Path:
    """A run folder as `ger run` writes it; sample i right iff i is even."""
    spec = load_spec(dataset)
    labels = spec.labels
    preds = []
    for i in range(n):
        truth = gt[i] if gt else labels[i % len(labels)]
        top = labels[i % len(labels)] if i % 2 == 0 else labels[(i + 1) % len(labels)]
        preds.append(Prediction(f"s{i:03d}", truth, [top], OK))
    folder.mkdir(parents=True)
    write_predictions(folder / "predictions.csv", preds)
    ok = [p if p.gt in spec.gt_labels else Prediction(p.name, labels[0], p.ranked) for p in preds]
    meta = {**score(ok, spec).to_dict(), "model": folder.name, "overrides": [f"dataset={dataset}"]}
    (folder / "metrics.json").write_text(json.dumps(meta))
    return folder


def _report(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ger.cli",
            "report",
            *args,
            "--bootstrap",
            "0",
            "--out",
            str(tmp_path / "out"),
        ],
        text=True,
        capture_output=True,
        timeout=300,
    )


def test_report_skips_bad_run_folders_and_reports_the_rest(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    good = make_run(runs / "good", "rafdb", 20)
    outside = make_run(runs / "outside", "rafdb", 6, gt=["Fear", "Anger", "joyful", "Fear", "Anger", "Fear"])
    header = make_run(runs / "header", "rafdb", 6)
    (header / "predictions.csv").write_text("name,gt,prediction,top1,status,response_key,detail\n")
    cut = make_run(runs / "cut", "rafdb", 10)
    text = (cut / "predictions.csv").read_text()
    (cut / "predictions.csv").write_text(text[: text.rindex("s009") + 8])  # mid-row
    short = make_run(runs / "short", "rafdb", 10)
    lines = (short / "predictions.csv").read_text().splitlines(keepends=True)
    (short / "predictions.csv").write_text("".join(lines[:8]))  # cut at a row boundary: 7 of 10 rows

    proc = _report([str(runs)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err = proc.stderr
    assert f"warning: skipped {outside}" in err and "'joyful'" in err, err
    assert f"warning: skipped {header}" in err and "only a header" in err, err
    assert f"warning: skipped {cut}" in err and "incomplete row" in err, err
    assert f"warning: {short}: predictions.csv gives n=7 but metrics.json says n=10" in err, err
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert {r["path"]: r["n"] for r in data["runs"]} == {str(good): 20, str(short): 7}
    assert "RAF-DB" in proc.stdout


def test_compare_across_test_sets_warns(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", "rafdb", 10)
    b = make_run(tmp_path / "b", "ravdess", 10)
    proc = _report(["--compare", str(a), str(b)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"warning: --compare: {a} has runs on rafdb that {b} lacks (it has ravdess)" in proc.stderr
    assert f"warning: --compare: {b} has runs on ravdess that {a} lacks" in proc.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["comparisons"] == []


# ---------------------------------------------------------------- response cache


def _read_only_prefix(cache: Path) -> list[str]:
    """Run `ger` with the cache folder mounted read-only (root ignores file modes), or chmod it."""
    if os.geteuid() != 0:
        for p in cache.iterdir():
            if p.is_file():
                p.chmod(0o444)
        cache.chmod(0o555)
        return []
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root without user namespaces: cannot make a read-only folder")
    return ["unshare", "-rm", "sh", "-c", f'mount --bind -o ro "{cache}" "{cache}" && exec "$@"', "sh"]


def test_a_fully_cached_run_works_on_a_read_only_cache(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data" / "demo"
    faces(root / "images", FACES)
    write_labels(root, ROWS)
    args = ["run", "dataset=demo", f"data_root={tmp_path / 'data'}", *QUIET]
    run_ger([*args, f"hydra.run.dir={tmp_path / 'r1'}"], cache, tmp_path)
    first = rows(tmp_path / "r1")
    db = cache / "responses.sqlite"
    assert not Path(f"{db}-wal").exists()  # the last connection checkpointed and removed it
    before = db.read_bytes()

    prefix = _read_only_prefix(cache)
    env = {**os.environ, "GER_CACHE_DIR": str(cache)}
    cmd = [*prefix, sys.executable, "-m", "ger.cli", *args, f"hydra.run.dir={tmp_path / 'r2'}"]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, text=True, capture_output=True, timeout=600)
    finally:
        cache.chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is read-only: cached answers are used" in proc.stdout + proc.stderr  # Hydra logs to stdout
    assert "may be missing" not in proc.stdout + proc.stderr
    meta = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert meta["requests"]["cached"] == 3 and meta["requests"]["sent"] == 0
    assert rows(tmp_path / "r2") == first
    assert db.read_bytes() == before


def test_a_corrupt_cache_names_the_file_and_the_fix(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data" / "demo"
    faces(root / "images", FACES)
    write_labels(root, ROWS)
    db = cache / "responses.sqlite"
    db.write_bytes(b"this is not an SQLite database, it was overwritten" * 100)
    args = [
        "run",
        "dataset=demo",
        f"data_root={tmp_path / 'data'}",
        *QUIET,
        f"hydra.run.dir={tmp_path / 'r'}",
    ]
    proc = run_ger(args, cache, tmp_path, check=False)
    assert_one_line_error(proc, f"response cache {db} cannot be used", "not a database", "move the file away")


ODD_NAMES = ["img_1", "img_1.jpg", "img_1.", ".hidden", "..", "a/..", "a.b/c", "a.b/c.png", "a/b/",
             "a/b/.", "a//b.tar.gz", "./x.y", "x.y/./", "", "/", "clip.01/frame", "v.mp4/", "ü.jpeg",
             "a b.JPG"]  # fmt: skip


@pytest.mark.parametrize("name", ODD_NAMES)
def test_a_names_extension_is_read_as_pathlib_reads_it(name: str) -> None:
    """A label-list name with an extension is the file; one without gets the layout's (.jpg). ger
    reads the extension with string operations (ger/data/datasets.py _suffix), as Path does."""
    from pathlib import PurePosixPath

    from ger.data.datasets import _suffix

    assert _suffix(name) == PurePosixPath(name).suffix
