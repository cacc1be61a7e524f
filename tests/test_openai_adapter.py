"""The OpenAI adapter without OpenAI: cost estimates, the budget guard, key rotation and scrubbing.

Rate limits are real HTTP: a small server on 127.0.0.1 answers like the chat
completions API and returns 429 for one key.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from ger.backends.base import key_settings
from ger.backends.cost import (
    OverBudgetError,
    UnknownModelError,
    _encoder,
    check_budget,
    check_model,
    estimate_cost,
    image_tokens,
    load_pricing,
    valid_models,
)
from ger.backends.keys import KeyPool, find_secret, scrub
from ger.backends.openai_api import OpenAIBackend
from ger.backends.server import ModelNotFoundError
from ger.records import Request

LIMITED = "sk-test-LIMITED-" + "a" * 24
GOOD = "sk-test-GOOD-" + "b" * 24
PRICING = {
    "models": {
        "gpt-4o": {"input": 2.5, "output": 10.0, "image": {"kind": "tiles", "base": 85, "per_tile": 170}}
    },
}


def assert_no_secret(folder: str | Path, secret: str) -> None:
    """Fail if `secret` (or a 12-character piece of it) is in any file under `folder`."""
    hits = find_secret(folder, secret)
    assert not hits, f"secret found in {hits}"


# -- cost ------------------------------------------------------------------------------------------

TILES = {"kind": "tiles", "base": 85, "per_tile": 170, "tile_size": 512, "max_side": 2048, "short_side": 768}
MINI_TILES = {**TILES, "base": 2833, "per_tile": 5667}
PATCHES_162 = {"kind": "patches", "patch_size": 32, "max_patches": 1536, "multiplier": 1.62}


@pytest.mark.parametrize(
    ("size", "rule", "detail", "tokens"),
    [
        ((1024, 1024), TILES, "high", 765),  # 768x768 -> 4 tiles: 85 + 4*170 (OpenAI's worked example)
        ((2048, 4096), TILES, "high", 1105),  # 1024x2048 -> 768x1536 -> 2x3 tiles
        ((4096, 8192), TILES, "low", 85),
        ((512, 512), TILES, "auto", 255),  # auto counted as high; no upscaling to 768
        ((1024, 1024), MINI_TILES, "high", 2833 + 4 * 5667),
        ((1024, 1024), PATCHES_162, "high", 1659),  # 32x32 patches = 1024, x1.62 rounded up
        ((1800, 2400), PATCHES_162, "high", 2353),  # capped: 33x44 = 1452 patches, x1.62
    ],
)
def test_image_tokens(size, rule, detail, tokens) -> None:
    assert image_tokens(*size, rule, detail) == tokens


def chat(key: str, images: int = 1, text: str = "abcd" * 10, max_tokens: int = 100) -> Request:
    parts = [{"type": "image", "image": Image.new("RGB", (512, 512))} for _ in range(images)]
    return Request(
        key=key,
        names=(key,),
        messages=[{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
        max_tokens=max_tokens,
    )


def test_estimate_cost_by_hand(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # the chars/4 rule, whatever is installed
    _encoder.cache_clear()
    est = estimate_cost([chat("a"), chat("b", images=2)], "gpt-4o-2024-08-06", PRICING)
    # text: 40 chars -> 10 tokens + 3 (reply priming) + 4 (one message) = 17 per request
    assert (est.text_tokens, est.image_tokens, est.images, est.output_tokens) == (34, 3 * 255, 3, 200)
    assert est.usd == pytest.approx(((34 + 765) * 2.5 + 200 * 10.0) / 1e6)


def test_budget_guard() -> None:
    est = estimate_cost([chat(str(i)) for i in range(1000)], "gpt-4o", PRICING)
    check_budget(est, max_cost=10.0)
    with pytest.raises(OverBudgetError, match="allow_over_budget"):
        check_budget(est, max_cost=est.usd / 2)
    check_budget(est, max_cost=est.usd / 2, allow_over_budget=True)


def test_pricing_file_covers_the_default_model() -> None:
    from omegaconf import OmegaConf

    pricing = load_pricing()
    model = OmegaConf.load(Path(__file__).parent.parent / "conf/backend/openai.yaml").model
    est = estimate_cost([chat("a")], model, pricing)
    assert 0 < est.usd < 0.01


# -- a local chat-completions server that rate-limits one key -------------------------------------


GONE = "gpt-4-vision-preview"  # what the API answers for a shut-down model: 404 model_not_found


class FakeAPI(BaseHTTPRequestHandler):
    """POST /v1/chat/completions: 429 for LIMITED (echoing the key, as careless servers do), 404 for
    the model GONE (OpenAI's body for a shut-down model), else 200. GET /v1/models lists gpt-4o."""

    seen: list[str] = []
    busy: list[str] = []  # Retry-After values: the next POSTs answer 503 with them, one each

    def do_GET(self) -> None:  # noqa: N802
        self.reply(200, {"object": "list", "data": [{"id": "gpt-4o", "object": "model", "owned_by": "x"}]})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        type(self).seen.append(key)
        if type(self).busy:
            self.reply(503, {"error": {"message": "overloaded"}}, {"Retry-After": type(self).busy.pop(0)})
            return
        if key == LIMITED or key == GOOD + "-also-limited":
            self.reply(429, {"error": {"message": f"Rate limit reached for key {key}", "type": "requests"}})
            return
        if body["model"] == GONE:
            message = f"The model `{GONE}` has been deprecated, learn more here: https://platform.openai.com/docs/deprecations"
            self.reply(404, {"error": {"message": message, "type": "invalid_request_error", "param": None,
                                       "code": "model_not_found"}})  # fmt: skip
            return
        text = f"Happiness ({len(body['messages'][0]['content'])} parts)"
        self.reply(
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                ],
                "usage": {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105},
            },
        )

    def reply(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@pytest.fixture
def fake_api():
    FakeAPI.seen, FakeAPI.busy = [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeAPI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def backend_cfg(base_url: str, **over) -> dict:
    cfg = {
        "base_url": base_url,
        "model": "gpt-4o",
        "pricing": PRICING,
        "max_retries": 3,
        "retry_initial": 0.01,
        "retry_max": 0.05,
        "key_rest_seconds": 60.0,
    }
    return {**cfg, **over}


def test_rotates_keys_on_429(fake_api, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEYS", f"{LIMITED},{GOOD}")
    backend = OpenAIBackend(backend_cfg(fake_api, concurrency=1))
    answers = list(backend.generate([chat("a"), chat("b", images=2), chat("c")]))
    assert all(r.ok and r.text.startswith("Happiness") for r in answers), answers
    assert FakeAPI.seen[0] == LIMITED and set(FakeAPI.seen[1:]) == {GOOD}  # benched after one 429
    assert backend.keys.rotations == 1
    assert backend.usage["requests"] == 3 and backend.spent_usd() == pytest.approx(
        3 * (100 * 2.5 + 5 * 10) / 1e6
    )


def test_all_keys_limited_is_a_scrubbed_error(fake_api, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", LIMITED)
    monkeypatch.delenv("OPENAI_API_KEYS", raising=False)
    backend = OpenAIBackend(backend_cfg(fake_api, max_retries=2))
    [response] = list(backend.generate([chat("a")]))
    assert response.error and "RateLimitError" in response.error
    assert LIMITED not in response.error and LIMITED[:12] not in response.error
    assert len(FakeAPI.seen) == 3  # first try + 2 retries


def test_a_busy_server_is_asked_again_after_its_retry_after_and_no_more_than_max_retries(
    fake_api, monkeypatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", GOOD)
    monkeypatch.delenv("OPENAI_API_KEYS", raising=False)
    backend = OpenAIBackend(backend_cfg(fake_api, max_retries=2, retry_max=5.0))
    FakeAPI.busy = ["0.5", "0.3"]
    start = time.monotonic()
    [answer] = list(backend.generate([chat("a")]))
    assert answer.ok and answer.text.startswith("Happiness"), answer
    assert len(FakeAPI.seen) == 3 and time.monotonic() - start >= 0.8  # each attempt waited as told
    FakeAPI.seen, FakeAPI.busy = [], ["0", "0"]
    [failed] = list(OpenAIBackend(backend_cfg(fake_api, max_retries=1)).generate([chat("b")]))
    assert failed.error and "InternalServerError" in failed.error and "503" in failed.error
    assert len(FakeAPI.seen) == 2  # the first attempt and one retry
    FakeAPI.seen, FakeAPI.busy = [], ["0"]
    [failed] = list(OpenAIBackend(backend_cfg(fake_api, max_retries=0)).generate([chat("c")]))
    assert failed.error and len(FakeAPI.seen) == 1


def test_refuses_above_max_cost_before_sending(fake_api, monkeypatch, capsys) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", GOOD)
    backend = OpenAIBackend(backend_cfg(fake_api, max_cost=0.001))
    requests = [chat(str(i)) for i in range(20)]
    with pytest.raises(OverBudgetError):
        backend.generate(requests)
    assert FakeAPI.seen == []  # nothing was sent
    assert "estimated cost for 20 requests" in capsys.readouterr().err
    allowed = OpenAIBackend(backend_cfg(fake_api, max_cost=0.001, allow_over_budget=True))
    assert all(r.ok for r in allowed.generate(requests))


def test_needs_a_key_and_a_price(monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEYS or OPENAI_API_KEY"):
        OpenAIBackend(backend_cfg("http://127.0.0.1:9/v1"))
    monkeypatch.setenv("OPENAI_API_KEY", GOOD)
    with pytest.raises(UnknownModelError, match="'gpt-9' is not in conf/pricing.yaml.*allow_unknown_model"):
        OpenAIBackend(backend_cfg("http://127.0.0.1:9/v1", model="gpt-9"))
    with pytest.raises(ValueError, match="no video input"):
        OpenAIBackend(backend_cfg("http://127.0.0.1:9/v1", video_as="video"))


def test_config_and_repr_hold_no_key(monkeypatch, tmp_path) -> None:
    from omegaconf import OmegaConf

    monkeypatch.setenv("OPENAI_API_KEYS", f"{GOOD},{LIMITED}")
    cfg = OmegaConf.load(Path(__file__).parent.parent / "conf/backend/openai.yaml")
    backend = OpenAIBackend(cfg)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (tmp_path / "settings.json").write_text(json.dumps(asdict(backend.settings), default=str))
    (tmp_path / "key.json").write_text(json.dumps(key_settings("openai", cfg)))  # cache keys' backend part
    (tmp_path / "repr.txt").write_text(repr(backend.keys) + repr(vars(backend)))
    for key in (GOOD, LIMITED):
        assert_no_secret(tmp_path, key)


def test_scrub_and_find_secret(tmp_path) -> None:
    text = f"Incorrect API key provided: {GOOD[:8]}****bbbb. Authorization: Bearer {GOOD} api_key={LIMITED}"
    clean = scrub(text, [GOOD])
    assert GOOD not in clean and "bbbb" not in clean and LIMITED not in clean
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "log.txt").write_text("prefix " + GOOD[5:30] + " suffix")  # a piece of the key
    assert find_secret(tmp_path, GOOD) == ["a/log.txt"]


def test_key_pool_rests_a_limited_key() -> None:
    pool = KeyPool(["k1", "k2"], rest_seconds=60)
    assert pool.current() == "k1"
    pool.rate_limited("k1")
    assert pool.current() == "k2"
    pool.rate_limited("k2")
    assert pool.current() in ("k1", "k2")  # all resting: the one that rests shortest
    assert "k1" not in repr(pool)


# -- retired and unknown models, refused before anything is sent; a 404 stops the run ----------------


@pytest.mark.parametrize(
    "model",
    ["gpt-4-vision-preview", "gpt-4-1106-vision-preview", "gpt-4-turbo", "gpt-4-turbo-2024-04-09",
     "gpt-4o-2024-05-13", "gpt-4.1-nano-2025-04-14"],
)  # fmt: skip
def test_shut_down_models_are_refused_up_front_without_a_key_or_server(model, monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEYS", raising=False)
    with pytest.raises(UnknownModelError, match=f"{model}' was shut down by OpenAI on 20") as err:
        OpenAIBackend({"model": model, "allow_unknown_model": True})  # the override never revives one
    valid = valid_models(load_pricing())
    assert str(valid) in str(err.value) and model not in valid and "gpt-4o" in valid


@pytest.mark.parametrize(
    ("model", "today", "outcome"),
    [
        ("gpt-4o-2024-08-06", "2026-12-01", "warning"),  # announced for 2027-01-14
        ("gpt-4o-2024-08-06", "2027-01-14", "refused"),  # the shutdown day itself
        ("gpt-4o-mini-2024-07-18", "2026-12-01", "warning"),  # its own entry, not gpt-4o's
        ("gpt-4-vision-preview", "2024-12-05", "warning"),
        ("gpt-4-vision-preview", "2024-12-06", "refused"),
        ("gpt-4.1-mini", "2026-12-01", "warning"),
        ("gpt-9", "2026-12-01", "unknown"),
        ("o1-pro", "2026-12-01", "unknown"),  # not o1's snapshot: no prefix match beyond a date suffix
    ],
)
def test_check_model_by_date(model, today, outcome) -> None:
    import datetime

    pricing = load_pricing()
    day = datetime.date.fromisoformat(today)
    if outcome == "warning":
        assert "deprecated" in check_model(model, pricing, today=day)
    else:
        with pytest.raises(UnknownModelError, match="shut down" if outcome == "refused" else "not in conf"):
            check_model(model, pricing, today=day)


def test_an_unknown_model_is_allowed_explicitly_at_the_highest_rates(monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", GOOD)
    pricing = {"models": {"cheap": {"input": 1.0, "output": 2.0}, "dear": {"input": 3.0, "output": 1.5}},
               "default_image": PRICING["models"]["gpt-4o"]["image"]}  # fmt: skip
    backend = OpenAIBackend({"model": "gpt-9", "pricing": pricing, "allow_unknown_model": True})
    assert backend.pricing["models"]["gpt-9"] == {"input": 3.0, "output": 2.0}  # the top of each rate
    backend.usage.update(prompt_tokens=1_000_000, completion_tokens=1_000_000)
    assert backend.spent_usd() == pytest.approx(5.0)


def test_a_404_model_not_found_stops_with_one_message(fake_api, monkeypatch) -> None:
    """The API answers 404 for a model it does not serve: no error rows, one message saying how to fix it."""
    monkeypatch.setenv("OPENAI_API_KEY", GOOD)
    monkeypatch.delenv("OPENAI_API_KEYS", raising=False)
    pricing = {**PRICING, "models": {**PRICING["models"], GONE: PRICING["models"]["gpt-4o"]}}  # not refused
    backend = OpenAIBackend(backend_cfg(fake_api, model=GONE, pricing=pricing, concurrency=2))
    with pytest.raises(ModelNotFoundError) as err:
        list(backend.generate([chat(str(i)) for i in range(6)]))
    message = str(err.value)
    assert f"404 Not Found for model '{GONE}'" in message and "has been deprecated" in message
    assert "it serves: gpt-4o" in message and "Set backend.model" in message and fake_api in message
    assert len(FakeAPI.seen) <= 2  # not retried: the in-flight requests only, then the run stopped
    assert GOOD not in message and GOOD[:12] not in message


def test_ger_run_with_a_shut_down_model_exits_with_one_message(ger_cache, tmp_path) -> None:
    """`ger run backend=openai backend.model=gpt-4-vision-preview`: exit 2 before any request, no rows."""
    from conftest import run_ger

    args = ["run", "dataset=demo", "limit=2", "progress=true", "backend=openai", f"backend.model={GONE}"]
    proc = run_ger([*args, f"hydra.run.dir={tmp_path / 'run'}"], ger_cache, tmp_path, check=False,
                   env={"OPENAI_API_KEY": GOOD, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("ger run:")]
    assert f"{GONE}' was shut down by OpenAI" in line and "choose one of ['gpt-4.1'" in line
    assert not (tmp_path / "run" / "predictions.csv").exists()
    assert "loading media" not in proc.stderr  # refused before a single sample was decoded


def test_close_inside_a_running_event_loop_closes_the_sessions(fake_api, monkeypatch) -> None:
    """close() from async code (or a collection inside a loop) cannot run the backend's own loop in
    this thread: it closes the sessions from another, as aiohttp itself then reports."""
    import asyncio
    import warnings

    monkeypatch.setenv("OPENAI_API_KEY", GOOD)
    backend = OpenAIBackend(backend_cfg(fake_api))
    [response] = list(backend.generate([chat("a")]))
    sessions = [client._session for client in backend._clients.values()]
    assert response.ok and sessions and not any(s.closed for s in sessions)

    async def inside() -> None:
        backend.close()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no coroutine left never awaited
        asyncio.run(inside())
    assert all(s.closed for s in sessions) and backend._loop is None
