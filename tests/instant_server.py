"""An OpenAI-compatible chat-completions server on loopback that answers at once and costs next to nothing.

benchmarks/bench_stream.py times ger against a server that takes no time, so that only the harness
is timed. The scripted StubServer (stub_server.py) is the wrong tool there: stdlib http.server reads
each request through small buffered reads and json-parses the whole body (tens of kB of base64): 0.63 ms
of CPU a request in bench_stream at 155c079, a quarter of what decoding a still image costs, spent on
the same cores as ger, whose own HTTP client also spent more against it (0.32 ms a request, 0.22-0.26
against this one). This one is an asyncio protocol that reads each body by its Content-Length, looks
at nothing but the request line, and writes one canned answer: 0.17-0.21 ms a request in bench_stream,
the bench's own 50 ms sampler included.

It speaks HTTP/1.1 with keep-alive, as vLLM's server does: POST .../chat/completions gets `answer` as
the assistant's message (finish_reason "stop"), GET .../models lists `model`; anything else is a 404.
A request without Content-Length (chunked) gets 411 and the connection is closed.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 411: "Length Required"}


def _response(status: int, body: dict[str, Any], close: bool = False) -> bytes:
    data = json.dumps(body).encode()
    head = [f"HTTP/1.1 {status} {_REASONS[status]}", "Content-Type: application/json",
            f"Content-Length: {len(data)}"]  # fmt: skip
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


class InstantServer:
    """Start with start() (returns self; `.url` is the API root), stop with stop(). `.requests` counts
    the chat completions answered."""

    def __init__(self, answer: str = "happy", model: str = "stub") -> None:
        completion = {
            "id": "chatcmpl-instant", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }  # fmt: skip
        models = {"object": "list", "data": [{"id": model, "object": "model"}]}
        self._answers = {
            ("POST", "/chat/completions"): _response(200, completion),
            ("GET", "/models"): _response(200, models),
        }
        self._missing = _response(404, {"error": {"message": "not found", "code": 404}})
        self.requests = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="instant-server", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._open: set[asyncio.Transport] = set()  # keep-alive connections, closed by stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> InstantServer:
        self._thread.start()
        opened = asyncio.run_coroutine_threadsafe(
            self._loop.create_server(lambda: _Connection(self), "127.0.0.1", 0, backlog=256), self._loop
        )
        self._server = opened.result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for transport in list(self._open):  # keep-alive connections: wait_closed would wait for them
                transport.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def answer(self, method: bytes, target: bytes) -> bytes:
        """The canned response for a request line's method and path (the /v1 root is not checked)."""
        path = target.decode("latin-1").split("?", 1)[0]
        for (verb, tail), response in self._answers.items():
            if method.decode("latin-1") == verb and path.endswith(tail):
                if tail == "/chat/completions":
                    self.requests += 1
                return response
        return self._missing


class _Connection(asyncio.Protocol):
    """One keep-alive connection: head, then `length` bytes of body, then the answer; and again."""

    def __init__(self, server: InstantServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.length: int | None = None  # the body bytes still to come, once the head was read
        self.line = (b"", b"")
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.server._open.add(transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            if self.length is None and not self._read_head():
                return
            assert self.length is not None
            if len(self.buffer) < self.length:
                return
            del self.buffer[: self.length]
            self.length = None
            self.transport.write(self.server.answer(*self.line))

    def _read_head(self) -> bool:
        """Take a request's head off the buffer; False while it is incomplete (or the connection ended)."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self.buffer[:end]).split(b"\r\n")
        del self.buffer[: end + 4]
        parts = lines[0].split(b" ")
        headers = dict(line.split(b":", 1) for line in lines[1:] if b":" in line)
        headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
        if len(parts) != 3:
            return self._refuse(400, "a request line is METHOD TARGET VERSION")
        if b"transfer-encoding" in headers:
            return self._refuse(411, "send the body with a Content-Length")
        try:
            self.length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return self._refuse(400, "Content-Length is not a number")
        self.line = (parts[0], parts[1])
        return True

    def _refuse(self, status: int, message: str) -> bool:
        assert self.transport is not None
        self.transport.write(_response(status, {"error": {"message": message, "code": status}}, close=True))
        self.transport.close()
        self.server._open.discard(self.transport)
        self.transport = None
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.transport is not None:
            self.server._open.discard(self.transport)
        self.transport = None
