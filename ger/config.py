"""Where the config tree lives and how to read one YAML from it outside Hydra."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import yaml

import ger


def conf_dir() -> Path:
    """The `conf/` tree: $GER_CONF_DIR, else the one beside the package (editable installs, Docker)."""
    env = os.environ.get("GER_CONF_DIR")
    path = Path(env) if env else Path(ger.__file__).resolve().parent.parent / "conf"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"ger's config tree was not found at {path}; install ger from its repository with "
            "`pip install -e .` or point GER_CONF_DIR at the repository's conf/ folder"
        )
    return path


def group_names(group: str) -> list[str]:
    """The options of a config group, e.g. group_names("dataset") -> ["abstract", ...]."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@functools.lru_cache(maxsize=256)
def _read(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_group_yaml(group: str, name: str) -> dict[str, Any]:
    """One option of a config group as a plain dict, with a helpful error for typos."""
    path = conf_dir() / group / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown {group} {name!r}; expected one of {group_names(group)}")
    data = copy.deepcopy(_read(path))  # plain YAML: option files use no interpolation
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping, not {type(data).__name__}")
    return data


def cache_dir() -> Path:
    """Root of ger's caches (tiny models, demo data, responses, the reference download)."""
    return Path(os.environ.get("GER_CACHE_DIR", "~/.cache/ger")).expanduser()


def plain(cfg: Any) -> dict[str, Any]:
    """A plain dict from a dict, an OmegaConf node (resolved) or None; configs cross stages this way."""
    if cfg is None:
        return {}
    if hasattr(cfg, "_metadata"):  # an OmegaConf node; imported only when one is given
        from omegaconf import OmegaConf

        return dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    return dict(cfg)
