"""Batch mode as the paper ran it, end to end through `ger run backend=server` against a scripted
loopback server (tests/stub_server.py): a model that always knows the true label, answering in the
styles open models use, scores >= 95% in single and batch mode on an image set and a video set;
no request carries a sample name; batches are cut from one fixed, class-mixed shuffle that reruns
reuse (so they hit the cache); cut or incomplete answers are split and asked again; the effective
batch sizes are reported.

The test sets are made here the way RAVDESS is: the emotion code is the third field of each file
name, and the label list is sorted by class.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
from conftest import cached_answers, rows, run_on_stub
from stub_server import BATCH_STYLES, PerfectModel, StubServer

from ger.backends.chat_format import image_base64
from ger.config import load_group_yaml
from ger.data.datasets import spec_from_dict
from ger.data.media import load_sample

CODES = {"neutral": 1, "happy": 3, "sad": 4, "anger": 5, "fear": 6, "disgust": 7, "surprise": 8}
LABELS = ["anger", "disgust", "fear", "happy", "neutral", "sad", "surprise"]  # demo.yaml's label set


def ravdess_name(label: str, k: int) -> str:
    """modality-channel-emotion-intensity-statement-repetition-actor, as RAVDESS names its files."""
    return f"01-01-{CODES[label]:02d}-0{k % 2 + 1}-0{k % 2 + 1}-0{k // 2 % 2 + 1}-{k + 1:02d}"


def write_labels(root: Path, pairs: list[tuple[str, str]]) -> None:
    with (root / "label.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "gt"])
        writer.writerows(sorted(pairs, key=lambda p: (CODES[p[1]], p[0])))  # sorted by class, like releases


@pytest.fixture(scope="module")
def face_set(tmp_path_factory) -> Path:
    """84 face images, 12 per class."""
    from ger.data.demo import draw_face

    root = tmp_path_factory.mktemp("faces")
    (root / "images").mkdir()
    pairs = []
    for label in LABELS:
        for k in range(12):
            name = ravdess_name(label, k)
            face = draw_face((64, 64), label, 1.0, variant=CODES[label] * 100 + k)
            face.save(root / "images" / f"{name}.png")
            pairs.append((name, label))
    write_labels(root, pairs)
    return root


@pytest.fixture(scope="module")
def clip_set(tmp_path_factory) -> Path:
    """21 short clips, 3 per class (onset -> apex, as the demo's)."""
    from ger.data.demo import _write_clip

    root = tmp_path_factory.mktemp("clips")
    (root / "videos").mkdir()
    pairs = []
    for label in LABELS:
        for k in range(3):
            name = ravdess_name(label, k)
            _write_clip(root / "videos" / f"{name}.mp4", label, 12 + k, CODES[label] * 10 + k, size=(64, 48))
            pairs.append((name, label))
    write_labels(root, pairs)
    return root


SETS = {"image": ("demo", "face_set"), "video": ("demo_video", "clip_set")}


def truth_table(dataset: str, root: Path) -> tuple[dict[str, str], list[str]]:
    """image payload digest -> label for every image ger will send, and the sample names.

    Made with ger's own loader and encoder (a still's file as it is, a frame's JPEG at quality 90, the
    server backend's default), so the digests are those of the data URLs the stub receives.
    """
    from ger.data.datasets import load_samples

    data = load_group_yaml("dataset", dataset)
    data["layout"] = {**data["layout"], "root": str(root)}
    spec = spec_from_dict(data)
    table, names = {}, []
    for sample in load_samples(spec, root):
        loaded = load_sample(sample, spec.layout.media_kind, frames=3, sampler="paper")
        for image in loaded.images:
            payload = image_base64(image, 90, loaded.source)  # a still's own file, a frame's JPEG
            table[hashlib.sha256(payload.encode("ascii")).hexdigest()] = sample.gt
        names.append(sample.name)
    return table, names


def value(metrics: dict, metric: str) -> float:
    return next(s["value"] for s in metrics["scores"] if s["metric"] == metric)


def assert_no_names(texts: list[str], names: list[str]) -> None:
    leaked = [(n, i) for i, t in enumerate(texts) for n in names if n in t]
    assert texts and not leaked, f"sample names in request texts: {leaked[:5]}"


@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("mode", ["single", "batch"])
def test_a_perfect_model_scores_95_through_the_server_backend(kind, mode, stub_server, request, tmp_path):
    dataset, fixture = SETS[kind]
    root = request.getfixturevalue(fixture)
    table, names = truth_table(dataset, root)
    # the styles that force a split come first for the few video batches
    styles = BATCH_STYLES if kind == "image" else ("cut", "skip_last", "repeated", "no_ids", *BATCH_STYLES)
    stub_server.model = model = PerfectModel(LABELS, table, batch_styles=styles)
    extra = ["mode=batch", "batch_size=4"] if (mode, kind) == ("batch", "image") else [f"mode={mode}"]
    metrics = run_on_stub(stub_server.url, dataset, root, tmp_path / "cache", tmp_path / "run", *extra)

    main = value(metrics, "acc" if kind == "image" else "war")
    assert main >= 95.0, metrics
    assert metrics["n"] == len(names) and model.unknown == 0
    assert_no_names(stub_server.texts, names)
    predictions = rows(tmp_path / "run")
    assert [r["name"] for r in predictions] == names  # label-file order, whatever the batch order
    if mode == "single":
        assert "batching" not in metrics
        return
    batching = asked = metrics["batching"]
    assert asked["splits"] == asked["split_cut"] + asked["split_missing"] + asked["split_failed"] > 0
    assert asked["split_cut"] > 0 and asked["split_missing"] > 0 and asked["duplicate_records"] > 0
    assert asked["records_by_position"] > 0
    assert batching["seed"] == 0 and sum(int(k) * v for k, v in batching["requests"].items()) == len(names)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "batch mode: paper batch size" in report
    if kind == "video":  # 8 clips x 3 frames = 24 images, over Qwen2.5-VL's max_images=20
        assert (batching["paper_size"], batching["planned_size"]) == (8, 6)
        assert "max_images=20" in batching["note"] and "below the paper's 8" in report
    else:
        assert batching["planned_size"] == 4 and "set by the run" in batching["note"]


def test_a_batch_cut_at_its_max_tokens_is_cached_and_its_rerun_sends_nothing(face_set, stub_server, tmp_path):
    """An answer cut at the request's own max_tokens (finish "length", its whole budget used) is the
    model's answer to that request: cached, and split from the cache on a rerun, which sends nothing.
    (Only a cut by the served context, under max_tokens, is left out of the cache.)"""
    table, names = truth_table("demo", face_set)
    stub_server.model = PerfectModel(LABELS, table, batch_styles=("cut", "json_ids"))
    extra = ["mode=batch", "batch_size=4"]
    first = run_on_stub(stub_server.url, "demo", face_set, tmp_path / "cache", tmp_path / "a", *extra)
    assert first["batching"]["split_cut"] > 0 and value(first, "acc") == 100.0
    again = run_on_stub(stub_server.url, "demo", face_set, tmp_path / "cache", tmp_path / "b", *extra)
    assert again["requests"]["sent"] == 0 and again["stream"]["decoded"] == 0, again
    assert again["batching"]["split_cut"] == first["batching"]["split_cut"]
    assert rows(tmp_path / "b") == rows(tmp_path / "a")


def test_a_20_record_answer_fits_the_budget_and_a_cut_one_is_split(face_set, stub_server, tmp_path):
    """The per-record budget lets 20 records through; the old fixed 256 tokens cut them, and then
    the cut batch is split and asked again instead of being scored from fragments."""
    table, names = truth_table("demo", face_set)
    stub_server.model = PerfectModel(LABELS, table, batch_styles=("json_ids",))
    metrics = run_on_stub(stub_server.url, "demo", face_set, tmp_path / "cache", tmp_path / "a", "mode=batch")
    assert stub_server.cut_by_budget == 0 and metrics["requests"]["splits"] == 0
    assert metrics["batching"]["requests"] == {"20": 4, "4": 1} and value(metrics, "acc") == 100.0
    assert metrics["batching"]["note"] == ""  # images: the paper's 20 fit the model's limit

    old = ["mode=batch", "sampling.max_tokens_per_record=null"]
    metrics = run_on_stub(stub_server.url, "demo", face_set, tmp_path / "cache", tmp_path / "b", *old)
    assert stub_server.cut_by_budget > 0 and metrics["batching"]["split_cut"] > 0
    assert value(metrics, "acc") == 100.0


def test_a_rerun_builds_the_same_batches_and_hits_the_cache(face_set, stub_server, tmp_path):
    table, names = truth_table("demo", face_set)
    stub_server.model = PerfectModel(LABELS, table, batch_styles=("lines",))
    cache = tmp_path / "cache"
    first = run_on_stub(stub_server.url, "demo", face_set, cache, tmp_path / "a", "mode=batch", "limit=30")
    sent = len(stub_server.bodies)
    again = run_on_stub(stub_server.url, "demo", face_set, cache, tmp_path / "b", "mode=batch", "limit=30")
    assert first["requests"]["sent"] == sent > 0
    assert again["requests"]["sent"] == 0 and len(stub_server.bodies) == sent  # nothing new was asked
    order = (tmp_path / "a" / "order.csv").read_text()
    assert order == (tmp_path / "b" / "order.csv").read_text()
    # `limit` takes the first samples of the shuffle, so even a smoke run sees most classes
    labels = {r["gt"] for r in rows(tmp_path / "a")}
    assert len(labels) >= 5
    # the same model behind another address (a restarted `vllm serve` on a new port): still all cached
    moved = StubServer(stub_server.model).start()
    try:
        elsewhere = run_on_stub(moved.url, "demo", face_set, cache, tmp_path / "d", "mode=batch", "limit=30")
    finally:
        moved.stop()
    assert elsewhere["requests"]["sent"] == 0 and not moved.bodies and moved.url != stub_server.url
    seed1 = ["mode=batch", "limit=30", "batch_seed=1"]
    other = run_on_stub(stub_server.url, "demo", face_set, cache, tmp_path / "c", *seed1)
    assert other["requests"]["sent"] > 0 and (tmp_path / "c" / "order.csv").read_text() != order


def test_an_answer_cut_by_the_served_context_is_used_but_not_cached(face_set, stub_server, tmp_path):
    """vLLM clamps max_tokens to what the context leaves: a batch whose records do not fit is cut before
    its own budget. That answer depends on --max-model-len, which no cache key holds; it is split and
    asked again as before, but not kept, so the same run against a longer context asks the whole batch."""
    table, names = truth_table("demo", face_set)
    stub_server.model = PerfectModel(LABELS, table, batch_styles=("json_ids",))
    stub_server.max_model_len = 700  # prompts of ~400 tokens: room for about 10 records, not 20
    cache, batch = tmp_path / "cache", ("mode=batch", "limit=40")
    short = run_on_stub(stub_server.url, "demo", face_set, cache, tmp_path / "a", *batch)
    assert value(short, "acc") == 100.0 and short["batching"]["split_cut"] == 2  # both batches of 20 cut
    assert short["requests"]["sent"] == 6 and cached_answers(cache) == 4  # the halves only

    stub_server.max_model_len = None  # the server restarted with a longer context
    longer = run_on_stub(stub_server.url, "demo", face_set, cache, tmp_path / "b", *batch)
    assert longer["requests"]["sent"] == 2 and longer["requests"]["splits"] == 0  # whole, uncut
    assert value(longer, "acc") == 100.0 and cached_answers(cache) == 6
