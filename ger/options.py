"""Checks of the scalar `ger run` / `ger prepare` options before anything is read or asked.

Hydra parses `limit=abc` as the string "abc" and `greyscale=maybe` as "maybe" (which is truthy):
without a check the first fails later with an error that names no option and the second silently
turns greyscale on. Each check names the option and its valid values.
"""

from __future__ import annotations

from typing import Any

from ger.errors import UserError

# option -> (kind, may be null); kinds: "bool", "count" (a whole number >= 1)
OPTIONS: dict[str, tuple[str, bool]] = {
    "limit": ("count", True),
    "frames": ("count", False),
    "batch_size": ("count", True),
    "greyscale": ("bool", False),
    "progress": ("bool", False),
    "structured_output": ("bool", False),
    "follow_symlinks": ("bool", False),
}


def check_option(name: str, value: Any) -> None:
    """Raise UserError naming `name` and its valid values when `value` is not one of them."""
    kind, nullable = OPTIONS[name]
    if value is None and nullable:
        return
    null = " or null" if nullable else ""
    if kind == "bool" and not isinstance(value, bool):
        raise UserError(f"option {name}={value!r} is not valid; expected true or false")
    if kind == "count" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        hint = " (null runs every sample)" if name == "limit" else ""
        raise UserError(f"option {name}={value!r} is not valid; expected a whole number >= 1{null}{hint}")


def check_options(cfg: Any) -> None:
    """Check every option of OPTIONS present in `cfg` (a DictConfig or a dict)."""
    for name in OPTIONS:
        if name in cfg:
            check_option(name, cfg[name])
