"""What a run against a paid API will cost, estimated before a single request is sent.

The prices and the per-image token rules live in conf/pricing.yaml. Text is
counted with tiktoken when it is installed and its encoding is available offline,
else as characters / 4. Output is counted at each request's `max_tokens`, so the
estimate is an upper bound: the guard errs toward refusing.
"""

from __future__ import annotations

import datetime
import functools
import math
import re
from dataclasses import dataclass
from typing import Any

from ger.backends.base import FatalBackendError
from ger.backends.chat_format import iter_images, request_text
from ger.records import Request

PER_MESSAGE_TOKENS = 4  # role and separators the chat format adds per message
PER_REQUEST_TOKENS = 3  # the assistant turn's priming


class OverBudgetError(RuntimeError):
    """Raised before a run whose estimated cost exceeds `max_cost`."""


class UnknownModelError(FatalBackendError, ValueError):
    """A model OpenAI has shut down, or one conf/pricing.yaml does not know: refused before any request."""


_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")  # gpt-4o-2024-08-06, gpt-4-1106-...: a dated snapshot


def shutdown_of(model: str, pricing: dict[str, Any]) -> dict[str, Any] | None:
    """The `shutdowns` entry for `model`: its exact name, else its name without a dated snapshot suffix."""
    table = pricing.get("shutdowns") or {}
    return table.get(model) or table.get(_SNAPSHOT.sub("", model))


def _shutdown_date(entry: dict[str, Any]) -> datetime.date:
    return datetime.date.fromisoformat(str(entry["date"]))


def valid_models(pricing: dict[str, Any], today: datetime.date | None = None) -> list[str]:
    """The priced models that are not shut down: what backend.model may be."""
    today = today or datetime.date.today()
    return sorted(
        m for m in pricing["models"] if not ((e := shutdown_of(m, pricing)) and _shutdown_date(e) <= today)
    )


def check_model(
    model: str, pricing: dict[str, Any], allow_unknown: bool = False, today: datetime.date | None = None
) -> str | None:
    """Refuse a shut-down or unpriced model before anything is sent; a warning for a deprecated one.

    A model OpenAI has shut down answers 404 to every request, and one without a price cannot be
    estimated; both would otherwise cost a whole run. `allow_unknown` accepts a model missing from
    the pricing table (a newer one), priced at the highest listed rates (see with_model_price).
    """
    today = today or datetime.date.today()
    choices = f"choose one of {valid_models(pricing, today)} (conf/pricing.yaml), e.g. backend.model=gpt-4o"
    entry = shutdown_of(model, pricing)
    if entry and _shutdown_date(entry) <= today:
        instead = f"; OpenAI recommends {entry['replacement']}" if entry.get("replacement") else ""
        raise UnknownModelError(
            f"backend.model={model!r} was shut down by OpenAI on {entry['date']} (every request would answer "
            f"404 model_not_found{instead}): {choices}"
        )
    if not allow_unknown:
        try:
            model_prices(model, pricing)
        except KeyError:
            raise UnknownModelError(
                f"backend.model={model!r} is not in conf/pricing.yaml, so it is unknown and its cost cannot "
                f"be estimated: {choices}. For a newer model, add its prices to conf/pricing.yaml (or pass "
                "backend.pricing), or set backend.allow_unknown_model=true to price it at the highest "
                "listed rates"
            ) from None
    if entry:
        return f"warning: {model} is deprecated; OpenAI shuts it down on {entry['date']}"
    return None


def with_model_price(model: str, pricing: dict[str, Any]) -> dict[str, Any]:
    """`pricing`, plus an entry for an unpriced `model` at the highest listed rates (an upper bound)."""
    try:
        model_prices(model, pricing)
        return pricing
    except KeyError:
        rates = list(pricing["models"].values())
        top = {k: max(float(r[k]) for r in rates) for k in ("input", "output")} if rates else {}
        if not top:
            raise KeyError(f"conf/pricing.yaml lists no models to price {model!r} from") from None
        return {**pricing, "models": {**pricing["models"], model: top}}


@dataclass(frozen=True)
class CostEstimate:
    model: str
    requests: int
    images: int
    text_tokens: int
    image_tokens: int
    output_tokens: int  # upper bound: sum of max_tokens
    usd: float

    @property
    def input_tokens(self) -> int:
        return self.text_tokens + self.image_tokens

    def summary(self) -> str:
        return (
            f"estimated cost for {self.requests} requests to {self.model}: ${self.usd:.4f} "
            f"(input {self.input_tokens:,} tokens of which {self.image_tokens:,} for {self.images} images; "
            f"output at most {self.output_tokens:,} tokens)"
        )


def model_prices(model: str, pricing: dict[str, Any]) -> dict[str, Any]:
    """The price entry for `model`: an exact name, else the longest listed prefix (dated snapshots)."""
    table = pricing["models"]
    if model in table:
        return table[model]
    prefixes = [name for name in table if model.startswith(name + "-")]
    if not prefixes:
        raise KeyError(f"no price for model {model!r} in conf/pricing.yaml; listed: {sorted(table)}")
    return table[max(prefixes, key=len)]


