"""`ger run` and `ger prepare`: the stages in data-flow order.

manifest -> sample loader -> prompt -> backend (through the response cache) -> parser
-> metrics -> report. Per-sample problems (unreadable media, failed requests) are
recorded in predictions.csv and counted; they never end the run.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm import tqdm

from ger.answers.parse import LabelMatcher, parse_ranked
from ger.backends import check_backend, create_backend
from ger.backends.models import ModelSpec, resolve_model
from ger.config import plain
from ger.data.datasets import DatasetSpec, load_samples, spec_from_dict
from ger.data.digests import DigestTable, use_table
from ger.data.media import MediaError, decode, describe_sample
from ger.data.validate import check_dataset
from ger.options import check_option, check_options
from ger.prompting.batching import batch_order, plan_batches, summarise, write_order
from ger.prompting.prompts import build_request
from ger.prompting.release_prompts import select_template
from ger.records import ERROR, LoadedSample, Prediction, Request, Response, Sample
from ger.run.ask import Asker, ask_batches, settle_batch
from ger.run.cache import ResponseCache
from ger.run.predictions import PartialPredictions
from ger.run.run_files import write_run_files
from ger.run.stream import (
    Decoder,
    DecodeSpec,
    Feed,
    StreamStats,
    answered_from_cache,
    window_size,
    worker_count,
)
from ger.scoring.views import score_run

log = logging.getLogger("ger")


def resolve_spec(cfg: DictConfig) -> tuple[DatasetSpec, Path]:
    """The dataset spec from the composed config, and its data root (demo data made on demand)."""
    spec = spec_from_dict(plain(cfg.dataset))
    data_root = Path(str(cfg.data_root)).expanduser()
    if spec.demo and not (spec.root(data_root) / spec.layout.label_file).is_file():
        from ger.data.demo import ensure_demo

        data_root = ensure_demo(Path(str(cfg.cache_dir)).expanduser() / "demo")
    return spec, data_root


def label_file(spec: DatasetSpec, data_root: Path) -> str:
    """The label list's path as problems are reported against it."""
    return str(spec.root(data_root) / spec.layout.label_file)


def read_samples(cfg: DictConfig, spec: DatasetSpec, data_root: Path) -> list[Sample]:
    """The label list's samples; links out of the data root are followed only with follow_symlinks=true."""
    return load_samples(spec, data_root, follow_symlinks=bool(cfg.get("follow_symlinks", False)))


def select(samples: list[Sample], limit: int | None, shard: str | None) -> list[Sample]:
    """`shard=i/n` keeps every n-th sample from i (one engine per GPU); `limit` keeps the first N.

    limit=0 or a negative limit is an error, not "everything" or "all but the last": a smoke test
    that silently ran the whole set (or dropped samples) would be worse than no run.
    """
    check_option("limit", limit)
    if shard:
        try:
            i, n = (int(x) for x in str(shard).split("/"))
            assert 0 <= i < n
        except (ValueError, AssertionError):
            raise ValueError(f"shard must look like i/n with 0 <= i < n, got {shard!r}") from None
        samples = samples[i::n]
    return samples if limit is None else samples[:limit]


def modality_plan(cfg: DictConfig, spec: DatasetSpec) -> tuple[str, str]:
    """(prompt modality, template name): the multimodal ablations swap the template with the inputs."""
    if spec.modality != "video+text":
        if cfg.modality not in (None, "video"):
            raise ValueError(
                f"dataset {spec.key} has no transcripts; modality must stay null, not {cfg.modality!r}"
            )
        return "visual", cfg.prompt or spec.prompt
    modality = cfg.modality or "multi"
    if modality not in cfg.modality_prompts:
        raise ValueError(f"unknown modality {modality!r}; expected one of {list(cfg.modality_prompts)}")
    return ("visual" if modality == "video" else modality), cfg.prompt or cfg.modality_prompts[modality]


