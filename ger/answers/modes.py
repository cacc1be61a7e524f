"""How an answer is obtained and read: the `answer=` modes, one registry entry each.

A mode says
- how samples are laid out in a prompt (`layout`: one sample per request, or the paper's batches),
- what it asks the backend for (`call`: `generate` for text, free or constrained to one label by
  Request.choices; `label_logprobs` for every label's log-probability as the whole answer),
- what it adds to the cache key and the answer budget, and
- how responses become Predictions (`answer` asks and reads, `predict` makes the row).

| answer     | prompt form               | backend call     | read by                                  |
|------------|---------------------------|------------------|------------------------------------------|
| free       | single (rank the labels)  | generate         | parse_ranked (ger/answers/parse.py)      |
| batch      | batch (N samples)         | generate         | parse_batch, split and retry (ask.py)    |
| choice     | constrained (one label)   | generate+choices | parse_ranked of the one label            |
| likelihood | constrained (one label)   | label_logprobs   | softmax over the labels' log-probs       |

`mode=single|batch` and `structured_output=true` are the older spellings and still work:
mode=batch is answer=batch, structured_output=true is answer=choice, neither is answer=free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ger.answers.parse import LabelMatcher, parse_ranked
from ger.backends.label_scores import LabelScores
from ger.errors import UserError
from ger.records import ERROR, OK, Prediction, Request, Response
from ger.run.ask import Asker, ask_batches, settle_batch
from ger.run.cache import ResponseCache

if TYPE_CHECKING:
    from ger.run.stream import Prefetched

Group = tuple[str, ...]
Answered = dict[str, tuple[Request, Response, Any]]  # sample name -> (request, response, its reading)


class AnswerMode:
    """Free text read by the parser (today's single mode); the other modes change one step each."""

    name = "free"
    layout = "single"  # build_request's mode: one sample per request
    call = "generate"  # the Backend method that answers
    constrained = False  # Request.choices = the labels (structured outputs)

    def key_parts(self) -> dict[str, Any]:
        """What the mode adds to every cache key (the older modes' keys stay as they were)."""
        return {"structured_output": self.constrained}

    def candidates(self, labels: list[str]) -> list[str] | None:
        """Labels the backend scores as answers (likelihood), else None."""
        return None

    def max_tokens(self, sampling: Any, n_samples: int) -> int:
        return int(sampling.max_tokens)

    def cached(self, group: Group, key_for: Callable[[Group], Request], cache: ResponseCache | Prefetched,
               matcher: LabelMatcher) -> bool:  # fmt: skip
        """Whether the group is answered from the cache alone (then nothing is decoded)."""
        from ger.run.stream import answered_from_cache

        return answered_from_cache(group, key_for, cache, matcher, self.layout == "batch")

    def answer(self, asker: Asker, requests: list[Request], rebuild: Callable[[Group], Request],
               matcher: LabelMatcher) -> Answered:  # fmt: skip
        """Ask for every request (cache first) and read each answer."""
        answers = asker.ask(requests, desc=self.desc, call=self.call)
        out: Answered = {}
        for req in requests:
            resp = answers[req.key]
            out[req.names[0]] = (req, resp, self.read(resp, req, matcher) if resp.ok else None)
        return out

    desc = "requests"

    def settle(
        self, asker: Asker, req: Request, resp: Response, matcher: LabelMatcher
    ) -> tuple[Any, list[Group]]:
        """One streamed answer's reading, and the groups to ask again instead (only batches split)."""
        return (self.read(resp, req, matcher) if resp.ok else None), []

    def read(self, resp: Response, req: Request, matcher: LabelMatcher) -> Any:
        return parse_ranked(resp.text, matcher)

    def predict(self, name: str, gt: str, req: Request, resp: Response, reading: Any) -> Prediction:
        """predictions.csv's row for one sample."""
        if not resp.ok:
            return Prediction(name, gt, [], ERROR, req.key, resp.error or "empty")
        return Prediction(name, gt, reading.ranked, reading.status, req.key, reading.detail)


class Choice(AnswerMode):
    """Decoding constrained to exactly one label (vLLM structured outputs, the hf logits trie)."""

    name = "choice"
    constrained = True


class Batch(AnswerMode):
    """The paper's batches: N samples per request, read by id; a bad batch is split and asked again."""

    name = "batch"
    layout = "batch"

    def max_tokens(self, sampling: Any, n_samples: int) -> int:
        """Per record x records (never below the single budget)."""
        base = int(sampling.max_tokens)
        per_record = sampling.get("max_tokens_per_record")
        return max(base, int(per_record) * n_samples) if per_record else base

    def answer(self, asker: Asker, requests: list[Request], rebuild: Callable[[Group], Request],
               matcher: LabelMatcher) -> Answered:  # fmt: skip
        return ask_batches(asker, requests, matcher, rebuild)

    def settle(
        self, asker: Asker, req: Request, resp: Response, matcher: LabelMatcher
    ) -> tuple[Any, list[Group]]:
        """A batch that failed, was cut or missed a sample comes back as its two halves to ask again."""
        return settle_batch(asker, req, resp, matcher)

    def predict(self, name: str, gt: str, req: Request, resp: Response, reading: Any) -> Prediction:
        if not resp.ok:
            return Prediction(name, gt, [], ERROR, req.key, resp.error or "empty")
        r = reading.results[name]
        return Prediction(name, gt, r.ranked, r.status, req.key, r.detail)


class Likelihood(AnswerMode):
    """Every label scored as the model's whole answer; no text is generated or parsed.

    The backend returns log P(label tokens | chat-formatted prompt + assistant turn start), summed
    over all the label's tokens, for every label; the probabilities are their softmax over the label
    set (they sum to 1) and the ranking is by probability. Keys carry the mode and the label set.
    """

    name = "likelihood"
    call = "label_logprobs"
    desc = "samples (label log-probs)"

    def key_parts(self) -> dict[str, Any]:
        return {"structured_output": False, "answer": self.name}

    def candidates(self, labels: list[str]) -> list[str] | None:
        return list(labels)

    def max_tokens(self, sampling: Any, n_samples: int) -> int:
        return 1  # nothing is generated; engines that must decode a token decode one

    def read(self, resp: Response, req: Request, matcher: LabelMatcher) -> Any:
        try:
            return LabelScores.from_text(resp.text).probabilities(list(req.candidates or []))
        except ValueError as exc:
            return str(exc)

    def predict(self, name: str, gt: str, req: Request, resp: Response, reading: Any) -> Prediction:
        if not resp.ok or isinstance(reading, str):
            return Prediction(name, gt, [], ERROR, req.key, resp.error or reading or "empty")
        ranked = sorted(reading, key=lambda label: -reading[label])  # stable: ties keep label-set order
        return Prediction(name, gt, ranked, OK, req.key, "", probs=reading)


MODES: dict[str, AnswerMode] = {m.name: m for m in (AnswerMode(), Batch(), Choice(), Likelihood())}


def answer_mode(cfg: Any) -> AnswerMode:
    """The run's mode from `answer=`, or from the older `mode=` / `structured_output=` spellings."""
    legacy_mode = cfg.get("mode") or "single"
    if legacy_mode not in ("single", "batch"):
        raise UserError(f"unknown mode {legacy_mode!r}; expected one of ['single', 'batch'] (or set answer=)")
    structured = bool(cfg.get("structured_output"))
    legacy = "batch" if legacy_mode == "batch" else "choice" if structured else "free"
    name = cfg.get("answer") or legacy
    if name not in MODES:
        raise UserError(f"unknown answer={name!r}; expected one of {list(MODES)}")
    clash = (legacy_mode == "batch" and name != "batch") or (structured and name not in ("choice", "batch"))
    if clash:
        raise UserError(
            f"answer={name} disagrees with mode={legacy_mode} structured_output={str(structured).lower()}; "
            "those are the older spellings of answer= (mode=batch is answer=batch, structured_output=true "
            "is answer=choice): set answer= alone"
        )
    return MODES[name]


def backend_refusal(mode: AnswerMode, backend: str, backend_cls: type) -> str | None:
    """Why `backend` cannot answer in `mode` (said before any media is decoded), or None."""
    if mode.call == "generate" or callable(getattr(backend_cls, mode.call, None)):
        return None
    why = getattr(backend_cls, "no_label_logprobs", "")
    return (
        f"backend={backend} cannot return label log-probabilities, which answer={mode.name} needs"
        f"{f' ({why})' if why else ''}; use backend=vllm, vllm_cpu, hf or server (a vLLM server), "
        "or answer=free|choice|batch"
    )
