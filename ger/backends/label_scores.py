"""What a likelihood answer holds: each candidate label's log-probability as the model's whole answer.

`Backend.label_logprobs(requests)` answers a Request whose `candidates` are the label set with one
Response per request; its `text` is the JSON of a LabelScores, so the response cache stores it like
any answer and a rerun reads it back without the engine. A label's log-probability is the sum over
all of its tokens of log P(token | chat-formatted prompt, assistant turn start, earlier label tokens).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field


@dataclass
class LabelScores:
    """Per label: summed log-probability and how many tokens it took (label-set order)."""

    logprobs: dict[str, float]
    tokens: dict[str, int]
    # per label, prompt tokens the engine served from its prefix cache (offline vLLM only; for the
    # record: it shows that the prompt and media were encoded once per sample, not once per label)
    prefix_cached: dict[str, int] = field(default_factory=dict)

    def to_text(self) -> str:
        data = {"logprobs": self.logprobs, "tokens": self.tokens}
        if self.prefix_cached:
            data["prefix_cached"] = self.prefix_cached
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_text(cls, text: str) -> LabelScores:
        """Read a cached answer; ValueError when it is not a likelihood answer."""
        try:
            data = json.loads(text)
            logprobs = {str(k): float(v) for k, v in data["logprobs"].items()}
            tokens = {str(k): int(v) for k, v in data["tokens"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a likelihood answer ({type(exc).__name__}: {exc})") from None
        return cls(logprobs, tokens, {str(k): int(v) for k, v in data.get("prefix_cached", {}).items()})

    def probabilities(self, labels: list[str]) -> dict[str, float]:
        """Softmax of the log-probabilities over `labels` (in their order): sums to 1."""
        missing = [label for label in labels if label not in self.logprobs]
        if missing:
            raise ValueError(f"no log-probability for labels {missing}; scored {list(self.logprobs)}")
        values = [self.logprobs[label] for label in labels]
        top = max(values)
        weights = [math.exp(v - top) for v in values]  # shifted by the max: no overflow, same softmax
        total = math.fsum(weights)
        return {label: w / total for label, w in zip(labels, weights, strict=True)}


def tail_matches(prompt_ids: list[int], label_ids: list[int]) -> bool:
    """Whether the engine's prompt ends with exactly the label's own tokens (no merge at the seam)."""
    return bool(label_ids) and list(prompt_ids[-len(label_ids) :]) == list(label_ids)


def seam_error(label: str) -> str:
    return (
        f"label {label!r} does not tokenize on its own at the end of the prompt (its tokens merge with "
        "the assistant turn start), so its log-probability cannot be read; use answer=choice for this model"
    )
