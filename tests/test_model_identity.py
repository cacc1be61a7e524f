"""The model's snapshot digest in the cache key: a changed checkpoint never reuses old answers."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import run_ger

pytest.importorskip("torch")
pytest.importorskip("transformers")

from ger.backends import model_identity  # noqa: E402
from ger.backends.model_identity import find_snapshot, folder_digest, snapshot_identity  # noqa: E402
from ger.backends.models import resolve_model  # noqa: E402
from ger.testing.tiny_models import ensure_tiny_model  # noqa: E402

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


@pytest.fixture
def folder(ger_cache: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny Qwen2-VL folder, free to change."""
    copy = tmp_path / "model"
    shutil.copytree(ensure_tiny_model("qwen2_vl", ger_cache), copy)
    return copy


def _perturb_one_weight(folder: Path) -> None:
    """Change one number of one tensor: the file keeps its name and size, only its bytes differ."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, path, metadata={"format": "pt"})


def _fake_hub_cache(root: Path, repo: str, commits: dict[str, dict[str, str]], main: str) -> Path:
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/files}."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    for commit, files in commits.items():
        snap = repo_dir / "snapshots" / commit
        snap.mkdir(parents=True)
        for name, text in files.items():
            (snap / name).write_text(text)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(main)
    return root


def test_digest_is_stable_and_sees_weights_tokenizer_and_template(folder):
    before = folder_digest(folder)
    assert folder_digest(folder) == before
    assert folder_digest(folder.parent / "model") == before  # same folder, other spelling

    _perturb_one_weight(folder)
    after_weight = folder_digest(folder)
    assert after_weight != before

    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg["model_max_length"] = 1234
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    after_tok = folder_digest(folder)
    assert after_tok not in (before, after_weight)

    (folder / "chat_template.jinja").write_text("{{ messages }}")
    assert folder_digest(folder) not in (before, after_weight, after_tok)


def test_large_weights_are_keyed_by_name_and_size_not_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(model_identity, "WEIGHT_BYTES_HASHED", 10)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(b"x" * 100)
    before = folder_digest(tmp_path)
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(b"y" * 100)  # same size: not read
    assert folder_digest(tmp_path) == before
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(b"y" * 101)  # size changed
    assert folder_digest(tmp_path) != before
    (tmp_path / "config.json").write_text('{"a": 1}')  # small files always hashed whole
    assert folder_digest(tmp_path) != before


def test_hub_id_resolves_in_local_cache_and_honours_revision(tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub = _fake_hub_cache(
        tmp_path / "hub",
        "org/model",
        {COMMIT_A: {"config.json": '{"v": 1}'}, COMMIT_B: {"config.json": '{"v": 2}'}},
        main=COMMIT_A,
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    assert find_snapshot("org/model", None).name == COMMIT_A  # refs/main
    assert find_snapshot("org/model", COMMIT_B).name == COMMIT_B  # the pin
    main = snapshot_identity("org/model", None)["snapshot"]
    pinned = snapshot_identity("org/model", COMMIT_B)["snapshot"]
    assert main and pinned and main != pinned
    spec = resolve_model({"name": "m", "path": "org/model", "revision": COMMIT_B})
    assert spec.identity()["snapshot"] == pinned and spec.identity()["revision"] == COMMIT_B


def test_hub_model_not_on_disk_keys_on_revision_with_a_warning(tmp_path, monkeypatch, caplog):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with caplog.at_level(logging.WARNING, logger="ger.backends.model_identity"):
        ident = resolve_model({"name": "m", "path": "org/absent", "revision": "v1"}).identity()
    assert ident["snapshot"] is None and ident["revision"] == "v1"
    assert "not on disk" in caplog.text and "org/absent" in caplog.text


def test_tiny_model_identity_holds_its_folder_digest(ger_cache):
    spec = resolve_model({"name": "t", "tiny": "qwen2_vl"}, cache_dir=ger_cache)
    assert spec.identity()["snapshot"] == folder_digest(Path(spec.path))


def test_changed_model_folder_invalidates_cached_answers(ger_cache, folder, tmp_path):
    """`ger run` with a local model folder: unchanged hits the cache, one perturbed weight sends again."""
    cache = tmp_path / "cache"  # its own response cache; the tiny-model builds are not needed here
    args = [
        "run",
        "dataset=demo",
        "limit=2",
        "model=tiny-random-qwen2vl",
        "model.tiny=null",
        f"model.path={folder}",
        "backend=hf",
        "sampling.max_tokens=4",
        "progress=false",
    ]

    def sent_and_cached(run: str) -> tuple[int, int]:
        run_ger([*args, f"hydra.run.dir={tmp_path / run}"], cache, tmp_path)
        requests = json.loads((tmp_path / run / "metrics.json").read_text())["requests"]
        return requests["sent"], requests["cached"]

    first = sent_and_cached("r1")
    assert first[0] > 0 and first[1] == 0
    assert sent_and_cached("r2") == (0, first[0])  # unchanged folder: every answer from the cache
    _perturb_one_weight(folder)
    assert sent_and_cached("r3") == first  # changed weights: every request sent again
