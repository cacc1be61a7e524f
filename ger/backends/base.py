"""The backend interface and its registry.

A backend turns a list of Requests into Responses, batching as it sees fit. New
backends are a class plus one registry line; the config file
`conf/backend/<name>.yaml` names the entry with `name:`. Imports are lazy so that
`import ger` and scoring work without torch or vLLM installed.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TypeVar

from ger.config import plain
from ger.records import Request, Response

T = TypeVar("T")

# Backend config keys read by the pipeline (registry and cache keys), not by the backend itself.
PIPELINE_KEYS = frozenset({"name", "not_in_key", "key_packages"})

# name -> "module:Class"; imported only when that backend is used.
_REGISTRY: dict[str, str] = {
    "vllm": "ger.backends.vllm_offline:VLLMBackend",
    "hf": "ger.backends.hf:HFBackend",
    "server": "ger.backends.server:ServerBackend",
    "openai": "ger.backends.openai_api:OpenAIBackend",
    "ray": "ger.backends.ray_data:RayDataBackend",
}


class FatalBackendError(RuntimeError):
    """A problem every request would hit (a retired, unknown or unserved model): the run stops here.

    Per-request failures stay Response.error; this one ends the run with its message (ger/cli.py),
    instead of a run whose every row is an error and whose score is 0.
    """


class Backend(Protocol):
    """What the pipeline needs from a model backend."""

    def identity(self) -> dict[str, Any]:
        """Everything about the engine that can change an answer (goes into the cache key)."""
        ...

    def generate(self, requests: list[Request]) -> Iterator[Response]:
        """Answer all requests, yielding each response as soon as it is ready.

        Implementations batch internally (never one engine call per sample) and
        report per-request failures as Response.error rather than raising.
        """
        ...

    def close(self) -> None: ...


def read_settings(cls: type[T], backend_cfg: Any, backend: str) -> T:
    """A backend's settings dataclass from its config; unknown keys fail, so typos never pass silently."""
    cfg = plain(backend_cfg)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown {backend} backend keys {unknown}; expected some of {sorted(known)}")
    return cls(**cfg)


def register_backend(name: str, target: str) -> None:
    """Add a backend ("module:Class") under `name`, e.g. from a plugin."""
    _REGISTRY[name] = target


def backend_names() -> Iterable[str]:
    return sorted(_REGISTRY)


def _backend_class(name: str) -> type:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(_REGISTRY)}")
    module_name, cls_name = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def backend_class(name: str) -> type:
    """The class registered as `name` (imported now), for checks that need no instance."""
    return _backend_class(name)


def check_backend(name: str, backend_cfg: Any) -> None:
    """Refuse bad settings (a retired model, an unknown key) before any media is decoded.

    Backends whose settings can be checked without starting anything say so with a
    `check_settings(backend_cfg)` classmethod; the others are checked when they start.
    """
    check = getattr(_backend_class(name), "check_settings", None)
    if check is not None:
        check(backend_cfg)


def create_backend(name: str, backend_cfg: Any, model_cfg: Any) -> Backend:
    """Instantiate the backend registered as `name`."""
    return _backend_class(name)(backend_cfg, model_cfg)
