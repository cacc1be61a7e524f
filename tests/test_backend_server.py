"""The `server` and `openai` backends against a real vLLM server (CPU build, tiny random Qwen2-VL).

One server per module, started through launch/serve.py on a free loopback port.
The tiny model answers gibberish, so the tests check what the plumbing promises:
every request gets a Response, choices are enforced, failures are Response.error,
and no key reaches a file.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import cached_answers, require_vllm, rows, run_ger
from PIL import Image

from ger.backends.base import key_settings
from ger.backends.keys import find_secret
from ger.backends.openai_api import OpenAIBackend
from ger.backends.server import ModelNotFoundError, ServerBackend
from ger.records import Request

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
]


@pytest.fixture(autouse=True, scope="module")
def _needs_vllm() -> None:
    require_vllm()


ROOT = Path(__file__).resolve().parent.parent
SERVED = "tiny_qwen2_vl"
MODEL_YAML = f"""name: {SERVED}
path: null
tiny: qwen2_vl
max_images: 4
max_videos: 1
max_model_len: 2048
dtype: float32
"""
PLANTED = "sk-test-PLANTED-" + "7f3a9c2e5b1d4f6a8c0e2b4d6f8a1c3e"
LABELS = ["Happiness", "Sadness", "Anger", "Neutral"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's process: SIGTERM when the test process dies, on which launch/serve.py stops
    vLLM and vLLM its engine. A crashed pytest otherwise leaves servers holding ~4 GiB each."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class VLLMServer:
    """A `vllm serve` process started via launch/serve.py; can be killed and started again."""

    def __init__(self, model_yaml: Path, log_path: Path) -> None:
        self.model_yaml, self.log_path = model_yaml, log_path
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 300.0) -> float:
        cmd = [sys.executable, str(ROOT / "launch/serve.py"), str(self.model_yaml), "--cpu"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--", "--max-num-seqs", "4"]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        start = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited early:\n{self.log_path.read_text()[-3000:]}")
            if self.healthy():
                return time.monotonic() - start
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"vLLM not healthy after {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the launcher and the server (one process group): a crash, not a shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("vllm")
    (folder / "model.yaml").write_text(MODEL_YAML)
    srv = VLLMServer(folder / "model.yaml", folder / "server.log")
    seconds = srv.start()
    print(f"vLLM healthy after {seconds:.1f} s")
    yield srv
    srv.kill()


def image(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.new("RGB", size, color)


def ask(key: str, *parts: dict, choices: list[str] | None = None, max_tokens: int = 8) -> Request:
    content = [*parts, {"type": "text", "text": "Which emotion is shown? Answer with one word."}]
    return Request(
        key=key,
        names=(key,),
        messages=[{"role": "user", "content": content}],
        choices=choices,
        max_tokens=max_tokens,
    )


def img(color: tuple[int, int, int]) -> dict:
    return {"type": "image", "image": image(color)}


def server_cfg(srv: VLLMServer, **over) -> dict:
    return {"base_url": srv.base_url, "model": SERVED, "max_retries": 1, "retry_initial": 0.05, **over}


def test_answers_images_video_and_choices(server: VLLMServer) -> None:
    frames = [image((10 * i, 80, 120)) for i in range(4)]
    requests = [
        ask("one", img((200, 30, 30))),
        ask("several", img((200, 30, 30)), img((30, 200, 30)), img((30, 30, 200))),
        ask("frames", {"type": "video", "frames": frames, "fps": 2.0, "total_frames": 40}),
        ask("choice", img((90, 90, 90)), choices=LABELS),
    ]
    for video_as in ("images", "video"):
        # min_tokens: a random-weight model may pick end-of-text first; the test is about the transport
        extra = {"min_tokens": 1}
        backend = ServerBackend(server_cfg(server, video_as=video_as, video_metadata=True, extra_body=extra))
        got = {r.key: r for r in backend.generate(requests)}
        assert set(got) == {r.key for r in requests}
        assert all(r.error is None and r.text for r in got.values()), got
        assert got["choice"].text in LABELS  # exactly one of the labels, nothing around it
        assert backend.usage["requests"] == len(requests)


def test_openai_adapter_on_local_server_leaks_no_key(server, tmp_path, monkeypatch) -> None:
    from omegaconf import OmegaConf

    from ger.run.cache import ResponseCache

    monkeypatch.setenv("OPENAI_API_KEY", PLANTED)
    monkeypatch.delenv("OPENAI_API_KEYS", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    run = tmp_path / "run"
    run.mkdir()
    handler = logging.FileHandler(run / "run.log")  # DEBUG: the SDK and HTTP client log requests
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        cfg = OmegaConf.load(ROOT / "conf/backend/openai.yaml")
        cfg.model = SERVED
        prices = {"input": 1.0, "output": 1.0}
        cfg.pricing = {
            "models": {SERVED: prices, "no-such-model": prices},
            "default_image": {"kind": "fixed", "tokens": 100},
        }
        backend = OpenAIBackend(cfg)
        requests = [ask("a", img((200, 30, 30))), ask("b", img((30, 200, 30)), img((9, 9, 9)))]
        answers = list(backend.generate(requests))
        assert all(r.ok for r in answers), answers
        assert backend.last_estimate is not None and backend.last_estimate.images == 3
        wrong = OpenAIBackend({**OmegaConf.to_container(cfg, resolve=True), "model": "no-such-model"})
        with pytest.raises(ModelNotFoundError, match="404") as err:  # the run stops: no error rows
            list(wrong.generate([ask("c", img((1, 2, 3)))]))
        with ResponseCache(run / "cache.sqlite") as cache:
            for response in answers:
                cache.put(response, key_settings("openai", cfg))  # the backend part of every key
        (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        (run / "errors.txt").write_text(str(err.value))
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
    assert (run / "run.log").stat().st_size > 0
    assert find_secret(run, PLANTED) == [], "the planted key reached a file"


def test_unknown_model_404_stops_with_the_served_models(server: VLLMServer) -> None:
    """vLLM answers 404 for a model it does not serve: one error naming both, no Response per request."""
    backend = ServerBackend(server_cfg(server, model="no-such-model", concurrency=2))
    with pytest.raises(ModelNotFoundError) as err:
        list(backend.generate([ask(f"n{i}", img((i, 9, 9))) for i in range(4)]))
    message = str(err.value)
    assert f"{server.base_url} answered 404 Not Found for model 'no-such-model'" in message
    assert f"it serves: {SERVED}" in message and "Set backend.model" in message
    assert backend.usage["requests"] == 0


def test_killed_server_gives_errors_then_resumes(server: VLLMServer) -> None:
    """Kill the server mid-run: the rest come back as Response.error; a rerun after restart completes."""
    backend = ServerBackend(server_cfg(server, concurrency=1, timeout=20, max_retries=1))
    requests = [ask(f"r{i}", img((i * 30, 50, 50)), max_tokens=32) for i in range(6)]
    responses = []
    for response in backend.generate(requests):  # concurrency 1: the others wait their turn
        responses.append(response)
        if len(responses) == 1:
            server.kill()
    assert len(responses) == len(requests)
    failed = [r for r in responses if r.error]
    assert responses[0].ok and len(failed) >= 4, responses
    assert all("Connection" in r.error or "Timeout" in r.error for r in failed), [r.error for r in failed]

    print(f"vLLM restarted in {server.start():.1f} s")
    retry = {r.key for r in failed}
    again = list(backend.generate([r for r in requests if r.key in retry]))
    assert {r.key for r in again} == retry and all(r.ok for r in again), again


# ---- `ger run` through the live server: the pipeline, not just the backend ----

RUN = ["dataset=demo", "model=tiny-random-qwen2vl", "sampling.max_tokens=8", "progress=false"]
PRICING = (
    "backend.pricing={models:{" + SERVED + ":{input:1.0,output:1.0}},default_image:{kind:fixed,tokens:100}}"
)


def test_ger_run_through_server_and_openai_adapter_scores_and_leaks_no_key(server, tmp_path) -> None:
    cache = tmp_path / "cache"
    srv = ["backend=server", f"backend.base_url={server.base_url}", f"backend.model={SERVED}"]
    run_ger(["run", *RUN, "limit=4", *srv, f"hydra.run.dir={tmp_path / 'server'}"], cache, tmp_path)
    meta = json.loads((tmp_path / "server" / "metrics.json").read_text())
    assert meta["n"] == 4 and meta["backend"] == "server" and meta["requests"]["sent"] == 4

    env = {"OPENAI_API_KEY": PLANTED, "OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEYS": ""}
    oai = ["backend=openai", f"backend.model={SERVED}", PRICING]
    run_ger(["run", *RUN, "limit=4", *oai, f"hydra.run.dir={tmp_path / 'openai'}"], cache, tmp_path, env=env)
    meta = json.loads((tmp_path / "openai" / "metrics.json").read_text())
    assert meta["n"] == 4 and meta["backend"] == "openai" and meta["requests"]["failed"] == 0
    assert find_secret(tmp_path, PLANTED) == [], "the planted key reached a file a run wrote"


def test_ger_run_stops_on_a_model_the_server_does_not_serve(server, tmp_path) -> None:
    """`ger run` asking vLLM for a model it does not serve: exit 2, one message, no run of error rows."""
    args = ["run", *RUN, "limit=4", "backend=server", f"backend.base_url={server.base_url}"]
    args += ["backend.model=no-such-model", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_ger(args, tmp_path / "cache", tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("ger run:")]
    assert "404 Not Found for model 'no-such-model'" in line and f"it serves: {SERVED}" in line
    assert not (tmp_path / "run" / "predictions.csv").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_ger_run_resumes_after_the_server_dies(server, tmp_path) -> None:
    """Kill the server mid-run: the run ends with error rows; after a restart a rerun completes them."""

    cache = tmp_path / "cache"
    args = [
        "run",
        *RUN,
        "sampling.max_tokens=48",
        "backend=server",
        f"backend.base_url={server.base_url}",
        f"backend.model={SERVED}",
        "backend.concurrency=1",
        "backend.max_retries=1",
        "backend.timeout=20",
    ]
    env = {**os.environ, "GER_CACHE_DIR": str(cache)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ger.cli", *args, f"hydra.run.dir={tmp_path / 'first'}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    answered = 0
    while answered < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        answered = cached_answers(cache)
    server.kill()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    first = rows(tmp_path / "first")
    errors = [r["name"] for r in first if r["status"] == "error"]
    assert len(first) == 14 and len(errors) >= 1, first

    server.start()
    run_ger([*args, f"hydra.run.dir={tmp_path / 'second'}"], cache, tmp_path)
    second = rows(tmp_path / "second")
    assert sorted(r["name"] for r in second) == sorted(r["name"] for r in first)  # every sample exactly once
    assert all(r["status"] != "error" for r in second)
    meta = json.loads((tmp_path / "second" / "metrics.json").read_text())["requests"]
    assert meta["sent"] == len(errors) and meta["cached"] == 14 - len(errors)


def test_likelihood_through_vllm_serve_matches_transformers(server: VLLMServer) -> None:
    """answer=likelihood against a real `vllm serve`: its prompt log-probabilities give every label the
    same summed log-probability (and token count) as transformers computes on the same model folder,
    image (sent as its PNG file, so both see the same pixels) and prompt."""
    import io

    import yaml
    from omegaconf import OmegaConf

    from ger.backends import create_backend
    from ger.backends.label_scores import LabelScores

    picture = image((180, 60, 40))
    png = io.BytesIO()
    picture.save(png, format="PNG")
    part = {"type": "image", "image": picture, "source": ("image/png", png.getvalue())}
    request = ask("likelihood", part, max_tokens=1)
    request.candidates = LABELS

    backend = ServerBackend(server_cfg(server))
    try:
        (served,) = list(backend.label_logprobs([request]))
    finally:
        backend.close()
    hf_cfg = OmegaConf.load(ROOT / "conf" / "backend" / "hf.yaml")
    hf_cfg.device = "cpu"
    hf = create_backend("hf", hf_cfg, yaml.safe_load(MODEL_YAML))
    try:
        (local,) = list(hf.label_logprobs([request]))
    finally:
        hf.close()
    assert served.error is None and local.error is None, (served.error, local.error)
    got, want = LabelScores.from_text(served.text), LabelScores.from_text(local.text)
    assert got.tokens == want.tokens and max(want.tokens.values()) > 1  # multi-token labels summed whole
    for label in LABELS:  # float32 on CPU both; a wrong token, position or image moves it by whole units
        assert abs(got.logprobs[label] - want.logprobs[label]) < 1e-2, (label, got.logprobs, want.logprobs)
