"""Batch mode's parts on real inputs: the shuffle against the release's class-sorted label lists,
prompts built from every dataset's template with the release's own file names (RAVDESS names
carry the emotion code), the batch-size cap from the models' media limits, the answer budget,
and the finish reason kept in the response cache."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path

import pytest
from conftest import REPO
from omegaconf import OmegaConf
from PIL import Image

from ger.answers.modes import answer_mode
from ger.backends.models import resolve_model
from ger.config import load_group_yaml
from ger.data.datasets import all_specs, load_spec
from ger.prompting.batching import batch_order, plan_batches, read_order, shuffled, write_order
from ger.prompting.prompts import build_request
from ger.prompting.templates import PromptTemplate, load_template
from ger.records import LoadedSample, Response, Sample
from ger.run.cache import ResponseCache
from ger.run.pipeline import paper_batch_size

KEY_PARTS = {"model": "m", "sampling": {"temperature": 0.0}}


def release_rows(folder: Path) -> list[tuple[str, str]]:
    """(name, gt) of a release folder's label list (twitter1 has one per agreement level)."""
    files = sorted(
        folder.glob("label*.csv"), key=lambda p: (p.name != "label.csv", "gpt4v" in p.name, p.name)
    )
    with files[0].open(newline="", encoding="utf-8") as f:
        return [(r["name"], r["gt"]) for r in csv.DictReader(f)]


def single_class_share(gts: list[str], size: int) -> float:
    batches = [gts[i : i + size] for i in range(0, len(gts), size)]
    return sum(len(set(b)) == 1 for b in batches) / len(batches)


def chance_single_class(gts: list[str], size: int) -> float:
    """P(a batch of `size` drawn at random holds one class) = sum over classes of p^size."""
    return sum((gts.count(c) / len(gts)) ** size for c in set(gts))


@pytest.mark.parametrize("key", ["ravdess", "artphoto", "ferv39k", "sfew2"])
def test_shuffled_batches_are_class_mixed_on_the_release_label_lists(reference_dir, key):
    rows = release_rows(reference_dir / key)
    size = load_spec(key).batch_size
    gt = dict(rows)
    in_file_order = single_class_share([g for _, g in rows], size)
    order = shuffled([n for n, _ in rows], seed=0)
    mixed = single_class_share([gt[n] for n in order], size)
    assert in_file_order > 0.8  # the problem: label lists are sorted by class
    assert mixed <= chance_single_class([g for _, g in rows], size) + 0.02, (key, mixed)


def test_the_order_depends_on_seed_and_names_only(tmp_path):
    names = [f"s{i:03d}" for i in range(50)]
    order = shuffled(names, 0)
    assert sorted(order) == names and order != names
    assert shuffled(names[::-1], 0) == order  # not on the label file's row order
    assert shuffled(names, 1) != order
    assert [n for n in shuffled([*names, "new"], 0) if n != "new"] == order  # a new sample moves nobody
    batches = [tuple(order[i : i + 8]) for i in range(0, 50, 8)]
    write_order(tmp_path / "order.csv", order, batches)
    assert read_order(tmp_path / "order.csv", names) == order
    lines = (tmp_path / "order.csv").read_text().splitlines()
    assert lines[:2] == ["position,batch,name", f"0,0,{order[0]}"] and lines[-1] == f"49,6,{order[49]}"
    write_order(tmp_path / "order.csv", order, batches[1:])  # the first 8 in no batch: still listed, in place
    assert read_order(tmp_path / "order.csv", names) == order
    assert (tmp_path / "order.csv").read_text().splitlines()[1] == f"0,,{order[0]}"
    assert batch_order(names, 5, str(tmp_path / "order.csv")) == order  # a stored order wins over the seed
    with pytest.raises(ValueError, match=r"does not list 1 sample.*batch_order=null"):
        read_order(tmp_path / "order.csv", [*names, "extra"])


def _loaded(name: str, frames: int, text: str = "") -> LoadedSample:
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(frames)]
    indices = list(range(0, 3 * frames, 3)) if frames > 1 else []
    return LoadedSample(Sample("x", name, "g"), images, indices, 25.0, 30, text or None)


def _text(request) -> str:
    return "\n".join(p["text"] for p in request.messages[0]["content"] if p["type"] == "text")


