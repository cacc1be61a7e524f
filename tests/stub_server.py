"""A scripted OpenAI-compatible chat-completions server on loopback, for tests that drive `ger`
through its real `server` backend over HTTP.

`StubServer` answers POST /v1/chat/completions (and GET /v1/models) from a threaded stdlib
HTTP server on a random free port; what it answers is a Python callable, so a test scripts
the model. It keeps every request body it received, so a test can check what was sent.

`PerfectModel` is a model that always knows the true label: the test gives it a table from
the digest of each image as it travels (the base64 JPEG of a data URL) to the sample's
label, and it answers every sample with the true label first, in the answer styles open
VLMs use (JSON records named "Sample 3", "Image 3", 3 or "Sample 3:", markdown lists,
"Sample 3: happy" lines, id-less records, repeated records, a skipped record, a cut
answer). Like a real server it stops at max_tokens (about 4 characters a token) and then
says finish_reason "length".

Use the `stub_server` fixture (a started StubServer; set `.model`), or `StubServer` itself.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

CHARS_PER_TOKEN = 4  # the stub's tokenizer: ceil(characters / 4)

# A model: request body -> (answer text, finish reason); the server applies max_tokens itself.
Model = Callable[[dict[str, Any]], tuple[str, str]]


def tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def payload_digest(url: str) -> str:
    """sha256 of a data URL's base64 payload: how the stub recognises an image it was sent."""
    return hashlib.sha256(url.split(",", 1)[-1].encode("ascii")).hexdigest()


def request_text(body: dict[str, Any]) -> str:
    """Every text part of every message of a request, joined."""
    out = []
    for message in body.get("messages", []):
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        out += [p.get("text", "") for p in parts if p.get("type") == "text"]
    return "\n".join(out)


def sample_groups(body: dict[str, Any]) -> list[list[str]]:
    """The image digests of each sample, in prompt order: a sample's media follow its text part."""
    groups: list[list[str]] = []
    for message in body.get("messages", []):
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if part.get("type") == "text":
                groups.append([])
            elif part.get("type") == "image_url":
                if not groups:
                    groups.append([])
                groups[-1].append(payload_digest(part["image_url"]["url"]))
    return [g for g in groups if g]


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the server backend opens up to `concurrency` connections at once
    daemon_threads = True


class StubServer:
    """A threaded loopback HTTP server speaking OpenAI chat completions (see the module docstring)."""

    def __init__(self, model: Model | None = None) -> None:
        self.model: Model = model or (lambda body: ("[]", "stop"))
        self.bodies: list[dict[str, Any]] = []
        self.cut_by_budget = 0  # answers the stub cut at the request's max_tokens
        # the served context, as `vllm serve --max-model-len`: max_tokens is clamped to what the prompt leaves
        self.max_model_len: int | None = None
        # vLLM's `prompt_logprobs` answer field (answer=likelihood): body -> rows, or None to leave it out
        self.prompt_logprobs: Callable[[dict[str, Any]], list | None] | None = None
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def texts(self) -> list[str]:
        """The text of every request received so far."""
        with self._lock:
            return [request_text(b) for b in self.bodies]

    def start(self) -> StubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """One chat completion: the model's answer, cut at max_tokens like a real server."""
        with self._lock:
            self.bodies.append(body)
        text, finish = self.model(body)
        prompt_tokens = tokens(request_text(body))
        budget = body.get("max_tokens") or body.get("max_completion_tokens")
        if self.max_model_len is not None:
            budget = min(int(budget or self.max_model_len), self.max_model_len - prompt_tokens)
        if budget and tokens(text) > int(budget):
            text, finish = text[: int(budget) * CHARS_PER_TOKEN], "length"
            with self._lock:
                self.cut_by_budget += 1
        # an answer stopped for length used its whole budget, whatever the model's text (vLLM's usage)
        completion = int(budget) if finish == "length" and budget else tokens(text)
        extra = {}
        if self.prompt_logprobs is not None and body.get("prompt_logprobs") is not None:
            extra["prompt_logprobs"] = self.prompt_logprobs(body)
        return extra | {
            "id": f"chatcmpl-{len(self.bodies)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "stub"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            },
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # TCP_NODELAY, as uvicorn (vLLM's server) sets it: the body, written after the headers, would
            # otherwise wait for the client's delayed ACK, 40 ms an answer whenever requests do not overlap
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, status: int, data: dict[str, Any]) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "stub", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:  # noqa: N802
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    self._send(200, stub.complete(body))
                except Exception as exc:  # noqa: BLE001 - a test bug shows up as a 500 with the reason
                    self._send(500, {"error": {"message": f"{type(exc).__name__}: {exc}"}})

        return Handler


# ------------------------------------------------------------------ the perfect model

