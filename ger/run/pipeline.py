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

from ger.answers.modes import AnswerMode, answer_mode, backend_refusal
from ger.answers.parse import LabelMatcher
from ger.backends import check_backend, create_backend
from ger.backends.base import backend_class, key_settings, settings_class
from ger.backends.models import ModelSpec, resolve_model
from ger.config import plain
from ger.data.datasets import DatasetSpec, load_samples, spec_from_dict
from ger.data.digests import DigestTable, use_table
from ger.data.media import MediaError, decode, describe_sample
from ger.data.undecodable import Undecodable
from ger.data.validate import check_dataset
from ger.errors import UserError
from ger.options import check_option, check_options
from ger.prompting.batching import batch_order, plan_batches, summarise, write_order
from ger.prompting.prompts import KeyOnlyRequests, build_request, modality_inputs
from ger.prompting.release_prompts import select_template
from ger.records import ERROR, LoadedSample, Prediction, Request, Response, Sample
from ger.run.ask import Asker
from ger.run.cache import ResponseCache
from ger.run.modality import audio_rate, modality_plan
from ger.run.predictions import PartialPredictions
from ger.run.run_files import write_run_files
from ger.run.stream import (
    Decoder,
    DecodeSpec,
    Feed,
    Prefetched,
    StreamStats,
    sample_timeout,
    window_size,
    worker_count,
    worker_nice,
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
    with_visual, with_text, _ = modality_inputs(modality)
    # read once: a config lookup costs ~25 us, three of them per sample a tenth of a cached rerun
    how = {"frames": int(cfg.frames), "sampler": str(cfg.sampler), "greyscale": bool(cfg.greyscale)}
    how.update(with_text=with_text, with_visual=with_visual, audio_rate=audio_rate(cfg, modality))
    kind = spec.layout.media_kind
    for s in samples:
        try:
            shells[s.name] = describe_sample(s, kind, **how)
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


def key_parts(cfg: DictConfig, model_identity: dict[str, Any], mode: AnswerMode) -> dict[str, Any]:
    """Everything outside the prompt that changes an answer; the cache key hashes it.

    The backend's part is what its settings class declares answer-changing (ger/backends/base.py).
    """
    return {
        "engine": engine_versions(list(settings_class(cfg.backend.name).key_packages)),
        "model": model_identity,
        "backend": key_settings(cfg.backend.name, cfg.backend),
        # the batch budget reaches the key as the request's max_tokens; single-mode keys stay as they were
        "sampling": {k: v for k, v in plain(cfg.sampling).items() if k != "max_tokens_per_record"},
        **mode.key_parts(),  # free/batch/choice keys as before; likelihood adds the mode
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate one model on one test set; writes the run folder and returns metrics.json's content."""
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    check_options(cfg)
    mode = answer_mode(cfg)  # how answers are obtained and read (ger/answers/modes.py)
    cfg.answer = mode.name  # config.yaml and metrics.json name the mode, however it was spelled
    # refused input choices (no transcripts, no speech, a model without audio) before any data is made
    modality, template_name = modality_plan(cfg, spec_from_dict(plain(cfg.dataset)))
    spec, data_root = resolve_spec(cfg)
    template = select_template(template_name, spec.labels, cfg.prompt_source, cfg.release_dir)
    samples = read_samples(cfg, spec, data_root)
    check_dataset(spec, samples, media=False, label_file=label_file(spec, data_root)).raise_for_labels()
    label_rank = {s.name: i for i, s in enumerate(samples)}  # predictions.csv keeps the label file's order
    if mode.layout == "batch":  # one fixed shuffle, so batches (and `limit` runs) are class-mixed
        by_name = {s.name: s for s in samples}
        samples = [by_name[n] for n in batch_order(list(by_name), cfg.batch_seed, cfg.get("batch_order"))]
    shuffle = [s.name for s in samples]  # order.csv's order, before `limit` and `shard` take their part
    samples = select(samples, cfg.limit, cfg.shard)
    settings = check_backend(cfg.backend.name, cfg.backend)  # a refused model stops the run before decoding
    refusal = backend_refusal(mode, cfg.backend.name, backend_class(cfg.backend.name))
    if refusal:
        raise UserError(refusal)
    model = resolve_model(cfg.model, cfg.cache_dir)
    cache_dir = Path(str(cfg.cache_dir)).expanduser()
    table = DigestTable(cache_dir / "file_digests.sqlite")
    use_table(table)
    try:
        shells, errors = describe_media(cfg, spec, samples, modality)
    finally:
        use_table(None)
        table.close()
    stream_cfg = cfg.get("stream") or {}
    stats = StreamStats(
        window_size(stream_cfg, cfg.backend),
        worker_count(stream_cfg),
        sample_timeout(stream_cfg),
        nice=worker_nice(stream_cfg),
    )
    undecodable = Undecodable(cache_dir / "undecodable.sqlite", stats.timeout_s)
    # known not to decode: error rows now, yet kept among the shells so batches are cut as before
    known_bad = undecodable.known({n: s.content_hash for n, s in shells.items()})
    errors.update(known_bad)

    parts = key_parts(cfg, model.identity(), mode)
    frames_as = str(cfg.frames_as)  # read once: a config lookup costs ~0.1 ms
    budgets: dict[int, int] = {}
    candidates = mode.candidates(spec.labels)

    fixed = {"mode": mode.layout, "frames_as": frames_as, "key_parts": parts, "modality": modality,
             "candidates": candidates}  # fmt: skip
    keys_only = KeyOnlyRequests(template, spec.labels, **fixed)  # every group is keyed before any is asked

    def request_for(by_name: dict[str, LoadedSample], names: tuple[str, ...], key_only: bool) -> Request:
        if len(names) not in budgets:
            budgets[len(names)] = mode.max_tokens(cfg.sampling, len(names))
        samples = [by_name[n] for n in names]
        if key_only:
            return keys_only(samples, budgets[len(names)])
        return build_request(samples, template, spec.labels, max_tokens=budgets[len(names)], **fixed)

    kind = spec.layout.media_kind
    # grids are drawn from pixels when the request is built; everything else can travel as workers encode it
    wire = None if frames_as == "grid" and kind != "image" else settings.wire_quality()
    decode_spec = DecodeSpec(kind, int(cfg.frames), str(cfg.sampler), bool(cfg.greyscale), wire)
    decoder = Decoder(decode_spec, stats, cfg.progress)
    cache = ResponseCache(cache_dir / "responses.sqlite", identity=parts)  # readable beside each answer
    asker = Asker(cache, lambda: create_backend(cfg.backend.name, cfg.backend, model), cfg.progress)
    partial = PartialPredictions(out)  # rows as they are parsed; predictions.csv replaces it at the end
    try:
        record = lambda groups: write_order(out / "order.csv", shuffle, groups)  # noqa: E731
        preds, batching = predict(
            cfg, spec, shells, request_for, asker, model, modality, record, decoder, errors, mode, partial.add
        )
    finally:
        decoder.close()
        asker.close()
        cache.close()
        partial.close(remove=False)
        found = {n: e for n, e in errors.items() if n in shells and n not in known_bad}  # this run's failures
        decoded = {shells[n].content_hash for n in decoder.decoded_names}  # a hang seen through is forgotten
        undecodable.remember({shells[n].content_hash: e for n, e in found.items()}, decoded)
        undecodable.close()
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
    record_batches: Callable[[list[tuple[str, ...]]], None],
    decoder: Decoder,
    errors: dict[str, str],
    mode: AnswerMode,
    on_rows: Callable[[list[Prediction]], None] = lambda preds: None,
) -> tuple[list[Prediction], dict[str, Any] | None]:
    """Prompt, ask and read in the answer mode (ger/answers/modes.py), streamed (ger/run/stream.py);
    also what batch mode did (None otherwise). Batches as first cut go to record_batches (order.csv);
    samples whose media fail to decode are added to `errors`; each sample's prediction goes to
    on_rows as soon as its answer is read."""
    names = list(shells)
    gts = {n: ls.sample.gt for n, ls in shells.items()}
    matcher = LabelMatcher(spec.labels, spec.aliases)
    plan = None
    groups = [(n,) for n in names]
    if mode.layout == "batch":  # the paper's batches: a fixed shuffle cut at the (capped) batch size
        size = paper_batch_size(cfg, spec, modality)
        order = (int(cfg.batch_seed), cfg.get("batch_order"))
        plan = plan_batches(size, cfg.batch_size, model, list(shells.values()), cfg.frames_as, order)
        groups = plan.cut(names)
        record_batches(groups)
        if plan.cap:
            log.warning("batch mode: %s (the paper used %d)", plan.cap, plan.paper_size)
    cut = len(groups)
    # samples already known not to decode (in `errors` and among the shells, see run()) leave their
    # groups here: a batch is keyed as the first run asked it, without them
    groups = [kept for g in groups if (kept := tuple(n for n in g if n not in errors))]

    keyed: dict[tuple[str, ...], Request] = {}  # built once: the cache check and the answers both need them

    def key_for(group: tuple[str, ...]) -> Request:
        if group not in keyed:
            keyed[group] = request_for(shells, group, True)
        return keyed[group]

    known = Prefetched(asker.cache, [key_for(g).key for g in groups])  # one query per 500 keys
    cached = [g for g in groups if mode.cached(g, key_for, known, matcher)]
    done = set(cached)
    todo = [g for g in groups if g not in done]
    answered: dict[str, tuple[Request, Response, Any]] = {}
    decoder.stats.from_cache = sum(len(g) for g in cached)

    rows: dict[str, Prediction] = {}  # each sample's row, made once: shown as it comes, returned at the end

    def show(final: dict[str, tuple[Request, Response, Any]]) -> None:
        answered.update(final)
        made = [mode.predict(name, gts[name], *got) for name, got in final.items()]
        rows.update((p.name, p) for p in made)
        on_rows(made)

    def settled(req: Request, resp: Response, reading: Any) -> None:
        """`req` answers its samples for good: keep (without its images) and show their rows."""
        light = replace(req, messages=[])
        show({name: (light, resp, reading) for name in req.names})

    if cached:  # all at once: one write of the partial predictions, not one a sample
        with asker.looking_up(known):  # their answers came with the keys: not queried again
            keyed_for = lambda _, g, __: key_for(g)  # noqa: E731
            show(answer_groups(asker, mode, cached, shells, keyed_for, matcher, key_only=True))

    def on_answer(req: Request, resp: Response) -> None:
        reading, halves = mode.settle(asker, req, resp, matcher)
        for half in halves:  # a split batch: its halves are asked again, from the same decoded samples
            feed.retry(half)
        if not halves:
            settled(req, resp, reading)
        feed.done(() if halves else req.names)

    build = lambda loaded, group: request_for(loaded, group, False)  # noqa: E731
    feed = Feed(todo, shells, decoder, decoder.stats.window, build)
    try:
        if todo:
            keys = [key_for(g).key for g in todo]  # first asks: cached or not, known now in one lookup
            fresh = frozenset(keys) - set(known.get_many(keys))
            asker.answer_feed(feed, on_answer, max(1, decoder.stats.window // 2), fresh, call=mode.call)
    finally:
        feed.close()
    errors.update(feed.errors)

    # a sample not answered had media that failed to decode: it becomes an error row
    preds = [rows[n] for n in names if n in rows]
    if plan is None:
        return preds, None
    counts = asdict(asker.batch)
    final = [answered[n][0] for n in names if n in answered]
    summary = summarise(plan, cut, final, asker.stats.splits, counts)
    return preds, summary.to_dict()


def answer_groups(
    asker: Asker,
    mode: AnswerMode,
    groups: list[tuple[str, ...]],
    by_name: dict[str, LoadedSample],
    request_for: Callable[[dict[str, LoadedSample], tuple[str, ...], bool], Request],
    matcher: LabelMatcher,
    key_only: bool,
) -> dict[str, tuple[Request, Response, Any]]:
    """Per sample name: the request that answered it, its response and the mode's reading of it."""
    requests = [request_for(by_name, g, key_only) for g in groups]
    out = mode.answer(asker, requests, lambda names: request_for(by_name, names, key_only), matcher)
    light: dict[int, Request] = {}  # the requests without their images, which must not outlive the chunk

    def lighten(r: Request) -> Request:
        return light.setdefault(id(r), replace(r, messages=[])) if r.messages else r  # key-only: light

    return {n: (lighten(r), a, p) for n, (r, a, p) in out.items()}


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
