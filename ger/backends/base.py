"""The backend interface and its registry.

A backend turns a list of Requests into Responses, batching as it sees fit. New
backends are a class plus one registry line; the config file
`conf/backend/<name>.yaml` names the entry with `name:`. Imports are lazy so that
`import ger` and scoring work without torch or vLLM installed.

Settings: each backend class names a frozen dataclass (`settings_class`, a BackendSettings)
whose fields are the keys of its conf/backend/<name>.yaml, each declared with
`setting(default, answers=...)`: whether it changes an answer. `read_settings` is the one
way a config becomes settings (unknown keys fail, naming the key and the backend), and
`key_settings` is what of them goes into every cache key: the backend's name and the
settings that change answers, never transport, placement or speed.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Protocol, TypeVar

from ger.config import plain
from ger.records import Request, Response

S = TypeVar("S", bound="BackendSettings")

ANSWERS = "answers"  # field metadata: does this setting change an answer (so belong in cache keys)?
# Keys conf/backend/*.yaml held before the settings classes said what changes answers.
_RETIRED = {
    "not_in_key": "each backend's settings class now states which settings change answers",
    "key_packages": "each backend's settings class now names its engine packages (key_packages)",
}

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


def cut_by_context(finish_reason: str | None, completion_tokens: int | None, max_tokens: int | None) -> bool:
    """Whether an answer stopped for length before its own max_tokens (Response.context_cut).

    vLLM, served or offline, clamps max_tokens to max_model_len minus the prompt: such an answer is
    what the engine's context limit left, which a larger max_model_len would let go on."""
    if finish_reason != "length" or completion_tokens is None or max_tokens is None:
        return False
    return completion_tokens < max_tokens


class Backend(Protocol):
    """What the pipeline needs from a model backend."""

    settings_class: ClassVar[type[BackendSettings]]  # its conf/backend/<name>.yaml, typed (see above)

    def generate(self, requests: list[Request]) -> Iterator[Response]:
        """Answer all requests, yielding each response as soon as it is ready.

        Implementations batch internally (never one engine call per sample) and
        report per-request failures as Response.error rather than raising.
        """
        ...

    def close(self) -> None: ...


def setting(
    default: Any = dataclasses.MISSING, *, answers: bool, factory: Callable[[], Any] | None = None
) -> Any:
    """A settings field that says whether it changes an answer; `factory` for mutable defaults.

    answers=True: the setting goes into every cache key (sampling, dtype, how media are encoded);
    answers=False: it changes where, how fast or how reliably answers come (ports, retries,
    batch sizes, GPU placement), so a rerun with another value is answered from the cache.
    """
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={ANSWERS: answers})
    return dataclasses.field(default=default, metadata={ANSWERS: answers})


@dataclasses.dataclass(frozen=True)
class BackendSettings:
    """Base of every backend's settings dataclass (conf/backend/<name>.yaml, typed)."""

    # packages whose installed versions go into cache keys: an engine upgrade can change answers
    key_packages: ClassVar[tuple[str, ...]] = ()
    # fixed entries of the key's backend part; the backends that keyed a YAML `not_in_key` list
    # keep that list here verbatim, so answers cached before settings were typed stay valid
    key_compat: ClassVar[dict[str, Any]] = {}

    def validate(self) -> None:
        """Refuse values no run can use (read_settings calls it); subclasses add their checks."""

    def wire_quality(self) -> int | None:
        """The JPEG quality at which the backend sends images over HTTP, or None when it takes pixels.

        Where it sends encoded images, the decoding workers encode them (ger/run/stream.py), so pixels
        never cross to ger's main process, which has the requests to build and send."""
        return None

    def answer_settings(self) -> dict[str, Any]:
        """The settings that change an answer. A field that does not say counts as one (safe: a rerun
        asks again rather than reusing an answer given under other settings)."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get(ANSWERS, True)
        }


def read_settings(cls: type[S], backend_cfg: Any, backend: str) -> S:
    """A backend's settings from its config (a dict or DictConfig): the one way every backend reads them.

    `name` is the registry's; unknown keys fail, naming the key and the backend, so typos never pass
    silently; numbers given as strings are converted, anything else in a number field fails.
    """
    cfg = {k: v for k, v in plain(backend_cfg).items() if k != "name"}
    known = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(cfg) - known):
        why = f" ({_RETIRED[key]}; delete it)" if key in _RETIRED else ""
        raise ValueError(
            f"unknown setting {key!r} for backend {backend!r} (conf/backend/{backend}.yaml){why}; "
            f"expected some of {sorted(known)}"
        )
    hints = typing.get_type_hints(cls)
    settings = cls(**{k: _number(v, hints[k], k, backend) for k, v in cfg.items()})
    settings.validate()
    return settings


def _number(value: Any, hint: Any, key: str, backend: str) -> Any:
    """`value` for a field typed `hint`: numbers given as strings become numbers (ints stay ints, so
    keys stay as they were); a number field holding anything else is an error."""
    types = typing.get_args(hint) or (hint,)
    numeric = [t for t in (int, float) if t in types]
    if not numeric or value is None or str in types or Any in types:
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    for kind in numeric if isinstance(value, str) else ():
        try:
            return kind(value)
        except ValueError:
            continue
    raise ValueError(f"backend {backend!r}: {key} must be a number, got {value!r}")


def backend_class(name: str) -> type:
    """The class registered as `name` (imported now), for checks that need no instance."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(_REGISTRY)}")
    module_name, cls_name = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def settings_class(name: str) -> type[BackendSettings]:
    """The settings dataclass of the backend registered as `name`."""
    return backend_class(name).settings_class


def check_backend(name: str, backend_cfg: Any) -> BackendSettings:
    """Refuse bad settings (a retired model, an unknown key) before any media is decoded."""
    return read_settings(settings_class(name), backend_cfg, name)


def key_settings(name: str, backend_cfg: Any) -> dict[str, Any]:
    """The backend's part of every cache key: its name and the settings that change answers."""
    cls = settings_class(name)
    return {"name": name, **read_settings(cls, backend_cfg, name).answer_settings(), **cls.key_compat}


def create_backend(name: str, backend_cfg: Any, model_cfg: Any) -> Backend:
    """Instantiate the backend registered as `name`."""
    return backend_class(name)(backend_cfg, model_cfg)