def _fit(width: int, height: int, box: int) -> tuple[float, float]:
    scale = min(1.0, box / max(width, height))
    return width * scale, height * scale


def tile_tokens(width: int, height: int, rule: dict[str, Any], detail: str) -> int:
    """GPT-4o-style tiles: fit in max_side, shortest side to short_side, base + per_tile per 512 px tile."""
    if detail == "low":
        return int(rule["base"])
    w, h = _fit(width, height, rule.get("max_side", 2048))
    short = rule.get("short_side", 768)
    if min(w, h) > short:
        scale = short / min(w, h)
        w, h = w * scale, h * scale
    tile = rule.get("tile_size", 512)
    tiles = math.ceil(w / tile) * math.ceil(h / tile)
    return int(rule["base"] + rule["per_tile"] * tiles)


def patch_tokens(width: int, height: int, rule: dict[str, Any]) -> int:
    """GPT-4.1-mini-style patches: 32 px patches, shrunk to at most max_patches, times a multiplier."""
    size, cap = rule.get("patch_size", 32), rule.get("max_patches", 1536)
    patches = math.ceil(width / size) * math.ceil(height / size)
    if patches > cap:
        shrink = math.sqrt(cap * size * size / (width * height))
        w, h = width * shrink, height * shrink
        # shrink further so a whole number of patches fits along one side, as the published rule does
        scale = min(max(1, math.floor(w / size)) / (w / size), max(1, math.floor(h / size)) / (h / size))
        w, h = w * scale, h * scale
        patches = min(cap, math.ceil(w / size) * math.ceil(h / size))
    return math.ceil(patches * rule.get("multiplier", 1.0))


def image_tokens(width: int, height: int, rule: dict[str, Any], detail: str = "high") -> int:
    """Input tokens one image costs under a pricing rule; `auto` is counted as `high` (upper bound)."""
    kind = rule.get("kind")
    if kind == "tiles":
        return tile_tokens(width, height, rule, detail)
    if kind == "patches":
        return patch_tokens(width, height, rule)
    if kind == "fixed":
        return int(rule["tokens"])
    raise ValueError(f"unknown image rule kind {kind!r}; expected one of tiles, patches, fixed")


@functools.lru_cache(maxsize=8)
def _encoder(model: str) -> Any:
    """tiktoken's encoder for `model`, or None when tiktoken or its encoding file is unavailable.

    Cached: offline, tiktoken tries (and fails) to download the encoding on every call.
    """
    try:
        import tiktoken

        try:
            return tiktoken.encoding_for_model(model)
        except KeyError:
            return tiktoken.get_encoding("o200k_base")
    except Exception:  # not installed, or the encoding cannot be fetched offline
        return None


def count_text_tokens(text: str, model: str) -> int:
    """tiktoken's count when it is installed and has its encoding locally, else len/4 rounded up."""
    enc = _encoder(model)
    return len(enc.encode(text)) if enc is not None else math.ceil(len(text) / 4)


def estimate_cost(
    requests: list[Request], model: str, pricing: dict[str, Any], detail: str | None = "auto"
) -> CostEstimate:
    """Upper-bound cost of sending `requests` to `model` (prices in USD per 1M tokens)."""
    prices = model_prices(model, pricing)
    rule = prices.get("image") or pricing.get("default_image")
    if rule is None and any(True for r in requests for _ in iter_images(r.messages)):
        raise KeyError(f"no image rule for model {model!r} and no default_image in the pricing table")
    text_tokens = image_tok = n_images = output = 0
    for req in requests:
        text_tokens += count_text_tokens(request_text(req.messages), model)
        text_tokens += PER_REQUEST_TOKENS + PER_MESSAGE_TOKENS * len(req.messages)
        for image in iter_images(req.messages):
            n_images += 1
            image_tok += image_tokens(image.width, image.height, rule, detail or "auto")
        output += req.max_tokens
    usd = ((text_tokens + image_tok) * prices["input"] + output * prices["output"]) / 1e6
    return CostEstimate(model, len(requests), n_images, text_tokens, image_tok, output, usd)


def check_budget(estimate: CostEstimate, max_cost: float | None, allow_over_budget: bool = False) -> None:
    """Refuse (OverBudgetError) when the estimate is above `max_cost`, unless explicitly allowed."""
    if max_cost is None or estimate.usd <= max_cost or allow_over_budget:
        return
    raise OverBudgetError(
        f"{estimate.summary()} is above max_cost=${max_cost:.2f}; raise backend.max_cost, "
        "run fewer samples, or set backend.allow_over_budget=true"
    )


def load_pricing() -> dict[str, Any]:
    """conf/pricing.yaml as a dict."""
    from omegaconf import OmegaConf

    from ger.config import conf_dir

    data = OmegaConf.to_container(OmegaConf.load(conf_dir() / "pricing.yaml"), resolve=True)
    assert isinstance(data, dict)
    return data
