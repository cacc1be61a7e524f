"""answer=likelihood on the offline vLLM engine: every label's log-probability as the whole answer.

One engine request per (sample, label): the chat-templated prompt with the label appended, the
sample's media, `prompt_logprobs=0` (the log-probability of each prompt token itself) and
`max_tokens=1`. The label's log-probability is the sum over its tokens, which are checked to be
the last tokens of the prompt the engine saw.

The prompt and media are encoded once per sample through vLLM's prefix cache (its block hashes
cover the media by content): a sample's first label runs alone, and its other labels are sent
after it, so they find its blocks cached (whole KV blocks: the prompt up to the last full block;
vLLM's encoder cache holds the media's embeddings for the rest). vLLM skips prefix-cache reads
for prompt-logprob requests by default, because a cached token gets no log-probability; here only
the label tokens need one, so reads are allowed (`skip_reading_prefix_cache=False`) and
`num_cached_tokens` is checked: a label whose own tokens came from the cache is scored again
without it. `detokenize=False` keeps vLLM from decoding the (unset) rows of cached tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ger.backends.label_scores import LabelScores, seam_error, tail_matches
from ger.records import Request, Response


@dataclass
class _Sample:
    """One request being scored: its prompt, its labels' token ids, and what came back so far."""

    request: Request
    prompt: dict[str, Any]
    label_ids: dict[str, list[int]]
    start: float
    logprobs: dict[str, float] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    def response(self) -> Response:
        seconds = time.perf_counter() - self.start
        if self.error:
            return Response(key=self.request.key, error=self.error, seconds=seconds)
        tokens = {label: len(ids) for label, ids in self.label_ids.items()}
        scores = LabelScores(self.logprobs, tokens, self.cached)
        return Response(key=self.request.key, text=scores.to_text(), seconds=seconds, finish_reason="stop")


def label_logprobs(backend: Any, requests: list[Request]) -> Iterator[Response]:
    """Score every request's candidates on `backend` (a VLLMBackend); one Response per request."""
    tokenizer = getattr(backend._processor, "tokenizer", backend._processor)
    labels_per = max(1, max((len(r.candidates or []) for r in requests), default=1))
    per_chunk = max(1, backend.settings.chunk_size // labels_per)  # engine requests in one call
    for lo in range(0, len(requests), per_chunk):
        samples: list[_Sample] = []
        for req in requests[lo : lo + per_chunk]:
            try:
                labels = list(req.candidates or [])
                if not labels:
                    raise ValueError("no candidate labels to score")
                ids = {label: tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels}
                samples.append(_Sample(req, backend.engine_prompt(req), ids, time.perf_counter()))
            except Exception as exc:  # bad media or too many items: this request only
                yield Response(key=req.key, error=f"{type(exc).__name__}: {exc}")
        first = [(s, next(iter(s.label_ids))) for s in samples]
        _score(backend, first, reuse=True)  # each sample's prompt and media go into the prefix cache
        rest = [(s, label) for s in samples if not s.error for label in list(s.label_ids)[1:]]
        stale = _score(backend, rest, reuse=True)
        _score(backend, stale, reuse=False)
        for s in samples:
            yield s.response()


def _params(reuse: bool) -> Any:
    from vllm import SamplingParams

    return SamplingParams(
        temperature=0.0,
        max_tokens=1,
        prompt_logprobs=0,
        detokenize=False,
        skip_reading_prefix_cache=not reuse,
    )


def _score(backend: Any, jobs: list[tuple[_Sample, str]], reuse: bool) -> list[tuple[_Sample, str]]:
    """Run the jobs in one engine call (halving to isolate a prompt vLLM rejects); the jobs whose
    label tokens were served from the prefix cache (no log-probability computed) come back."""
    from vllm.exceptions import VLLMClientError

    if not jobs:
        return []
    prompts = [s.prompt | {"prompt": s.prompt["prompt"] + label} for s, label in jobs]
    try:
        outputs = backend.llm.generate(prompts, [_params(reuse)] * len(jobs), use_tqdm=False)
    except (VLLMClientError, ValueError, TypeError) as exc:  # input rejected before any ran
        if len(jobs) == 1:
            jobs[0][0].error = f"{type(exc).__name__}: {exc}"
            return []
        half = len(jobs) // 2
        return _score(backend, jobs[:half], reuse) + _score(backend, jobs[half:], reuse)
    stale = []
    for (sample, label), out in zip(jobs, outputs, strict=True):
        ids, want = list(out.prompt_token_ids or []), sample.label_ids[label]
        if not tail_matches(ids, want):
            sample.error = seam_error(label)
            continue
        first = len(ids) - len(want)  # the label's first token; its log-probability needs row first - 1
        cached = int(out.num_cached_tokens or 0)
        if cached > first - 1:
            stale.append((sample, label))
            continue
        rows = out.prompt_logprobs  # indexed from the end: some runners return no rows for cached tokens
        try:
            sample.logprobs[label] = sum(rows[p - len(ids)][ids[p]].logprob for p in range(first, len(ids)))
        except (TypeError, KeyError, IndexError) as exc:
            sample.error = f"vLLM returned no prompt log-probability for label {label!r} ({exc!r})"
        sample.cached[label] = cached
    return stale
