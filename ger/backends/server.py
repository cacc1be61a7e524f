"""Backend `server`: any OpenAI-compatible chat endpoint, first of all `vllm serve`.

Requests go out concurrently (at most `concurrency` in flight) as JSON POSTs on one
persistent HTTP session per key for the whole run (ger/backends/http_client.py). Rate
limits (429), server errors (5xx), timeouts and dropped connections are retried with
exponential backoff by tenacity; what still fails comes back as Response.error,
never as an exception, so one bad request does not end a run of thousands.
`generate()` is a plain iterator: it drives the backend's event loop and yields each
Response as soon as it arrives. It takes a list, or any iterable, which it reads only as
room frees up, so requests go out as soon as they are built (the streamed run's feed).

The OpenAI backend (openai_api.py) is this class with a cost guard and a pool
of keys; see docs/SCALING.md for how to start a server with launch/serve.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ger.backends.base import BackendSettings, FatalBackendError, cut_by_context, read_settings, setting
from ger.backends.chat_format import VIDEO_AS, iter_parts, json_payload, to_openai_messages, video_io_kwargs
from ger.backends.http_client import NotFoundError, RateLimitError, Session, base_url, retryable
from ger.backends.keys import KeyPool, read_keys, scrub
from ger.config import plain
from ger.records import EncodedImage, Request, Response

log = logging.getLogger(__name__)

STRUCTURED = ("vllm", "guided", "json_schema", "none")
NO_KEY = "EMPTY"  # what vLLM expects when it was started without --api-key
MAX_ERROR_CHARS = 600


@dataclass(frozen=True)
class ServerSettings(BackendSettings):
    """conf/backend/server.yaml, typed. Keys are referred to by environment variable NAME only.

    Where and how requests travel (address, keys, concurrency, timeouts, retries) does not change
    an answer: a rerun against the same model on another port or host is answered from the cache.
    """

    base_url: str | None = setting("http://127.0.0.1:8000/v1", answers=False)  # None: the SDK default
    model: str | None = setting(None, answers=True)  # served model name; None: the model config's name
    api_key_env: str | None = setting(None, answers=False)  # variable holding the key; None: no key
    api_keys_env: str | None = setting(None, answers=False)  # several comma-separated keys, rotated on 429
    concurrency: int = setting(32, answers=False)  # requests in flight
    timeout: float = setting(600.0, answers=False)  # seconds per request attempt
    max_retries: int = setting(5, answers=False)  # attempts after the first: 429 / 5xx / connection errors
    retry_initial: float = setting(1.0, answers=False)  # first backoff, seconds; doubles, with jitter
    retry_max: float = setting(60.0, answers=False)
    key_rest_seconds: float = setting(20.0, answers=False)  # how long a rate-limited key sits out
    video_as: str = setting("images", answers=True)  # images | video (vLLM video_url, JPEG frame sequence)
    video_metadata: bool = setting(False, answers=True)  # fps, clip length (--trust-request-mm-kwargs)
    jpeg_quality: int = setting(90, answers=True)
    image_detail: str | None = setting(None, answers=True)  # OpenAI's low | high | auto; None: not sent
    # how Request.choices reach the server: vllm | guided | json_schema | none
    structured_outputs: str = setting("vllm", answers=True)
    max_tokens_param: str = setting("max_tokens", answers=True)  # or max_completion_tokens (newer models)
    temperature: float = setting(0.0, answers=True)
    top_p: float | None = setting(None, answers=True)
    seed: int | None = setting(0, answers=True)
    extra_body: dict[str, Any] = setting(factory=dict, answers=True)  # sent with every request: {top_k: 1}

    key_compat = {
        "not_in_key": ["base_url", "api_key_env", "api_keys_env", "concurrency", "timeout", "max_retries",
                       "retry_initial", "retry_max", "key_rest_seconds"]
    }  # fmt: skip

    def wire_quality(self) -> int | None:
        return self.jpeg_quality

    def validate(self) -> None:
        if self.video_as not in VIDEO_AS:
            raise ValueError(f"unknown video_as {self.video_as!r}; expected one of {list(VIDEO_AS)}")
        if self.structured_outputs not in STRUCTURED:
            raise ValueError(
                f"unknown structured_outputs {self.structured_outputs!r}; expected one of {list(STRUCTURED)}"
            )
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")


def _encodes(request: Request) -> bool:
    """Whether building the request's body encodes images: pixels not made ready by a decoding worker
    (EncodedImage), other than stills sent as their file."""
    for part in iter_parts(request.messages):
        kind = part.get("type")
        images = [part.get("image")] if kind == "image" else part.get("frames", []) if kind == "video" else []
        if "source" not in part and not all(isinstance(im, EncodedImage) for im in images):
            return True
    return False


async def _close_all(sessions: list[Session]) -> None:
    await asyncio.gather(*(c.close() for c in sessions), return_exceptions=True)


class ModelNotFoundError(FatalBackendError):
    """The server answered 404 for the model: it does not serve it (or it was retired)."""


_END = object()  # the end of a request iterable


async def _cancel(pending: set[asyncio.Task]) -> None:
    """Cancel what is still in flight, inside the backend's own loop."""
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _polled(poll: Any) -> Request | None | object:
    """A request the source has ready now, None if it has none yet, or _END."""
    try:
        return poll()
    except StopIteration:
        return _END


