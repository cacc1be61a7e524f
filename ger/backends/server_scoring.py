"""answer=likelihood against an OpenAI-compatible server that returns prompt log-probabilities (vLLM serve).

For each (sample, label) one chat completion is sent: the request's messages plus an assistant
message holding the label, rendered open-ended (`continue_final_message: true`,
`add_generation_prompt: false`, vLLM's extra parameters), with `prompt_logprobs: 0` (each prompt
token's own log-probability) and `max_tokens: 1`. The label's tokens are the last prompt tokens
whose decoded text joins to exactly the label; their log-probabilities are summed.

The first request of a run goes out alone: a server that answers it without `prompt_logprobs`
(the OpenAI API, other servers) stops the run with a clear error before the rest is sent.
vLLM serve skips prefix-cache reads for prompt-logprob requests, so there each label re-encodes
the prompt; the offline backend (backend=vllm) encodes it once per sample.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

from ger.backends.base import FatalBackendError
from ger.backends.chat_format import json_payload
from ger.backends.http_client import NotFoundError
from ger.backends.label_scores import LabelScores
from ger.backends.server import _cancel
from ger.records import Request, Response

log = logging.getLogger(__name__)

EXTRA = {"prompt_logprobs": 0, "add_generation_prompt": False, "continue_final_message": True}


class NoPromptLogprobs(FatalBackendError):
    """The server answered without prompt log-probabilities: it cannot do answer=likelihood."""


def label_body(backend: Any, request: Request, label: str) -> bytes:
    """The chat-completions JSON that scores `label` as the answer to `request`."""
    body = backend._body(request)
    body["messages"] = [*body["messages"], {"role": "assistant", "content": label}]
    body[backend.settings.max_tokens_param] = 1
    body.update({**body.pop("extra_body", {}), **EXTRA})  # vLLM's extra parameters sit at the top level
    return json_payload(body)


def label_tail(rows: list[Any], label: str) -> tuple[float, int]:
    """(summed log-probability, token count) of the last prompt tokens, which must spell `label`.

    `rows` is vLLM's `prompt_logprobs`: per prompt token None or {token id: {logprob, decoded_token}};
    with prompt_logprobs=0 each holds just the prompt token itself.
    """
    text, total, count = "", 0.0, 0
    for row in reversed(rows):
        if not row or len(row) != 1:
            break
        (entry,) = row.values()
        text = str(entry.get("decoded_token") or "") + text
        total += float(entry["logprob"])
        count += 1
        if len(text) >= len(label):
            break
    if text != label:
        raise ValueError(f"the prompt's last tokens spell {text!r}, not the label {label!r}")
    return total, count


async def _score_one(backend: Any, body: bytes, label: str) -> tuple[float, int]:
    s = backend.settings
    completion = await backend.post_with_retries(body, backend._clients)
    rows = completion.get("prompt_logprobs")
    if not rows:
        where = s.base_url or "the OpenAI API"
        raise NoPromptLogprobs(
            f"{where} returned no prompt_logprobs for model {backend.model!r}: answer=likelihood needs a "
            "server that returns prompt log-probabilities (vLLM serve does); use answer=free|choice|batch "
            "here, or backend=vllm / hf"
        )
    return label_tail(rows, label)


async def _score_request(backend: Any, request: Request, semaphore: asyncio.Semaphore) -> Response:
    start = time.monotonic()
    labels = list(request.candidates or [])
    try:
        if not labels:
            raise ValueError("no candidate labels to score")
        bodies = await asyncio.to_thread(lambda: [label_body(backend, request, label) for label in labels])

        async def one(body: bytes, label: str) -> tuple[float, int]:
            async with semaphore:
                return await _score_one(backend, body, label)

        found = await asyncio.gather(*(one(b, label) for b, label in zip(bodies, labels, strict=True)))
    except (asyncio.CancelledError, FatalBackendError):
        raise
    except NotFoundError as exc:
        raise FatalBackendError(f"model {backend.model!r} not served: {backend._describe(exc)}") from None
    except Exception as exc:  # this sample fails alone
        return Response(key=request.key, error=backend._describe(exc), seconds=time.monotonic() - start)
    by_label = dict(zip(labels, found, strict=True))
    scores = LabelScores(
        {lb: lp for lb, (lp, _) in by_label.items()}, {lb: n for lb, (_, n) in by_label.items()}
    )
    return Response(
        key=request.key, text=scores.to_text(), seconds=time.monotonic() - start, finish_reason="stop"
    )


def label_logprobs(backend: Any, requests: list[Request]) -> Iterator[Response]:
    """Score every request's candidates; the first request alone, then the rest concurrently.

    Runs on the backend's own event loop and HTTP sessions (closed by backend.close()).
    """
    if not requests:
        return
    if backend._loop is None:
        backend._loop = asyncio.new_event_loop()
    loop = backend._loop
    pending: set[asyncio.Task] = set()
    try:
        semaphore = asyncio.Semaphore(backend.settings.concurrency)
        yield loop.run_until_complete(_score_request(backend, requests[0], semaphore))
        pending = {loop.create_task(_score_request(backend, r, semaphore)) for r in requests[1:]}
        while pending:
            done, pending = loop.run_until_complete(
                asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            )
            for task in done:
                yield task.result()
    finally:  # also when the caller stops early or a fatal error ends the run
        loop.run_until_complete(_cancel(pending))
