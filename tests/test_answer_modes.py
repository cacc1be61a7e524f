"""The answer modes (ger/answers/modes.py), above all answer=likelihood, end to end.

The engines are real: the tiny random Qwen2-VL folder (real weights on disk) runs once under
transformers and once under the vLLM CPU engine (module-scope runs of `ger run`, ~20 s and ~60 s);
the server path runs against the loopback stub, scripted to return vLLM's `prompt_logprobs` or not.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from pathlib import Path

import pytest
from conftest import REPO, STUB_MODEL, require_vllm, rows, run_ger
from omegaconf import OmegaConf
from stub_server import sample_groups

from ger.answers.modes import MODES, answer_mode, backend_refusal
from ger.backends.base import backend_class, key_settings
from ger.backends.label_scores import LabelScores
from ger.errors import UserError

LABELS = ["anger", "disgust", "fear", "happy", "neutral", "sad", "surprise"]  # conf/dataset/demo.yaml
LIMIT = 4
TINY = ["model=tiny-random-qwen2vl", "progress=false", "dataset=demo", f"limit={LIMIT}", "answer=likelihood"]


# ------------------------------------------------------------------ the seam itself (no engine)


@pytest.mark.parametrize(
    ("given", "mode"),
    [
        ({}, "free"),
        ({"mode": "batch"}, "batch"),
        ({"structured_output": True}, "choice"),
        ({"answer": "likelihood"}, "likelihood"),
        ({"answer": "batch"}, "batch"),
        ({"answer": "choice", "structured_output": True}, "choice"),
        ({"answer": "batch", "mode": "batch"}, "batch"),
        ({"mode": "batch", "structured_output": True}, "batch"),  # as before: the flag is single-mode only
    ],
)
def test_answer_option_and_its_older_spellings(given, mode):
    cfg = OmegaConf.create({"answer": None, "mode": "single", "structured_output": False} | given)
    assert answer_mode(cfg).name == mode


@pytest.mark.parametrize(
    "given",
    [
        {"answer": "likelihood", "mode": "batch"},
        {"answer": "free", "structured_output": True},
        {"answer": "logits"},
        {"mode": "pairs"},
    ],
)
def test_contradicting_or_unknown_answer_settings_are_refused(given):
    cfg = OmegaConf.create({"answer": None, "mode": "single", "structured_output": False} | given)
    with pytest.raises(UserError, match="answer=|mode"):
        answer_mode(cfg)


def test_which_backends_can_rank_by_likelihood():
    likelihood = MODES["likelihood"]
    for name in ("vllm", "hf", "server"):
        assert backend_refusal(likelihood, name, backend_class(name)) is None
    for name in ("openai", "ray"):
        assert "cannot return label log-probabilities" in backend_refusal(
            likelihood, name, backend_class(name)
        )
    assert all(
        backend_refusal(MODES[m], "openai", backend_class("openai")) is None for m in ("free", "choice")
    )


@pytest.mark.parametrize(
    "logprobs",
    [
        {"a": -1.0, "b": -2.0, "c": -3.0},
        {"a": -1000.0, "b": -1001.5, "c": -2000.0},  # far below exp's range: shifted, not underflowing
        {"a": -5.0, "b": -5.0, "c": -5.0},
    ],
)
def test_probabilities_are_the_softmax_over_the_label_set(logprobs):
    probs = LabelScores(logprobs, dict.fromkeys(logprobs, 1)).probabilities(["c", "a", "b"])
    assert list(probs) == ["c", "a", "b"] and math.isclose(sum(probs.values()), 1.0, abs_tol=1e-12)
    top = max(logprobs.values())
    expected = {
        k: math.exp(v - top) / sum(math.exp(w - top) for w in logprobs.values()) for k, v in logprobs.items()
    }
    assert all(math.isclose(probs[k], expected[k], rel_tol=1e-12) for k in logprobs)


def test_openai_refuses_likelihood_before_reading_any_media(tmp_path, cache):
    proc = run_ger(
        ["run", *TINY, "backend=openai", f"hydra.run.dir={tmp_path / 'run'}"], cache, REPO, check=False
    )
    assert proc.returncode != 0
    assert "backend=openai cannot return label log-probabilities" in proc.stderr
    assert "OpenAI API returns no prompt log-probabilities" in proc.stderr
    assert not (tmp_path / "run" / "predictions.csv").exists()


# ------------------------------------------------------------------ server backend against the stub


def char_logprob(digest: str, char: str) -> float:
    """The stub's log-probability of one character token after a given image: fixed, not uniform."""
    return -0.05 - int(hashlib.sha256(f"{digest}:{char}".encode()).hexdigest()[:4], 16) / 8192


