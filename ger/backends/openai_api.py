"""Backend `openai`: GPT-4o / GPT-4V through the OpenAI API, with a cost guard and key hygiene.

It is the `server` backend pointed at api.openai.com (or at $OPENAI_BASE_URL),
plus three things a paid API needs:

- keys come from the environment only (`OPENAI_API_KEY`, or several in
  `OPENAI_API_KEYS=key1,key2`, rotated when one hits its rate limit, as the
  paper did), and are scrubbed from every error message;
- before anything is sent the run is priced (ger/backends/cost.py, conf/pricing.yaml),
  the estimate printed, and the run refused above `max_cost` unless
  `allow_over_budget=true`; the tokens actually billed so far count too;
- videos always go as frames (the API takes no video input);
- a model OpenAI has shut down (conf/pricing.yaml `shutdowns`) or one the pricing table does not
  know is refused before anything is sent, listing the valid choices (`allow_unknown_model=true`
  accepts a newer model, priced at the highest listed rates); a 404 "model not found" from the API
  stops the run with one message (server.py) instead of a run of error rows.

Failed requests come back as Response.error; the cache never stores those.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

from ger.backends.base import setting
from ger.backends.cost import (
    CostEstimate,
    check_budget,
    check_model,
    estimate_cost,
    load_pricing,
    model_prices,
    with_model_price,
)
from ger.backends.server import ServerBackend, ServerSettings
from ger.records import Request

log = logging.getLogger(__name__)
_WARNED: set[str] = set()


@dataclass(frozen=True)
class OpenAISettings(ServerSettings):
    """conf/backend/openai.yaml, typed: the server settings with OpenAI's defaults and the cost guard.

    The cost guard, like transport and keys, changes whether a run goes ahead, never an answer.
    """

    base_url: str | None = setting(None, answers=False)  # the SDK default: $OPENAI_BASE_URL, else OpenAI
    model: str | None = setting("gpt-4o-2024-08-06", answers=True)
    api_key_env: str | None = setting("OPENAI_API_KEY", answers=False)
    api_keys_env: str | None = setting("OPENAI_API_KEYS", answers=False)
    concurrency: int = setting(8, answers=False)
    timeout: float = setting(120.0, answers=False)
    max_retries: int = setting(6, answers=False)
    retry_initial: float = setting(2.0, answers=False)
    video_metadata: bool = setting(False, answers=False)  # frames always go as images: never sent
    structured_outputs: str = setting("none", answers=True)  # the paper's free answer; json_schema constrains
    max_tokens_param: str = setting("max_completion_tokens", answers=True)
    image_detail: str | None = setting("auto", answers=True)
    max_cost: float | None = setting(5.0, answers=False)  # USD per generate() call; None: no limit
    allow_over_budget: bool = setting(False, answers=False)
    pricing: dict[str, Any] | None = setting(None, answers=False)  # None: conf/pricing.yaml
    allow_unknown_model: bool = setting(False, answers=False)  # accept a model the pricing table lacks

    key_compat = {
        "not_in_key": ["base_url", "api_key_env", "api_keys_env", "concurrency", "timeout", "max_retries",
                       "retry_initial", "retry_max", "key_rest_seconds", "max_cost", "allow_over_budget",
                       "pricing", "allow_unknown_model"]
    }  # fmt: skip

    def validate(self) -> None:
        super().validate()
        if self.video_as != "images":
            raise ValueError("the OpenAI API takes no video input; use video_as=images (frames as images)")
        if self.structured_outputs in ("vllm", "guided"):
            raise ValueError(
                f"structured_outputs={self.structured_outputs!r} is vLLM-only; use json_schema or none"
            )
        if not self.model:
            raise ValueError("backend `openai` needs `model` (e.g. gpt-4o)")
        warning = check_model(self.model, self.pricing or load_pricing(), self.allow_unknown_model)
        if warning and warning not in _WARNED:  # deprecated, not yet shut down: say so once, at the start
            _WARNED.add(warning)  # settings are read more than once a run (check, cache key, start)
            print(warning, file=sys.stderr, flush=True)
            log.warning(warning)


class OpenAIBackend(ServerBackend):
    """The server backend with OpenAI's keys, prices and limits (see the module docstring)."""

    backend_name = "openai"
    settings_class = OpenAISettings
    takes_stream = False  # the cost guard prices every request of a call before it sends one
    settings: OpenAISettings
    # answer=likelihood is refused before anything is decoded (ger/answers/modes.py backend_refusal)
    label_logprobs = None  # type: ignore[assignment]
    no_label_logprobs = "the OpenAI API returns no prompt log-probabilities"

    def __init__(self, backend_cfg: Any, model_cfg: Any = None) -> None:
        super().__init__(backend_cfg, model_cfg)
        pricing = self.settings.pricing or load_pricing()
        # settings.validate() refused a shut-down or unknown model; an allowed unknown one gets top rates
        self.pricing = with_model_price(self.model, pricing) if self.settings.allow_unknown_model else pricing
        self.last_estimate: CostEstimate | None = None

    def _model_name(self, model_cfg: Any) -> str:
        assert self.settings.model
        return self.settings.model

    def _not_found_hint(self) -> str:
        return " (conf/pricing.yaml lists the models this adapter knows and the ones OpenAI shut down)"

    def _read_keys(self) -> list[str]:
        keys = super()._read_keys()
        log.info("using %d OpenAI key(s) from the environment", len(keys))
        return keys

    def spent_usd(self) -> float:
        """What the tokens billed so far (from the API's usage reports) cost."""
        prices = model_prices(self.model, self.pricing)
        return (
            self.usage["prompt_tokens"] * prices["input"] + self.usage["completion_tokens"] * prices["output"]
        ) / 1e6

    def before_run(self, requests: list[Request]) -> None:
        """Price the run, print the estimate, refuse above max_cost (counting what was already spent)."""
        if not requests:
            return
        s = self.settings
        estimate = estimate_cost(requests, self.model, self.pricing, s.image_detail)
        self.last_estimate = estimate
        spent = self.spent_usd()
        message = estimate.summary() + (f"; already spent this session: ${spent:.2f}" if spent else "")
        print(message, file=sys.stderr, flush=True)
        log.info(message)
        limit = None if s.max_cost is None else s.max_cost - spent
        check_budget(estimate, limit, s.allow_over_budget)
