"""Backend settings: one reader for every backend, and cache keys that hold exactly the settings that
change answers.

Each backend's settings class declares per field whether it changes an answer
(ger/backends/base.py `setting(..., answers=...)`). These tests read the real conf/backend/*.yaml
through Hydra, change each setting in turn and check that the cache key moves exactly when the
setting is declared answer-changing, and that keys stay the ones written before settings were typed.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pytest
from hydra import compose, initialize_config_dir

from ger.answers.modes import answer_mode
from ger.backends.base import _REGISTRY, ANSWERS, key_settings, read_settings, settings_class
from ger.backends.cost import load_pricing
from ger.config import conf_dir, load_group_yaml, plain
from ger.run.cache import request_key
from ger.run.pipeline import key_parts

BACKENDS = sorted(_REGISTRY)

# sha256 of each config's backend key part as computed before the settings classes (2026-12-01,
# when conf/backend/*.yaml listed `not_in_key`); a change here makes every cached answer be asked again.
KEYS_BEFORE = {
    "vllm": "3349e839b4b95f18e26029cb4a90c0c054900fe2e100e67c311cc7cab2459dfc",
    "vllm_cpu": "3349e839b4b95f18e26029cb4a90c0c054900fe2e100e67c311cc7cab2459dfc",
    "hf": "37e41699e21d1aebb170dd0808c00e646697b47d1d0fa5817c404d69d0a879c7",
    "ray": "1126ec6f4918c2ae6f145aa714e107d4704b1db1b5387ef4e5b198be17adf653",
    "server": "48d62a4e1995b986cf822bbb79cd9d3f2f76eb2c17b876475da1b8988e83d7a1",
    "openai": "9a82c03da703bf31a93d5a8589b7101f70fa72ca83580ec49fa645ad7392a292",
}


def parts_of(cfg) -> dict:
    """The pipeline's key parts of a composed config, for a stand-in model identity."""
    return key_parts(cfg, {"model": "m"}, answer_mode(cfg))


def composed(*overrides: str) -> Any:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def backend_cfgs() -> dict[str, dict[str, Any]]:
    """Each conf/backend/<name>.yaml as `ger run backend=<name>` resolves it."""
    return {name: plain(composed(f"backend={name}").backend) for name in BACKENDS}


def other_values(field: str, value: Any, hint: Any) -> list[Any]:
    """Valid-looking values other than `value` for a field typed `hint` (validate() may refuse some)."""
    if field == "pricing":  # a table, not any dict
        return [load_pricing()]
    types = typing.get_args(hint) or (hint,)
    if bool in types:
        return [not value]
    candidates: list[Any] = []
    if int in types:
        candidates += [(value or 0) + 1]
    if float in types:
        candidates += [(value or 0.0) + 0.5]
    if str in types:
        candidates += ["video", "json_schema", "cpu", "gpt-4o-mini", "high", "http://10.0.0.1:9/v1", "other"]
    if dict in types or any(typing.get_origin(t) is dict for t in types):
        candidates += [{"top_k": 1}]
    return [c for c in candidates if c != value]


def changed(name: str, cfg: dict[str, Any], field: str, hint: Any) -> dict[str, Any] | None:
    """`cfg` with `field` set to another value the backend accepts; None when it accepts no other."""
    for value in other_values(field, cfg.get(field), hint):
        try:
            read_settings(settings_class(name), cfg | {field: value}, name)
        except ValueError:
            continue
        return cfg | {field: value}
    return None


@pytest.mark.parametrize("name", BACKENDS)
def test_every_setting_says_whether_it_changes_answers(name: str) -> None:
    undeclared = [f.name for f in dataclasses.fields(settings_class(name)) if ANSWERS not in f.metadata]
    assert undeclared == [], f"{name}: declare answers=True/False for {undeclared}"


@pytest.mark.parametrize("name", BACKENDS)
def test_defaults_match_the_yaml(name: str) -> None:
    """A backend built from a dict without the YAML behaves like one built from the YAML."""
    defaults = {f.name: f.default for f in dataclasses.fields(settings_class(name))}
    defaults |= {
        f.name: f.default_factory()
        for f in dataclasses.fields(settings_class(name))
        if f.default_factory is not dataclasses.MISSING
    }
    written = {k: v for k, v in load_group_yaml("backend", name).items() if k != "name"}
    literal = {k: v for k, v in written.items() if not (isinstance(v, str) and v.startswith("${"))}
    assert set(written) <= set(defaults)
    assert {k: defaults[k] for k in literal} == literal