@pytest.mark.parametrize("spec", all_specs(), ids=lambda s: s.key)
def test_no_request_carries_a_sample_name(reference_dir, spec):
    """Every dataset's template, in single and batch mode, with the release's own names."""
    rows = release_rows(reference_dir / (spec.reference.folder if spec.reference else spec.key))
    names = [n for n, _ in rows[:: max(1, len(rows) // spec.batch_size)]][: spec.batch_size]
    stems = {n.rsplit(".", 1)[0] for n in names}
    visual = spec.modality != "image"
    modalities = ["multi", "text"] if spec.modality == "video+text" else ["visual"]
    for modality in modalities:
        template = load_template(spec.prompt if modality != "text" else "text")
        samples = [_loaded(n, 3 if visual else 1, f"what speaker {i} said") for i, n in enumerate(names)]
        renamed = [
            _loaded(f"other-{i}", 3 if visual else 1, f"what speaker {i} said") for i in range(len(names))
        ]
        for mode, batch, twin in (("single", samples[:1], renamed[:1]), ("batch", samples, renamed)):
            text, other = (
                _text(build_request(
                    b, template, spec.labels, mode=mode, frames_as="images", key_parts=KEY_PARTS,
                    max_tokens=64, modality=modality,
                ))
                for b in (batch, twin)
            )  # fmt: skip
            assert text == other  # the prompt does not depend on the names at all
            leaked = [s for s in stems if not s.isdigit() and s in text]  # numbers: "1 image", "Sample 3"
            assert not leaked, (spec.key, mode, leaked)
            if mode == "batch":
                ids = [template.id.format(index=i) for i in range(1, len(batch) + 1)]
                assert all(x in text for x in ids), ids  # positional ids stand where names would


@pytest.mark.parametrize(
    "part", [{"item": "{name}:"}, {"batch": "{count} faces: {names}"}, {"single": "Rank {labels} for {name}"}]
)
def test_templates_that_would_show_names_are_refused(part):
    parts = {"single": "Rank {labels}", "batch": "Rank {labels} for {count}: {ids}", "item": "{id}:", **part}
    with pytest.raises(ValueError, match=r"file names .*\{id\} or \{index\}"):
        PromptTemplate(name="t", **parts)


def test_a_sample_id_must_hold_its_position():
    with pytest.raises(ValueError, match=r"'id' must contain \{index\}"):
        PromptTemplate(name="t", single="Rank {labels}", batch="Rank {labels}", id="Sample")


@pytest.mark.parametrize(
    ("model", "frames_as", "expected"),
    [
        ("qwen2_5_vl_7b", "images", 6),  # 20 images / 3 frames: the paper's 8 clips do not fit
        ("internvl3_8b", "images", 2),
        ("llava_onevision_7b", "images", 1),
        ("internvl3_8b", "grid", 8),  # one mosaic per clip
        ("qwen2_5_vl_7b", "video", 1),  # max_videos=1
    ],
)
def test_media_limits_cap_video_batches_and_say_so(model, frames_as, expected):
    spec = resolve_model(load_group_yaml("model", model))
    plan = plan_batches(8, None, spec, [_loaded(f"c{i}", 3) for i in range(8)], frames_as)
    assert plan.size == expected and plan.paper_size == 8
    assert (plan.cap != "") == (expected < 8) and (model in plan.cap or not plan.cap)


def test_images_and_text_keep_the_paper_sizes():
    qwen = resolve_model(load_group_yaml("model", "qwen2_5_vl_7b"))
    assert plan_batches(20, None, qwen, [_loaded("a", 1)], "images").size == 20
    assert plan_batches(20, None, qwen, [_loaded("a", 0, "hi")], "images").size == 20  # text only
    llava = resolve_model(load_group_yaml("model", "llava_onevision_7b"))
    assert plan_batches(20, None, llava, [_loaded("a", 1)], "images").size == 4


def test_multimodal_ablations_use_the_papers_sizes():
    cfg = OmegaConf.load(REPO / "conf" / "config.yaml")
    mer = load_spec("mer2023")
    assert [paper_batch_size(cfg, mer, m) for m in ("multi", "text", "visual")] == [6, 20, 8]
    assert paper_batch_size(cfg, load_spec("ravdess"), "visual") == 8


def test_the_answer_budget_grows_with_the_batch():
    cfg = OmegaConf.create({"mode": "batch", "sampling": {"max_tokens": 256, "max_tokens_per_record": 60}})
    assert [answer_mode(cfg).max_tokens(cfg.sampling, n) for n in (1, 4, 20)] == [256, 256, 1200]
    cfg.mode = "single"
    assert answer_mode(cfg).max_tokens(cfg.sampling, 1) == 256


def test_the_cache_keeps_the_finish_reason_and_upgrades_old_files(tmp_path):
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as conn:  # a cache written before answers kept their finish reason
        conn.execute(
            "CREATE TABLE answers (key TEXT PRIMARY KEY, text TEXT NOT NULL, seconds REAL NOT NULL, "
            "identity TEXT NOT NULL, created REAL NOT NULL)"
        )
        conn.execute("INSERT INTO answers VALUES ('old', '[\"sad\"]', 1.0, '{}', 0)")
    with ResponseCache(db) as cache:
        assert cache.get("old") == Response("old", '["sad"]', cached=True, seconds=1.0)
        cache.put(Response("cut", '[{"name": "Sample 1", "result": ["sa', finish_reason="length"))
        cache.put(Response("done", '["sad"]', finish_reason="stop"))
        got = cache.get_many(["cut", "done", "old"])
    assert {k: r.finish_reason for k, r in got.items()} == {"cut": "length", "done": "stop", "old": None}