def stub_prompt_logprobs(body: dict) -> list:
    """vLLM's prompt_logprobs for a char-per-token model: a row per token, the label's last."""
    (digest,) = sample_groups(body)[0]
    label = body["messages"][-1]["content"]
    rows: list = [None, {"7": {"logprob": -0.5, "rank": 1, "decoded_token": "\n"}}]  # the turn start
    rows += [
        {str(ord(c)): {"logprob": char_logprob(digest, c), "rank": 3, "decoded_token": c}} for c in label
    ]
    return rows


def server_args(url: str, root: Path, out: Path) -> list[str]:
    return [
        "run",
        *TINY,
        f"model={STUB_MODEL}",
        "backend=server",
        f"backend.base_url={url}",
        "backend.max_retries=0",
        f"dataset.layout.root={root}",
        "dataset.demo=false",
        f"hydra.run.dir={out}",
    ]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    from ger.data.demo import ensure_demo

    return ensure_demo(tmp_path_factory.mktemp("demo")) / "demo"


def test_server_likelihood_sums_every_label_token_and_reruns_from_cache(
    stub_server, demo_root, cache, tmp_path
):
    stub_server.prompt_logprobs = stub_prompt_logprobs
    run_ger(server_args(stub_server.url, demo_root, tmp_path / "r1"), cache, REPO)
    bodies = list(stub_server.bodies)
    assert len(bodies) == LIMIT * len(LABELS)  # one request per (sample, label)
    for body in bodies:  # the label is the open-ended assistant turn; only prompt log-probs are asked
        assert body["messages"][-1]["role"] == "assistant" and body["messages"][-1]["content"] in LABELS
        assert body["prompt_logprobs"] == 0 and body["continue_final_message"] is True
        assert body["add_generation_prompt"] is False and body["max_tokens"] == 1
    expected = []  # per sample: the softmax of each label's summed per-character log-probabilities
    for digest in {sample_groups(b)[0][0] for b in bodies}:
        sums = {label: sum(char_logprob(digest, c) for c in label) for label in LABELS}
        expected.append(LabelScores(sums, {}).probabilities(LABELS))
    preds = rows(tmp_path / "r1")
    assert len(preds) == LIMIT and all(p["status"] == "ok" for p in preds)
    for p in preds:
        probs = json.loads(p["probs"])
        assert list(probs) == LABELS and math.isclose(sum(probs.values()), 1.0, abs_tol=1e-9)
        assert any(all(math.isclose(probs[k], e[k], abs_tol=1e-9) for k in LABELS) for e in expected)
        assert p["prediction"].split(",") == sorted(LABELS, key=lambda k: -probs[k])
    stub_server.bodies.clear()
    run_ger(server_args(stub_server.url, demo_root, tmp_path / "r2"), cache, REPO)
    assert stub_server.bodies == [] and rows(tmp_path / "r2") == preds
    meta = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert meta["answer"] == "likelihood" and meta["requests"]["sent"] == 0