@pytest.mark.parametrize("name", BACKENDS)
def test_the_key_holds_exactly_the_answer_settings(name: str, backend_cfgs) -> None:
    """Changing a setting declared answer-changing changes the key; changing any other keeps it."""
    cfg, cls = backend_cfgs[name], settings_class(name)
    base = request_key(key_settings(name, cfg))
    hints = typing.get_type_hints(cls)
    moved, kept, untried = set(), set(), []
    for f in dataclasses.fields(cls):
        other = changed(name, cfg, f.name, hints[f.name])
        if other is None:
            untried.append(f.name)
            continue
        (moved if request_key(key_settings(name, other)) != base else kept).add(f.name)
    answers = {f.name for f in dataclasses.fields(cls) if f.metadata[ANSWERS]}
    assert moved == answers - set(untried) and kept == set(f.name for f in dataclasses.fields(cls)) - answers
    assert len(untried) <= 1, untried  # openai: video_as has one valid value (frames go as images)
    assert set(key_settings(name, cfg)) == {"name", *answers, *cls.key_compat}


def test_transport_settings_keep_the_key_through_the_pipeline() -> None:
    """The server moved to another port, with other retries and concurrency, keys as before;
    another temperature does not (`ger run` overrides, composed as the CLI composes them)."""
    base = ["backend=server", "backend.model=served"]
    here = parts_of(composed(*base))
    transport = ["backend.base_url=http://10.1.2.3:8123/v1", "backend.timeout=5", "backend.concurrency=2"]
    moved = parts_of(composed(*base, *transport))
    warmer = parts_of(composed(*base, "sampling.temperature=0.7"))
    assert request_key(moved) == request_key(here) != request_key(warmer)


# Hand-decided: what must key (sampling, numerics, the model asked) and what must not (where and how
# fast answers come), wherever a backend has the setting.
MUST_KEY = {"temperature", "top_p", "seed", "dtype", "max_model_len", "load_format", "model", "extra_body"}
MUST_NOT_KEY = {
    "base_url",
    "timeout",
    "concurrency",
    "max_retries",
    "batch_size",
    "chunk_size",
    "max_cost",
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "tiny_cache_dir",
    "api_key_env",
}


@pytest.mark.parametrize("name", BACKENDS)
def test_sampling_keys_and_transport_does_not(name: str) -> None:
    declared = {f.name: f.metadata[ANSWERS] for f in dataclasses.fields(settings_class(name))}
    assert {k for k in MUST_KEY if k in declared and not declared[k]} == set()
    assert {k for k in MUST_NOT_KEY if declared.get(k)} == set()


@pytest.mark.parametrize("config", sorted(KEYS_BEFORE))
def test_keys_are_those_written_before_settings_were_typed(config: str) -> None:
    cfg = composed(f"backend={config}")
    assert request_key(key_settings(cfg.backend.name, cfg.backend)) == KEYS_BEFORE[config]


def test_engine_versions_key_the_engine_packages() -> None:
    parts = parts_of(composed("backend=hf"))
    assert set(parts["engine"]) == {"transformers", "torch"}


@pytest.mark.parametrize(
    ("name", "cfg", "message"),
    [
        ("vllm", {"chunk_sise": 3}, r"unknown setting 'chunk_sise' for backend 'vllm'"),
        ("hf", {"not_in_key": []}, r"'not_in_key' for backend 'hf'.*settings class now states"),
        ("server", {"timeout": "soon"}, r"backend 'server': timeout must be a number"),
        ("ray", {"device": "tpu"}, r"unknown device 'tpu'"),
    ],
)
def test_bad_settings_fail_naming_the_key_and_backend(name: str, cfg: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_settings(settings_class(name), cfg, name)


def test_numbers_given_as_text_are_read_as_numbers() -> None:
    s = read_settings(settings_class("server"), {"timeout": "2.5", "concurrency": "3"}, "server")
    assert (s.timeout, s.concurrency) == (2.5, 3)