class _InFlight:
    """Tasks running on the backend's loop, and those finished (in the order they finished), not yet
    read: their done callbacks queue them, where asyncio.wait(FIRST_COMPLETED) hooked and unhooked
    every task in flight for each answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: set[asyncio.Future] = set()
        self.finished: deque[asyncio.Future] = deque()
        self._wake: asyncio.Future | None = None

    def add(self, future: asyncio.Future) -> None:
        self.pending.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future) -> None:
        self.pending.discard(future)
        self.finished.append(future)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def wait(self) -> bool:
        """Run the loop until something has finished; False when nothing is running or finished."""
        if not self.finished:
            if not self.pending:
                return False
            self._wake = self.loop.create_future()
            self.loop.run_until_complete(self._wake)
        return True


class ServerBackend:
    """Chat completions against an OpenAI-compatible server (see the module docstring)."""

    backend_name = "server"
    settings_class: type[ServerSettings] = ServerSettings
    takes_stream = True  # generate() reads an iterable as it goes (the streamed run feeds it continuously)

    def __init__(self, backend_cfg: Any, model_cfg: Any = None) -> None:
        self.settings = read_settings(self.settings_class, backend_cfg, self.backend_name)
        self.model = self._model_name(model_cfg)
        self.keys = KeyPool(self._read_keys(), rest_seconds=self.settings.key_rest_seconds)
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
        self._loop: asyncio.AbstractEventLoop | None = None  # one loop and one session per key per run
        self._clients: dict[str, Session] = {}
        self._reader: ThreadPoolExecutor | None = None  # reads a request iterable off the loop

    # -- configuration -------------------------------------------------------------------------

    def _model_name(self, model_cfg: Any) -> str:
        if self.settings.model:
            return self.settings.model
        name = getattr(model_cfg, "name", None) or plain(model_cfg).get("name")  # a ModelSpec or a config
        if not name:
            raise ValueError("backend `server` needs `model` (the served model name) or a model config")
        return name  # launch/serve.py serves every model under its config name

    def _read_keys(self) -> list[str]:
        s = self.settings
        if not (s.api_key_env or s.api_keys_env):
            return [NO_KEY]
        keys = read_keys(s.api_key_env, s.api_keys_env)
        if not keys:
            names = " or ".join(n for n in (s.api_keys_env, s.api_key_env) if n)
            raise ValueError(f"no API key: set the environment variable {names}")
        return keys

    # -- the run ---------------------------------------------------------------------------------

    def generate(self, requests: Iterable[Request]) -> Iterator[Response]:
        """Answer all requests concurrently, yielding each Response as it completes.

        The checks in before_run() happen here, at the call, before anything is sent: a backend
        with such checks (the OpenAI backend's cost guard) takes no stream, so it sees every request.
        """
        if not self.takes_stream:
            requests = list(requests)
        if isinstance(requests, list):
            self.before_run(requests)
        return self._stream(requests)

    def _stream(self, requests: Iterable[Request]) -> Iterator[Response]:
        """Keep `concurrency` requests in flight, taking the next one from `requests` as one finishes.

        A source with poll() (ger/run/ask.py Unsent) is read here while it has requests ready; only
        for one that must wait (for decoding) is it read in a thread."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        loop, source = self._loop, iter(requests)
        direct = isinstance(requests, (list, tuple))  # nothing to wait for: no reading thread
        poll = None if direct else getattr(source, "poll", None)
        most = self.settings.concurrency
        semaphore = asyncio.Semaphore(most)
        flight = _InFlight(loop)
        feeding: asyncio.Future | None = None  # the next request, being read (built) off the loop

        def launch(request: Request) -> None:
            flight.add(loop.create_task(self._answer(request, semaphore, self._clients)))

        try:
            while True:
                while feeding is None and source is not None and len(flight.pending) < most:
                    request = _polled(poll) if poll is not None else None
                    if request is None and not direct:
                        feeding = self._next(loop, source)
                        flight.add(feeding)
                    elif request is None:
                        request = next(source, _END)
                    if request is _END:
                        source = None
                    elif request is not None:
                        launch(request)
                    request = None  # no local keeps a request: a feed counts its pixels alive until freed
                if not flight.wait():
                    return
                while flight.finished:
                    future = flight.finished.popleft()
                    if future is not feeding:
                        yield future.result()  # raises a FatalBackendError (404: no such model)
                        continue
                    feeding = None
                    if future.result() is _END:  # raises what building the request raised
                        source = None
                    else:
                        launch(future.result())
                    future = None
        finally:  # also when the caller stops iterating early
            loop.run_until_complete(_cancel(flight.pending | set(flight.finished)))

    def _next(self, loop: asyncio.AbstractEventLoop, source: Iterator[Request]) -> asyncio.Future:
        """The next request of `source` (or _END), read in a thread: a feed may wait for decoding."""
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="ger-feed")
        return loop.run_in_executor(self._reader, next, source, _END)

    def label_logprobs(self, requests: list[Request]) -> Iterator[Response]:
        """answer=likelihood where the server returns prompt log-probs (ger/backends/server_scoring.py)."""
        from ger.backends.server_scoring import label_logprobs

        self.before_run(requests)
        return label_logprobs(self, requests)

    def before_run(self, requests: list[Request]) -> None:
        """Hook for checks before anything is sent (the OpenAI backend's cost guard)."""

    def close(self) -> None:
        """Close the HTTP sessions and the event loop (a later generate() opens new ones).

        Called while another event loop runs in this thread (async code, or garbage collection
        inside a loop), which cannot run this one's, it closes them from a thread of its own."""
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)
            self._reader = None
        if self._loop is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._close_loop()
            return
        closer = threading.Thread(target=self._close_loop, name="ger-close")
        closer.start()
        closer.join(timeout=10)

    def _close_loop(self) -> None:
        self._loop.run_until_complete(_close_all(list(self._clients.values())))  # type: ignore[union-attr]
        self._loop.close()  # type: ignore[union-attr]
        self._loop, self._clients = None, {}

    def __del__(self) -> None:  # a backend used without close() (a script, a test) closes its sessions
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at garbage collection: nothing left to tell
            pass

    async def _answer(self, request: Request, semaphore: asyncio.Semaphore, clients: dict) -> Response:
        start = time.monotonic()
        async with semaphore:
            try:
                if _encodes(request):
                    body = await asyncio.to_thread(self._payload, request)  # JPEG encoding off the loop
                else:
                    body = self._payload(request)  # text, and files sent as they are: quick
                text, finish, tokens = await self._send_with_retries(body, request.choices, clients)
                return Response(
                    key=request.key,
                    text=text,
                    seconds=time.monotonic() - start,
                    finish_reason=finish,
                    context_cut=cut_by_context(finish, tokens, request.max_tokens),
                )
            except asyncio.CancelledError:
                raise
            except NotFoundError as exc:  # every request would get it: stop, do not fill error rows
                raise ModelNotFoundError(await self._not_found_message(exc, clients)) from None
            except Exception as exc:  # every failure becomes a Response, never an exception
                log.warning("request %s failed: %s", request.key[:12], self._describe(exc))
                return Response(key=request.key, error=self._describe(exc), seconds=time.monotonic() - start)

    async def _not_found_message(self, exc: BaseException, clients: dict) -> str:
        """What failed, for which model, and how to fix it (with the models the server does serve)."""
        where = self.settings.base_url or "the OpenAI API ($OPENAI_BASE_URL or api.openai.com)"
        served = await self._served_models(clients)
        listed = f"it serves: {', '.join(served)}" if served else "the server did not list its models"
        return scrub(
            f"{where} answered 404 Not Found for model {self.model!r} ({self._describe(exc)}); {listed}. "
            f"Set backend.model to a model this server serves{self._not_found_hint()}; "
            "the run stopped before writing error rows, and answers already received are cached.",
            self.keys.keys,
        )

    def _not_found_hint(self) -> str:
        return " (launch/serve.py serves each model under its conf/model name), or check backend.base_url"

    async def _served_models(self, clients: dict) -> list[str]:
        """The model ids GET /models lists; [] when the server cannot say (kept short: 20 at most)."""
        try:
            key = self.keys.current()
            client = clients.get(key) or clients.setdefault(key, self._client(key))
            page = await client.request("GET", "/models", timeout=10)
            return sorted(str(m["id"]) for m in page["data"])[:20]
        except Exception:  # a listing is a courtesy: the 404 message stands without it
            return []

    def _describe(self, exc: BaseException) -> str:
        """A one-line error for Response.error, with anything key-shaped removed."""
        text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        return scrub(text, self.keys.keys)[:MAX_ERROR_CHARS]

    def _payload(self, request: Request) -> bytes:
        """The JSON POSTed for one request: the arguments, extra_body's keys merged in (as the SDK did)."""
        body = self._body(request)
        body.update(body.pop("extra_body", {}))
        return json_payload(body)

    def _body(self, request: Request) -> dict[str, Any]:
        """The chat-completions arguments for one request."""
        s = self.settings
        body: dict[str, Any] = {
            "model": self.model,
            "messages": to_openai_messages(request.messages, s.video_as, s.jpeg_quality, s.image_detail),
            "temperature": s.temperature,
            s.max_tokens_param: request.max_tokens,
        }
        if s.top_p is not None:
            body["top_p"] = s.top_p
        if s.seed is not None:
            body["seed"] = s.seed
        extra = dict(s.extra_body)
        if s.video_as == "video" and s.video_metadata and (media := video_io_kwargs(request.messages)):
            extra["media_io_kwargs"] = media
        if request.choices:
            self._constrain(body, extra, list(request.choices))
        if extra:
            body["extra_body"] = extra
        return body

    def _constrain(self, body: dict[str, Any], extra: dict[str, Any], choices: list[str]) -> None:
        """Restrict the answer to one of `choices`, the way this server understands it."""
        mode = self.settings.structured_outputs
        if mode == "vllm":
            extra["structured_outputs"] = {"choice": choices}
        elif mode == "guided":  # vLLM before structured_outputs replaced guided_* parameters
            extra["guided_choice"] = choices
        elif mode == "json_schema":  # OpenAI structured outputs; unwrapped in _text
            schema = {
                "type": "object",
                "properties": {"label": {"type": "string", "enum": choices}},
                "required": ["label"],
                "additionalProperties": False,
            }
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "label", "strict": True, "schema": schema},
            }

    async def _send_with_retries(
        self, body: bytes, choices: Any, clients: dict
    ) -> tuple[str, str | None, int | None]:
        """(answer text, finish reason, completion tokens) after retries; "length": the answer was cut."""
        completion = await self.post_with_retries(body, clients)
        usage = completion.get("usage") or {}
        self.usage["prompt_tokens"] += usage.get("prompt_tokens") or 0
        self.usage["completion_tokens"] += usage.get("completion_tokens") or 0
        self.usage["requests"] += 1
        if not completion.get("choices"):
            raise RuntimeError("the server answered with no choices")
        choice = completion["choices"][0]
        text = (choice.get("message") or {}).get("content") or ""
        return self._text(text, choices), choice.get("finish_reason"), usage.get("completion_tokens")

    async def post_with_retries(self, body: bytes, clients: dict) -> dict[str, Any]:
        """One chat completion's JSON, retried on 429 / 5xx / dropped connections, rotating keys.

        The first attempt goes out without tenacity, whose machinery cost as much CPU per request
        as aiohttp's against a fast server; a failed one is handed to tenacity as its first attempt."""
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

        try:
            return await self._post_once(body, clients)
        except Exception as exc:
            if not retryable(exc) or self.settings.max_retries < 1:
                raise
            failed: list[BaseException] = [exc]
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.settings.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception(retryable),
            reraise=True,
        ):
            with attempt:
                if failed:  # attempt 1, already made: tenacity waits and counts from it
                    raise failed.pop()
                return await self._post_once(body, clients)
        raise AssertionError("unreachable: tenacity reraises the last error")

    def _wait(self, retry_state: Any) -> float:
        """Exponential backoff with jitter, at least the server's Retry-After when it sends one."""
        from tenacity import wait_exponential, wait_random

        s = self.settings
        backoff = wait_exponential(multiplier=s.retry_initial, max=s.retry_max) + wait_random(
            0, s.retry_initial
        )
        delay = backoff(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        headers = getattr(exc, "headers", None)
        try:
            after = float(headers.get("retry-after", 0)) if headers is not None else 0.0
        except (TypeError, ValueError):
            after = 0.0
        return min(max(delay, after), s.retry_max)

    async def _post_once(self, body: bytes, clients: dict) -> dict[str, Any]:
        key = self.keys.current()
        client = clients.get(key) or clients.setdefault(key, self._client(key))
        try:
            return await client.request("POST", "/chat/completions", body)
        except RateLimitError:
            self.keys.rate_limited(key)  # the retry goes out with the next key, if there is one
            raise

    def _client(self, key: str) -> Session:
        """One key's session (no retries of its own: tenacity does the retrying, with key rotation)."""
        return Session(base_url(self.settings.base_url), key, self.settings.timeout)

    def _text(self, text: str, choices: Any) -> str:
        """The answer text; a json_schema answer is unwrapped to its label."""
        if choices and self.settings.structured_outputs == "json_schema":
            try:
                return str(json.loads(text)["label"])
            except (ValueError, KeyError, TypeError):
                return text
        return text