def test_report_puts_a_likelihood_run_and_a_free_run_side_by_side(stub_server, demo_root, cache, tmp_path):
    """`ger report` over two runs of the same set that differ only in answer mode: one table, and the
    paired test counted from the two runs' predictions.csv."""
    stub_server.prompt_logprobs = stub_prompt_logprobs
    stub_server.model = lambda body: (json.dumps(LABELS), "stop")  # free text: the labels in list order
    lik, free = tmp_path / "runs" / "lik", tmp_path / "runs" / "free"
    run_ger(server_args(stub_server.url, demo_root, lik), cache, REPO)
    args = [a for a in server_args(stub_server.url, demo_root, free) if a != "answer=likelihood"]
    run_ger([*args, "answer=free"], cache, REPO)
    out = tmp_path / "report"
    run_ger(["report", str(tmp_path / "runs"), "--out", str(out), "--bootstrap", "0"], cache, REPO)
    (group,) = json.loads((out / "report.json").read_text())["modes"]
    assert [r["answer"] for r in group["runs"]] == ["free", "likelihood"]
    free_m, lik_m = (r["answer_metrics"] for r in group["runs"])
    assert (free_m["with_probs"], free_m["nll"], lik_m["with_probs"]) == (0, None, LIMIT)
    assert lik_m["nll"] is not None and lik_m["ece"] is not None and lik_m["auc_macro"] is not None
    right = {run: {p["name"]: p["top1"] == p["gt"] for p in rows(run)} for run in (free, lik)}
    assert any(right[free].values())  # the stub's fixed answer is right on the anger face
    (test,) = group["mcnemar"]
    assert (test["a"], test["b"], test["n"]) == ("free", "likelihood", LIMIT)
    assert test["only_a_right"] == sum(right[free][n] and not right[lik][n] for n in right[free])
    assert test["only_b_right"] == sum(right[lik][n] and not right[free][n] for n in right[free])
    markdown = (out / "report.md").read_text()
    assert "## Answer modes side by side" in markdown
    assert f"| likelihood | {LIMIT} |" in markdown and f"| {LIMIT}/{LIMIT} | {lik_m['nll']:.4f} |" in markdown
    assert f"| free | likelihood | {LIMIT} | {test['only_a_right']} | {test['only_b_right']} |" in markdown


@pytest.mark.parametrize("spelling", [["answer=batch"], ["answer=choice"]])
def test_new_and_older_spellings_ask_the_same_requests(spelling, stub_server, demo_root, cache, tmp_path):
    """answer=batch / answer=choice send exactly what mode=batch / structured_output=true send: the
    older spelling, run second on the same cache, finds every answer there."""
    args = [a for a in server_args(stub_server.url, demo_root, tmp_path / "run") if a != "answer=likelihood"]
    run_ger([*args, *spelling], cache, REPO)
    meta = json.loads((tmp_path / "run" / "metrics.json").read_text())
    batched = "batch" in spelling[0]
    assert meta["answer"] == ("batch" if batched else "choice")
    assert ("batching" in meta) == batched and (tmp_path / "run" / "order.csv").exists() == batched
    bodies = stub_server.bodies
    if batched:
        assert len(sample_groups(bodies[0])) == LIMIT  # one request holds every sample
    else:
        assert all(b["structured_outputs"] == {"choice": LABELS} for b in bodies) and len(bodies) == LIMIT
    keys = sorted(r["response_key"] for r in rows(tmp_path / "run"))
    twin = tmp_path / "twin"  # the other spelling, same cache: every answer is found there
    other = "mode=batch" if batched else "structured_output=true"
    run_ger([*[a.replace(str(tmp_path / "run"), str(twin)) for a in args], other], cache, REPO)
    assert json.loads((twin / "metrics.json").read_text())["requests"]["sent"] == 0
    assert sorted(r["response_key"] for r in rows(twin)) == keys


def test_server_without_prompt_logprobs_stops_after_the_first_sample(stub_server, demo_root, cache, tmp_path):
    stub_server.prompt_logprobs = None  # an OpenAI-compatible server that ignores prompt_logprobs
    proc = run_ger(server_args(stub_server.url, demo_root, tmp_path / "run"), cache, REPO, check=False)
    assert proc.returncode != 0 and "returned no prompt_logprobs" in proc.stderr
    assert len(stub_server.bodies) <= len(LABELS)  # the first sample's labels, not the whole set
    assert not (tmp_path / "run" / "predictions.csv").exists()


# ------------------------------------------------------------------ both engines on the tiny model