def load_media(cfg: DictConfig, spec: DatasetSpec, samples: list[Sample], modality: str):
    """Decode every sample at once (benchmarks/bench_gpu_throughput.py builds all requests up front;
    `ger run` streams instead); the ones that fail become error predictions instead of ending the run."""
    shells, errors = describe_media(cfg, spec, samples, modality)
    loaded: list[LoadedSample] = []
    for name, shell in tqdm(shells.items(), desc="loading media", unit="sample", disable=not cfg.progress):
        try:
            loaded.append(decode(shell, spec.layout.media_kind, frames=cfg.frames, sampler=cfg.sampler,
                                 greyscale=cfg.greyscale))  # fmt: skip
        except (MediaError, OSError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    return loaded, errors


def describe_media(cfg: DictConfig, spec: DatasetSpec, samples: list[Sample], modality: str):
    """Every sample as far as its cache key needs, no pixels decoded; failures become error rows."""
    shells: dict[str, LoadedSample] = {}
    errors: dict[str, str] = {}
    for s in samples:
        try:
            shells[s.name] = describe_sample(
                s,
                spec.layout.media_kind,
                frames=cfg.frames,
                sampler=cfg.sampler,
                greyscale=cfg.greyscale,
                with_text=modality in ("text", "multi"),
                with_visual=modality != "text",
            )
        except (MediaError, OSError) as exc:
            errors[s.name] = f"{type(exc).__name__}: {exc}"
    return shells, errors


def engine_versions(packages: list[str]) -> dict[str, str]:
    """Installed versions of the engine's packages: an engine upgrade can change answers."""
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def key_parts(cfg: DictConfig, model_identity: dict[str, Any]) -> dict[str, Any]:
    """Everything outside the prompt that changes an answer; the cache key hashes it."""
    skip = set(cfg.backend.get("not_in_key", []))
    backend = {k: v for k, v in plain(cfg.backend).items() if k not in skip}
    return {
        "engine": engine_versions(list(cfg.backend.get("key_packages", []))),
        "model": model_identity,
        "backend": backend,
        # the batch budget reaches the key as the request's max_tokens; single-mode keys stay as they were
        "sampling": {k: v for k, v in plain(cfg.sampling).items() if k != "max_tokens_per_record"},
        "structured_output": bool(cfg.structured_output and cfg.mode == "single"),
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate one model on one test set; writes the run folder and returns metrics.json's content."""
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    check_options(cfg)
    spec, data_root = resolve_spec(cfg)
    modality, template_name = modality_plan(cfg, spec)
    template = select_template(template_name, spec.labels, cfg.prompt_source, cfg.release_dir)
    samples = read_samples(cfg, spec, data_root)
    check_dataset(spec, samples, media=False, label_file=label_file(spec, data_root)).raise_for_labels()
    label_rank = {s.name: i for i, s in enumerate(samples)}  # predictions.csv keeps the label file's order
    if cfg.mode == "batch":  # one fixed shuffle, so batches (and `limit` runs) are class-mixed
        by_name = {s.name: s for s in samples}
        samples = [by_name[n] for n in batch_order(list(by_name), cfg.batch_seed, cfg.get("batch_order"))]
    samples = select(samples, cfg.limit, cfg.shard)
    check_backend(cfg.backend.name, cfg.backend)  # a refused model stops the run before any decoding
    model = resolve_model(cfg.model, cfg.cache_dir)
    cache_dir = Path(str(cfg.cache_dir)).expanduser()
    table = DigestTable(cache_dir / "file_digests.sqlite")
    use_table(table)
    try:
        shells, errors = describe_media(cfg, spec, samples, modality)
    finally:
        use_table(None)
        table.close()

    parts = key_parts(cfg, model.identity())
    mode, frames_as = str(cfg.mode), str(cfg.frames_as)  # read once: a config lookup costs ~0.1 ms
    budgets: dict[int, int] = {}

    def request_for(by_name: dict[str, LoadedSample], names: tuple[str, ...], key_only: bool) -> Request:
        if len(names) not in budgets:
            budgets[len(names)] = answer_budget(cfg, len(names))
        return build_request(
            [by_name[n] for n in names],
            template,
            spec.labels,
            mode=mode,
            frames_as=frames_as,
            key_parts=parts,
            max_tokens=budgets[len(names)],
            modality=modality,
            key_only=key_only,
        )

    stream_cfg = cfg.get("stream") or {}
    stats = StreamStats(window_size(stream_cfg, cfg.backend), worker_count(stream_cfg))
    decode_spec = DecodeSpec(spec.layout.media_kind, int(cfg.frames), str(cfg.sampler), bool(cfg.greyscale))
    decoder = Decoder(decode_spec, stats, cfg.progress)
    cache = ResponseCache(cache_dir / "responses.sqlite")
    asker = Asker(cache, lambda: create_backend(cfg.backend.name, cfg.backend, model), cfg.progress)
    partial = PartialPredictions(out)  # rows as they are parsed; predictions.csv replaces it at the end
    try:
        preds, batching = predict(
            cfg, spec, shells, request_for, asker, model, modality, out, decoder, errors, partial.add
        )
    finally:
        decoder.close()
        asker.close()
        cache.close()
        partial.close(remove=False)
    preds += [Prediction(s.name, s.gt, [], ERROR, "", errors[s.name]) for s in samples if s.name in errors]
    preds.sort(key=lambda p: label_rank[p.name])
    log.info("stream: %s", stats.to_dict())

    result = score_run(preds, spec, cfg.modality, cfg.greyscale)  # every view: all vs paper's rows, ...
    overrides = list(HydraConfig.get().overrides.task)
    meta = write_run_files(
        out, cfg, spec, preds, result, overrides, asker.stats, batching=batching, stream=stats.to_dict()
    )
    partial.close(remove=True)
    print(
        f"{spec.key}: "
        + ", ".join(f"{m} {v:.2f}" for m, v in result.values.items())
        + f" (n={result.n}, parse failures {result.parse_failure_rate:.2f}%, "
        f"cached {asker.stats.cached}, sent {asker.stats.sent}, decoded {stats.decoded}) -> {out}",
        file=sys.stderr,
    )
    return meta


def answer_budget(cfg: DictConfig, n_samples: int) -> int:
    """max_tokens of one request: single mode's budget, or per record x records (never less) in batch mode."""
    base = int(cfg.sampling.max_tokens)
    if cfg.mode != "batch":
        return base
    per_record = cfg.sampling.get("max_tokens_per_record")
    return max(base, int(per_record) * n_samples) if per_record else base


def paper_batch_size(cfg: DictConfig, spec: DatasetSpec, modality: str) -> int:
    """The paper's batch size; the multimodal sets' text and video ablations used other sizes."""
    sizes = cfg.get("modality_batch_sizes") or {}
    ablation = {"text": "text", "visual": "video"}.get(modality) if spec.modality == "video+text" else None
    return int(sizes.get(ablation) or spec.batch_size) if ablation else spec.batch_size


def predict(
    cfg: DictConfig,
    spec: DatasetSpec,
    shells: dict[str, LoadedSample],
    request_for: Callable[[dict[str, LoadedSample], tuple[str, ...], bool], Request],
    asker: Asker,
    model: ModelSpec,
    modality: str,
    out: Path | None,
    decoder: Decoder,
    errors: dict[str, str],
    on_rows: Callable[[list[Prediction]], None] = lambda preds: None,
) -> tuple[list[Prediction], dict[str, Any] | None]:
    """Prompt, ask and parse, in single or batch mode, streamed (ger/run/stream.py); also what batch mode
    did (None in single mode). Samples whose media fail to decode are added to `errors`; each sample's
    prediction goes to on_rows as soon as its answer is parsed."""
    if cfg.mode not in ("single", "batch"):
        raise ValueError(f"unknown mode {cfg.mode!r}; expected one of ['single', 'batch']")
    batch = cfg.mode == "batch"
    names = list(shells)
    gts = {n: ls.sample.gt for n, ls in shells.items()}
    matcher = LabelMatcher(spec.labels, spec.aliases)
    if batch:
        size = paper_batch_size(cfg, spec, modality)
        order = (int(cfg.batch_seed), cfg.get("batch_order"))
        plan = plan_batches(size, cfg.batch_size, model, list(shells.values()), cfg.frames_as, order)
        groups = plan.cut(names)
        if out is not None:
            write_order(out / "order.csv", groups)
        if plan.cap:
            log.warning("batch mode: %s (the paper used %d)", plan.cap, plan.paper_size)
    else:
        groups = [(n,) for n in names]

    def key_for(group: tuple[str, ...]) -> Request:
        return request_for(shells, group, True)

    cached = [g for g in groups if answered_from_cache(g, key_for, asker.cache, matcher, batch)]
    done = set(cached)
    todo = [g for g in groups if g not in done]
    answered: dict[str, tuple[Request, Response, Any]] = {}
    decoder.stats.from_cache = sum(len(g) for g in cached)

    def settled(req: Request, resp: Response, parsed: Any) -> None:
        """`req` answers its samples for good: keep (without its images) and show their rows."""
        light = replace(req, messages=[])
        for name in req.names:
            answered[name] = (light, resp, parsed)
        on_rows([prediction(name, gts[name], light, resp, parsed, batch) for name in req.names])

    if cached:
        for name, (req, resp, parsed) in answer_groups(
            asker, cached, shells, request_for, matcher, batch, key_only=True
        ).items():
            answered[name] = (req, resp, parsed)
            on_rows([prediction(name, gts[name], req, resp, parsed, batch)])

    def on_answer(req: Request, resp: Response) -> None:
        if not batch:
            settled(req, resp, parse_ranked(resp.text, matcher) if resp.ok else None)
            feed.done(req.names)
            return
        parsed, halves = settle_batch(asker, req, resp, matcher)
        for half in halves:  # a split batch: its halves are asked again, from the same decoded samples
            feed.retry(half)
        if not halves:
            settled(req, resp, parsed)
        feed.done(() if halves else req.names)

    build = lambda loaded, group: request_for(loaded, group, False)  # noqa: E731
    feed = Feed(todo, shells, decoder, decoder.stats.window, build)
    try:
        if todo:
            keys = [key_for(g).key for g in todo]  # first asks: cached or not, known now in one lookup
            fresh = frozenset(keys) - set(asker.cache.get_many(keys))
            asker.answer_feed(feed, on_answer, max(1, decoder.stats.window // 2), fresh)
    finally:
        feed.close()
    errors.update(feed.errors)

    preds = [prediction(n, gts[n], *answered[n], batch) for n in names if n in answered]  # else: error rows
    if not batch:
        return preds, None
    counts = asdict(asker.batch)
    final = [answered[n][0] for n in names if n in answered]
    summary = summarise(plan, len(groups), final, asker.stats.splits, counts)
    return preds, summary.to_dict()


def prediction(name: str, gt: str, req: Request, resp: Response, parsed: Any, batch: bool) -> Prediction:
    """One sample's row from the request that answered it, the answer and its parse."""
    if not resp.ok:
        return Prediction(name, gt, [], ERROR, req.key, resp.error or "empty")
    if batch:
        r = parsed.results[name]
        return Prediction(name, gt, r.ranked, r.status, req.key, r.detail)
    return Prediction(name, gt, parsed.ranked, parsed.status, req.key, parsed.detail)


def answer_groups(
    asker: Asker,
    groups: list[tuple[str, ...]],
    by_name: dict[str, LoadedSample],
    request_for: Callable[[dict[str, LoadedSample], tuple[str, ...], bool], Request],
    matcher: LabelMatcher,
    batch: bool,
    key_only: bool,
) -> dict[str, tuple[Request, Response, Any]]:
    """Per sample name: the request that answered it, its response and its parse."""
    requests = [request_for(by_name, g, key_only) for g in groups]
    if batch:
        out = ask_batches(asker, requests, matcher, lambda names: request_for(by_name, names, key_only))
    else:
        answers = asker.ask(requests)
        out = {}
        for req in requests:
            resp = answers[req.key]
            out[req.names[0]] = (req, resp, parse_ranked(resp.text, matcher) if resp.ok else None)
    light: dict[int, Request] = {}  # the requests without their images, which must not outlive the chunk
    return {n: (light.setdefault(id(r), replace(r, messages=[])), a, p) for n, (r, a, p) in out.items()}


def prepare(cfg: DictConfig) -> None:
    """Check a dataset on disk; exit non-zero listing the first problems. `source=`: lay it out first."""
    check_options(cfg)
    if cfg.get("source"):
        from ger.data.layout import prepare_from_raw

        sys.exit(prepare_from_raw(cfg))
    spec, data_root = resolve_spec(cfg)
    samples = read_samples(cfg, spec, data_root)
    report = check_dataset(
        spec,
        samples,
        media=True,
        progress=cfg.progress,
        transcripts=spec.modality == "video+text",
        label_file=label_file(spec, data_root),
    )
    print(report.summary())
    if report.problems:
        sys.exit(1)
