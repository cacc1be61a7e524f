"""The HTTP transport of the server and OpenAI backends: JSON POSTs on one persistent session per key.

A run sends thousands of small requests; the official SDK spent ~2.4 ms of CPU on each (argument
transforms, a typed response model, its own retry layer), as much as decoding a still image,
and a new client per call set up TLS again. Here one aiohttp session per key lives for the whole
run and a request costs ~0.6 ms. Errors keep the SDK's names and messages (RateLimitError:
Error code: 429 - {...}), so error rows and the retry rules read as before: what is worth another
attempt (429, 408, 409, 5xx, timeouts, dropped connections) is `retryable`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

OPENAI_URL = "https://api.openai.com/v1"  # the SDK's default, used when no base_url and no $OPENAI_BASE_URL


class APIError(Exception):
    """A request that did not give a completion."""


class APIConnectionError(APIError):
    def __init__(self, message: str = "Connection error.") -> None:
        super().__init__(message)


class APITimeoutError(APIConnectionError):
    def __init__(self) -> None:
        super().__init__("Request timed out.")


class APIStatusError(APIError):
    """The server answered with an error status; `body` is its parsed JSON (or text)."""

    def __init__(self, message: str, status_code: int, headers: dict[str, str], body: Any) -> None:
        super().__init__(message)
        self.status_code, self.headers, self.body = status_code, headers, body


class BadRequestError(APIStatusError): ...


class AuthenticationError(APIStatusError): ...


class PermissionDeniedError(APIStatusError): ...


class NotFoundError(APIStatusError): ...


class ConflictError(APIStatusError): ...


class UnprocessableEntityError(APIStatusError): ...


class RateLimitError(APIStatusError): ...


class InternalServerError(APIStatusError): ...


_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
              409: ConflictError, 422: UnprocessableEntityError, 429: RateLimitError}  # fmt: skip


def status_error(status: int, headers: dict[str, str], text: str) -> APIStatusError:
    """The SDK's error for a status: its class by code and its message (`Error code: N - <body>`)."""
    text = text.strip()
    try:
        body: Any = json.loads(text)
        message = f"Error code: {status} - {body}"
    except ValueError:
        body, message = text, text or f"Error code: {status}"
    cls = _BY_STATUS.get(status) or (InternalServerError if status >= 500 else APIStatusError)
    return cls(message, status, headers, body)


def retryable(exc: BaseException) -> bool:
    """Worth another attempt: rate limits, server errors, timeouts and dropped connections."""
    if isinstance(exc, APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return False


def base_url(configured: str | None) -> str:
    """The API root: the configured one, else $OPENAI_BASE_URL, else api.openai.com (as the SDK does)."""
    return (configured or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/")


def _proxy_for(root: str) -> str | None:
    """The proxy HTTP(S)_PROXY / NO_PROXY give for the API root, as the SDK's client honoured them.

    Looked up once per session: aiohttp's trust_env would scan the environment on every request.
    """
    import urllib.parse
    import urllib.request

    url = urllib.parse.urlsplit(root)
    if urllib.request.proxy_bypass_environment(url.hostname or ""):
        return None
    return urllib.request.getproxies_environment().get(url.scheme)


class Session:
    """One key's HTTP session: created inside the run's event loop on first use, closed with close()."""

    def __init__(self, root: str, key: str, timeout: float) -> None:
        self.root, self.timeout = root, timeout
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                        "Accept": "application/json", "User-Agent": "ger"}  # fmt: skip
        extra = (("OpenAI-Organization", "OPENAI_ORG_ID"), ("OpenAI-Project", "OPENAI_PROJECT_ID"))
        for header, variable in extra:
            if os.environ.get(variable):  # as the SDK sends them
                self.headers[header] = os.environ[variable]
        self._session: Any = None
        self.proxy = _proxy_for(root)

    def _open(self) -> Any:
        import aiohttp

        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            self._session = aiohttp.ClientSession(headers=self.headers, timeout=timeout)
        return self._session

    async def request(self, method: str, path: str, data: bytes | None = None, timeout: float | None = None):
        """The parsed JSON answer of one request; raises this module's errors, never aiohttp's."""
        import aiohttp

        url = f"{self.root}{path}"
        kwargs: dict[str, Any] = {"data": data, "proxy": self.proxy}
        if timeout is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout)
        try:
            async with self._open().request(method, url, **kwargs) as resp:
                raw = await resp.read()
                status, headers = resp.status, {k.lower(): v for k, v in resp.headers.items()}
        except TimeoutError:
            raise APITimeoutError() from None
        except aiohttp.ClientError as exc:
            raise APIConnectionError(f"Connection error. ({type(exc).__name__})") from None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("HTTP Request: %s %s %d", method, url, status)
        text = raw.decode("utf-8", errors="replace")
        if status >= 400:
            raise status_error(status, headers, text)
        try:
            return json.loads(text)
        except ValueError:
            raise APIError(f"the server answered {status} without JSON: {text[:200]!r}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