SINGLE_STYLES = (
    "json",  # ["happy", "sad", ...]
    "plain",  # happy, sad, ...
    "fence",  # the JSON list in a ```json fence
    "enumerated",  # 1. Happy\n2. Sad ...
    "one_label",  # happy
    "record",  # [{'name': 'Image 1', 'result': [...]}]: the record the prompt asks for
    "bold",  # **Happy**
    "prefix",  # Answer: happy
    "sentence",  # ... the emotion shown here is happy.
    "think",  # <think>...</think> Final answer: happy
)
BATCH_STYLES = (
    "json_ids",  # [{"name": "Sample 1", "result": [...]}, ...] in a ```json fence
    "image_ids",  # records named "Image 1"
    "bare_ids",  # records named 1, 2, ... (numbers)
    "colon_ids",  # records named "Sample 1:" (the prompt's item line, colon included)
    "lines",  # Sample 1: happy, sad, ...
    "markdown",  # a preface, then 1. **Sample 1**: happy, sad
    "mapping",  # {"sample_1": [...], ...}
    "shuffled",  # records with ids, in another order
    "repeated",  # every record, then the first one again with another ranking
    "no_ids",  # [["happy", ...], ...]: records by position only
    "skip_last",  # the last record left out (the batch must be split and asked again)
    "cut",  # the answer stops inside the last record, finish_reason "length"
)


@dataclass
class PerfectModel:
    """Knows every sample's label from its image digests; answers in the listed styles in turn."""

    labels: list[str]
    truth: dict[str, str]  # image payload digest -> true label
    single_styles: tuple[str, ...] = SINGLE_STYLES
    batch_styles: tuple[str, ...] = BATCH_STYLES
    unknown: int = 0  # samples whose images it did not recognise
    _turn: Any = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ranking(self, digests: list[str]) -> list[str]:
        known = [self.truth[d] for d in digests if d in self.truth]
        if not known:
            with self._lock:
                self.unknown += 1
            return list(self.labels)
        top = max(set(known), key=known.count)
        return [top] + [label for label in self.labels if label != top]

    def __call__(self, body: dict[str, Any]) -> tuple[str, str]:
        groups = sample_groups(body)
        rankings = [self.ranking(g) for g in groups]
        with self._lock:
            turn = next(self._turn)
        if len(rankings) == 1:  # one sample (single mode, or a batch split down to one): a plain answer
            return single_answer(rankings[0], self.single_styles[turn % len(self.single_styles)]), "stop"
        return batch_answer(rankings, self.batch_styles[turn % len(self.batch_styles)])


def single_answer(ranked: list[str], style: str) -> str:
    if style == "json":
        return json.dumps(ranked)
    if style == "plain":
        return ", ".join(ranked)
    if style == "fence":
        return "```json\n" + json.dumps(ranked) + "\n```"
    if style == "enumerated":
        return "\n".join(f"{i}. {label.title()}" for i, label in enumerate(ranked, 1))
    if style == "record":  # the record the prompt asks for, wrapped in a list, Python-quoted
        return str([{"name": "Image 1", "result": ranked}])
    if style == "bold":
        return f"**{ranked[0].title()}**"
    if style == "prefix":
        return f"Answer: {ranked[0]}"
    if style == "sentence":
        return f"Looking at the face and posture, the emotion shown here is {ranked[0].lower()}."
    if style == "think":
        return f"<think>The mouth and eyes could fit several labels.</think>\nFinal answer: {ranked[0]}"
    return ranked[0]


def batch_answer(rankings: list[list[str]], style: str) -> tuple[str, str]:
    """One answer for a batch in `style`, and its finish reason."""
    n = len(rankings)
    records = [{"name": f"Sample {i}", "result": r} for i, r in enumerate(rankings, 1)]
    if style == "image_ids":
        records = [{"name": f"Image {i}", "result": r} for i, r in enumerate(rankings, 1)]
    elif style == "bare_ids":
        records = [{"name": i, "result": r} for i, r in enumerate(rankings, 1)]
    elif style == "colon_ids":
        records = [{"name": f"Sample {i}:", "result": r} for i, r in enumerate(rankings, 1)]
    elif style == "lines":
        return "\n".join(f"Sample {i}: {', '.join(r)}" for i, r in enumerate(rankings, 1)), "stop"
    elif style == "markdown":
        body = "\n".join(f"{i}. **Sample {i}**: {', '.join(r)}" for i, r in enumerate(rankings, 1))
        return "Here are the rankings for each sample:\n\n" + body, "stop"
    elif style == "mapping":
        return json.dumps({f"sample_{i}": r for i, r in enumerate(rankings, 1)}, indent=1), "stop"
    elif style == "shuffled":
        records = records[1::2] + records[0::2]
    elif style == "repeated":
        records = records + [{"name": "Sample 1", "result": rankings[0][::-1]}]
    elif style == "no_ids":
        return json.dumps(rankings), "stop"
    elif style == "skip_last" and n > 1:
        records = records[:-1]
    elif style == "cut" and n > 1:
        text = json.dumps(records)
        return text[: len(text) - len(json.dumps(records[-1])) // 2], "length"
    return "```json\n" + json.dumps(records, indent=1) + "\n```", "stop"


@pytest.fixture
def stub_server():
    """A started StubServer (answers `[]` until a test sets `.model`), stopped after the test."""
    server = StubServer().start()
    try:
        yield server
    finally:
        server.stop()