def engine_run(engine: str, ger_cache: Path, tmp: Path) -> Path:
    """`ger run answer=likelihood` on the demo data; returns the run folder (its cache beside it)."""
    cache = tmp / "cache"
    cache.mkdir()
    (ger_cache / "tiny-models").mkdir(parents=True, exist_ok=True)
    (cache / "tiny-models").symlink_to(ger_cache / "tiny-models")
    run_ger(["run", *TINY, f"backend={engine}", f"hydra.run.dir={tmp / 'run'}"], cache, REPO)
    return tmp / "run"


@pytest.fixture(scope="module")
def hf_run(ger_cache, tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    return engine_run("hf", ger_cache, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def vllm_run(ger_cache, tmp_path_factory) -> Path:
    require_vllm()
    return engine_run("vllm_cpu", ger_cache, tmp_path_factory.mktemp("vllm"))


def cached_scores(run: Path) -> dict[str, LabelScores]:
    """Each sample's likelihood answer as the response cache holds it (by the row's response_key)."""
    with sqlite3.connect(run.parent / "cache" / "responses.sqlite") as conn:
        texts = dict(conn.execute("SELECT key, text FROM answers").fetchall())
    return {r["name"]: LabelScores.from_text(texts[r["response_key"]]) for r in rows(run)}


@pytest.mark.parametrize("engine", ["hf_run", pytest.param("vllm_run", marks=pytest.mark.vllm)])
def test_likelihood_run_writes_probabilities_over_the_label_set(engine, request):
    run = request.getfixturevalue(engine)
    preds = rows(run)
    assert [p["name"] for p in preds] == [f"img_00{i}" for i in range(1, LIMIT + 1)]
    for p in preds:
        probs = json.loads(p["probs"])
        assert p["status"] == "ok" and list(probs) == LABELS
        assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-9)
        assert (
            p["prediction"].split(",") == sorted(LABELS, key=lambda k: -probs[k])
            and p["top1"] == p["prediction"].split(",")[0]
        )
    meta = json.loads((run / "metrics.json").read_text())
    assert meta["answer"] == "likelihood" and meta["n"] == LIMIT and meta["parse_failure_rate"] == 0
    assert {s["metric"] for s in meta["scores"]} == {"acc"}
    scores = cached_scores(run)
    assert all(s.tokens[label] > 0 for s in scores.values() for label in LABELS)


@pytest.mark.parametrize("engine", ["hf_run", pytest.param("vllm_run", marks=pytest.mark.vllm)])
def test_likelihood_run_reports_nll_ece_and_auc(engine, request):
    """metrics.json's answer_metrics and report.md, checked against predictions.csv's probs column."""
    run = request.getfixturevalue(engine)
    preds = rows(run)
    metrics = json.loads((run / "metrics.json").read_text())["answer_metrics"]
    assert metrics["n"] == metrics["with_probs"] == LIMIT and metrics["without_probs"] == 0
    p_true = [json.loads(p["probs"])[p["gt"]] for p in preds]  # demo: one class per label
    assert metrics["nll"] == pytest.approx(-sum(math.log(p) for p in p_true) / LIMIT, abs=1e-4)
    assert metrics["top1"] == pytest.approx(100 * sum(p["top1"] == p["gt"] for p in preds) / LIMIT, abs=0.01)
    top2 = sum(p["gt"] in p["prediction"].split(",")[:2] for p in preds)
    assert metrics["top2"] == pytest.approx(100 * top2 / LIMIT, abs=0.01)
    assert 0 <= metrics["ece"] <= 100 and 0 <= metrics["auc_macro"] <= 100
    assert {c for c, v in metrics["auc"].items() if v is not None} == {p["gt"] for p in preds}
    report = (run / "report.md").read_text()
    assert f"label probabilities for {LIMIT} of {LIMIT} samples" in report
    assert f"NLL {metrics['nll']:.4f} nats, ECE {metrics['ece']:.2f}%" in report
    assert f"one-vs-rest AUC macro {metrics['auc_macro']:.2f}%" in report


@pytest.mark.parametrize("engine", ["hf_run", pytest.param("vllm_run", marks=pytest.mark.vllm)])
def test_the_cache_says_what_produced_each_answer(engine, request):
    """Beside each answer the cache stores the key's parts outside the prompt: the backend's part is
    what its settings class declares answer-changing (key_settings), with the model and the mode."""
    run = request.getfixturevalue(engine)
    cfg = OmegaConf.load(run / "config.yaml")
    with sqlite3.connect(run.parent / "cache" / "responses.sqlite") as conn:
        stored = dict(conn.execute("SELECT key, identity FROM answers").fetchall())
    for p in rows(run):
        ident = json.loads(stored[p["response_key"]])
        assert ident["backend"] == key_settings(cfg.backend.name, cfg.backend)
        assert ident["model"]["path"].startswith("tiny:qwen2_vl-") and ident["answer"] == "likelihood"


@pytest.mark.vllm
def test_vllm_and_transformers_give_the_same_log_probabilities(hf_run, vllm_run):
    """Same weights, same prompt, same pixels; both in float32 on CPU, so only kernel rounding differs
    (measured ~1e-6); 1e-2 leaves room for other CPUs' kernels while a wrong token, position or
    image would move a label's log-probability by whole units."""
    hf, vl = cached_scores(hf_run), cached_scores(vllm_run)
    for name in hf:
        assert hf[name].tokens == vl[name].tokens
        for label in LABELS:
            assert abs(hf[name].logprobs[label] - vl[name].logprobs[label]) < 1e-2, (name, label)
    assert [p["prediction"] for p in rows(hf_run)] == [p["prediction"] for p in rows(vllm_run)]


@pytest.mark.vllm
def test_vllm_encodes_each_prompt_once_through_the_prefix_cache(vllm_run):
    for scores in cached_scores(vllm_run).values():
        later = [scores.prefix_cached[label] for label in LABELS[1:]]  # sent after the sample's first label
        assert all(n > 0 for n in later), scores.prefix_cached


def test_rerun_is_answered_from_the_cache(hf_run):
    cache = hf_run.parent / "cache"
    again = hf_run.parent / "again"
    run_ger(["run", *TINY, "backend=hf", f"hydra.run.dir={again}"], cache, REPO)
    assert json.loads((again / "metrics.json").read_text())["requests"]["sent"] == 0
    assert rows(again) == rows(hf_run)


def test_multi_token_labels_are_scored_over_all_their_tokens(hf_run, ger_cache):
    """An independent computation: one unbatched, unpadded forward of prompt + label per label with
    plain transformers, the full logits, and a sum over every label token."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ger.prompting.templates import load_template, render
    from ger.testing.tiny_models import ensure_tiny_model

    path = ensure_tiny_model("qwen2_vl", ger_cache)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    text = render(load_template("facial").constrained, {"labels": ", ".join(LABELS)})
    chat = [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image"}]}]
    prompt = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    demo = next((hf_run.parent / "cache" / "demo" / "demo" / "images").glob("img_001.*"))
    image = Image.open(demo).convert("RGB")
    got = cached_scores(hf_run)["img_001"]
    multi = 0
    for label in LABELS:
        label_ids = processor.tokenizer(label, add_special_tokens=False)["input_ids"]
        inputs = processor(text=[prompt + label], images=[image], return_tensors="pt")
        ids = inputs["input_ids"][0]
        assert ids[-len(label_ids) :].tolist() == label_ids
        with torch.inference_mode():
            logp = torch.log_softmax(model(**inputs).logits[0].float(), dim=-1)
        n = len(label_ids)
        per_token = [float(logp[len(ids) - n - 1 + j, label_ids[j]]) for j in range(n)]
        assert got.tokens[label] == n
        assert abs(got.logprobs[label] - sum(per_token)) < 1e-3, (label, per_token)
        if n > 1:
            multi += 1
            assert abs(got.logprobs[label] - per_token[0]) > 1e-3  # the later tokens count too
    assert multi >= 3, "the demo labels should include multi-token labels for the tiny tokenizer"
