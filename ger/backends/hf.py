"""The transformers backend: AutoModelForMultimodalLM + AutoProcessor, batched generate().

Slower than vLLM but needs nothing beyond torch and transformers, so it runs where
vLLM does not (CPU tests, a laptop, a model vLLM lacks). Requests are converted to
the processor's chat format, grouped into left-padded batches, and answered greedily
when temperature is 0. A request that cannot be prepared or answered becomes a
Response with `error` set; the run goes on.

Constrained choice (Request.choices) is honoured with a token-trie restriction on the
logits (`prefix_allowed_tokens_fn`): the answer is exactly one of the choices.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from ger.backends.base import BackendSettings, read_settings, setting
from ger.backends.chat_format import clip_positions
from ger.backends.label_scores import LabelScores, seam_error, tail_matches
from ger.backends.models import ModelSpec, resolve_model
from ger.records import Request, Response

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HFSettings(BackendSettings):
    """conf/backend/hf.yaml, typed. The device and attention kernel change the numerics, so they key."""

    device: str = setting("auto", answers=True)  # cpu | cuda | auto (device_map over GPUs, else cpu)
    dtype: str | None = setting(None, answers=True)  # None = the model config's dtype
    batch_size: int = setting(4, answers=False)  # requests per generate() call, left-padded
    attn_implementation: str = setting("sdpa", answers=True)
    temperature: float = setting(0.0, answers=True)
    top_p: float = setting(1.0, answers=True)
    seed: int = setting(0, answers=True)
    tiny_cache_dir: str | None = setting(None, answers=False)  # None = $GER_CACHE_DIR or ~/.cache/ger

    key_packages = ("transformers", "torch")
    key_compat = {"not_in_key": ["key_packages", "batch_size", "tiny_cache_dir"]}


@dataclass
class Prepared:
    """A request in the processor's format: rendered prompt text plus its decoded media."""

    request: Request
    chat: list[dict[str, Any]]  # messages with media replaced by {"type": "image"|"video"}
    text: str = ""  # the chat rendered by the processor's template
    images: list[Any] = field(default_factory=list)
    videos: list[list[Any]] = field(default_factory=list)
    video_metadata: list[dict[str, Any]] = field(default_factory=list)
    audios: list[Any] = field(default_factory=list)  # 1-D float arrays at the model's sampling rate


def _video_metadata(part: dict[str, Any], n_frames: int) -> dict[str, Any]:
    """Where the frames came from, so the processor knows their real frame rate (Qwen2.5-VL's time ids)."""
    fps, total, indices = clip_positions(part, n_frames)
    return {"fps": fps, "total_num_frames": total, "frames_indices": indices}


def _check_image(obj: Any, where: str) -> Any:
    from PIL import Image

    if not isinstance(obj, Image.Image):
        raise TypeError(f"{where} holds {type(obj).__name__}, not a PIL image")
    return obj.convert("RGB") if obj.mode != "RGB" else obj


def _check_audio(part: dict[str, Any], where: str, rate: int | None) -> Any:
    """A mono sound track at the rate the model's feature extractor expects (ger resamples when reading)."""
    import numpy as np

    audio, sr = part.get("audio"), part.get("sampling_rate")
    if not isinstance(audio, np.ndarray) or audio.ndim != 1 or audio.size == 0:
        raise TypeError(f"{where}: an audio part needs a non-empty 1-D numpy array (mono samples)")
    if rate is not None and sr != rate:
        raise ValueError(f"{where}: audio at {sr} Hz; this model takes {rate} Hz (resample when reading)")
    return audio.astype(np.float32, copy=False)


def to_chat(
    request: Request, supports_video: bool, supports_audio: bool = False, audio_rate: int | None = None
) -> Prepared:
    """Split Request.messages into media-free chat messages (for the template) and media lists."""
    prepared = Prepared(request=request, chat=[])
    for m, message in enumerate(request.messages):
        content = message.get("content", "")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        out: list[dict[str, Any]] = []
        for p, part in enumerate(parts):
            kind, where = part.get("type"), f"message {m} part {p}"
            if kind == "text":
                out.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image":
                prepared.images.append(_check_image(part.get("image"), where))
                out.append({"type": "image"})
            elif kind == "video":
                if not supports_video:
                    raise ValueError(f"{where}: this model takes no native video; send frames as images")
                frames = [
                    _check_image(f, f"{where} frame {i}") for i, f in enumerate(part.get("frames") or [])
                ]
                if not frames:
                    raise ValueError(f"{where}: video part has no frames")
                prepared.videos.append(frames)
                prepared.video_metadata.append(_video_metadata(part, len(frames)))
                out.append({"type": "video"})
            elif kind == "audio" and supports_audio:
                prepared.audios.append(_check_audio(part, where, audio_rate))
                out.append({"type": "audio"})
            elif kind == "audio":
                raise ValueError(f"{where}: this model takes no audio (its config has supports_audio: false)")
            else:
                raise ValueError(f"{where}: unknown content type {kind!r}; expected text, image or video")
        prepared.chat.append({"role": message.get("role", "user"), "content": out})
    return prepared


class ChoiceConstraint:
    """prefix_allowed_tokens_fn that lets each batch row spell exactly one of its choices, then stop."""

    def __init__(self, tokenizer: Any, choices_per_row: list[list[str]], prompt_len: int, eos: int):
        self.prompt_len, self.eos = prompt_len, eos
        self.tries = [self._trie(tokenizer, choices) for choices in choices_per_row]
        self.max_len = 1 + max(self._depth(t) for t in self.tries)

    @staticmethod
    def _trie(tokenizer: Any, choices: list[str]) -> dict:
        root: dict = {}
        for choice in choices:
            node = root
            for tid in tokenizer(choice, add_special_tokens=False)["input_ids"]:
                node = node.setdefault(tid, {})
            node[None] = {}  # a choice may end here
        return root

    def _depth(self, node: dict) -> int:
        return max((1 + self._depth(child) for key, child in node.items() if key is not None), default=0)

    def __call__(self, row: int, ids: Any) -> list[int]:
        node = self.tries[row]
        for tid in ids[self.prompt_len :].tolist():
            if tid not in node:  # finished (eos, then padding): keep emitting eos
                return [self.eos]
            node = node[tid]
        allowed = [k for k in node if k is not None]
        return allowed + [self.eos] if None in node or not allowed else allowed


class HFBackend:
    """Backend protocol over transformers; see the module docstring."""

    settings_class = HFSettings

    def __init__(self, backend_cfg: Any, model_cfg: Any):
        self.settings = read_settings(HFSettings, backend_cfg, "hf")
        self.spec: ModelSpec = resolve_model(model_cfg, cache_dir=self.settings.tiny_cache_dir)
        self.batch_size = max(1, int(self.settings.batch_size))
        self.temperature = float(self.settings.temperature)
        self.dtype_name = str(self.settings.dtype or self.spec.dtype)
        self._load()

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForMultimodalLM, AutoProcessor

        device = str(self.settings.device)
        if device == "auto" and not torch.cuda.is_available():
            device = "cpu"
        common = {"revision": self.spec.revision, "trust_remote_code": self.spec.trust_remote_code}
        self.processor = AutoProcessor.from_pretrained(self.spec.path, **common)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # decoder-only batches must end where generation starts
        dtype = self.dtype_name if self.dtype_name == "auto" else getattr(torch, self.dtype_name)
        # image-text models, and omni models (Qwen2.5-Omni) whose text-answering half is `thinker`
        self.model = AutoModelForMultimodalLM.from_pretrained(
            self.spec.path,
            dtype=dtype,
            device_map=None if device == "cpu" else device,
            attn_implementation=self.settings.attn_implementation,
            **common,
        )
        self.model = getattr(self.model, "thinker", self.model)
        self.model.eval()
        if device == "cpu":
            self.model.to("cpu")
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = list(eos) if isinstance(eos, list | tuple) else [eos]
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        )

    def generate(self, requests: list[Request]) -> Iterator[Response]:
        ready: list[Prepared] = []
        for request in requests:
            try:
                ready.append(self._prepare(request))
            except Exception as exc:  # a bad request fails alone
                yield Response(key=request.key, error=f"prepare: {type(exc).__name__}: {exc}")
        for batch in self._batches(ready):
            yield from self._run_batch(batch)

    def label_logprobs(self, requests: list[Request]) -> Iterator[Response]:
        """answer=likelihood: each candidate label's summed token log-probability as the whole answer.

        One forward pass per sample over one row per label (prompt + label, left-padded so every row
        ends at the same position; only the last logits are kept), log-softmax, and the label tokens
        gathered. A sample that cannot be scored fails alone.
        """
        for request in requests:
            start = time.perf_counter()
            try:
                scores = self._score_labels(self._prepare(request), list(request.candidates or []))
                yield Response(request.key, scores.to_text(), seconds=time.perf_counter() - start)
            except Exception as exc:
                yield Response(key=request.key, error=f"label_logprobs: {type(exc).__name__}: {exc}")

    def _score_labels(self, prepared: Prepared, labels: list[str]) -> LabelScores:
        import torch

        if not labels:
            raise ValueError("no candidate labels to score")
        label_ids = [self.tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
        logprobs: dict[str, float] = {}
        rows = max(1, self.batch_size)
        for lo in range(0, len(labels), rows):
            part = list(range(lo, min(lo + rows, len(labels))))
            inputs = self._encode([replace(prepared, text=prepared.text + labels[i]) for i in part])
            ids = inputs["input_ids"]
            if ids.shape[1] >= self.spec.max_model_len:
                raise ValueError(
                    f"prompt of {ids.shape[1]} tokens exceeds max_model_len={self.spec.max_model_len}"
                )
            keep = 1 + max(len(label_ids[i]) for i in part)
            with torch.inference_mode():
                logits = self.model(**inputs, logits_to_keep=keep).logits[:, -keep:].float()
            table = torch.log_softmax(logits, dim=-1)
            for row, i in enumerate(part):
                n = len(label_ids[i])
                if not tail_matches(ids[row].tolist(), label_ids[i]):
                    raise ValueError(seam_error(labels[i]))
                # the logits at position p predict token p + 1: the label's n tokens are the last n
                picked = table[row, keep - 1 - n : keep - 1].gather(-1, ids[row, -n:].unsqueeze(-1))
                logprobs[labels[i]] = float(picked.sum())
        return LabelScores(logprobs, {label: len(t) for label, t in zip(labels, label_ids, strict=True)})

    def close(self) -> None:
        import torch

        self.model = None  # type: ignore[assignment]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _prepare(self, request: Request) -> Prepared:
        extractor = getattr(self.processor, "feature_extractor", None)
        rate = getattr(extractor, "sampling_rate", None)
        prepared = to_chat(request, self.spec.supports_video, self.spec.supports_audio, rate)
        prepared.text = self.processor.apply_chat_template(
            prepared.chat, tokenize=False, add_generation_prompt=True
        )
        if len(prepared.images) > self.spec.max_images:
            raise ValueError(f"{len(prepared.images)} images exceed max_images={self.spec.max_images}")
        if len(prepared.audios) > self.spec.max_audios:
            raise ValueError(f"{len(prepared.audios)} audio parts exceed max_audios={self.spec.max_audios}")
        if len(prepared.videos) > self.spec.max_videos:
            raise ValueError(f"{len(prepared.videos)} videos exceed max_videos={self.spec.max_videos}")
        return prepared

    def _batches(self, ready: list[Prepared]) -> Iterator[list[Prepared]]:
        """Same-kind requests together (choice or free text), similar sizes together, less padding."""

        def kind(p: Prepared) -> tuple:
            media = (len(p.images), len(p.videos), len(p.audios))
            return (p.request.choices is not None, *media, p.request.max_tokens)

        ordered = sorted(ready, key=kind)
        batch: list[Prepared] = []
        for p in ordered:
            if batch and (len(batch) == self.batch_size or kind(batch[0])[0] != kind(p)[0]):
                yield batch
                batch = []
            batch.append(p)
        if batch:
            yield batch

    def _run_batch(self, batch: list[Prepared]) -> list[Response]:
        try:
            return self._generate(batch)
        except Exception as exc:
            if len(batch) == 1:
                log.warning("hf: request %s failed: %s", batch[0].request.key, exc)
                return [Response(key=batch[0].request.key, error=f"generate: {type(exc).__name__}: {exc}")]
            log.warning("hf: batch of %d failed (%s); retrying one by one", len(batch), exc)
            return [r for p in batch for r in self._run_batch([p])]

    def _encode(self, batch: list[Prepared]) -> Any:
        kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt"} | self.spec.mm_processor_kwargs
        images = [im for p in batch for im in p.images]
        videos = [v for p in batch for v in p.videos]
        if images:
            kwargs["images"] = images
        audios = [a for p in batch for a in p.audios]
        if audios:
            kwargs["audio"] = audios
        if videos:
            kwargs["videos"] = videos
            kwargs["video_metadata"] = [m for p in batch for m in p.video_metadata]
            kwargs["do_sample_frames"] = False  # the frames are already sampled (Qwen3-VL would re-sample)
        inputs = self.processor(text=[p.text for p in batch], **kwargs)
        return inputs.to(device=self.model.device, dtype=self.model.dtype)

    def _generate(self, batch: list[Prepared]) -> list[Response]:
        import torch

        start = time.perf_counter()
        inputs = self._encode(batch)
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        too_long = [i for i, n in enumerate(lengths) if n >= self.spec.max_model_len]
        if too_long:  # answer the rest without them
            errors = [
                Response(
                    key=batch[i].request.key,
                    error=f"prompt of {lengths[i]} tokens exceeds max_model_len={self.spec.max_model_len}",
                )
                for i in too_long
            ]
            rest = [p for i, p in enumerate(batch) if i not in too_long]
            return errors + (self._generate(rest) if rest else [])
        prompt_len = inputs["input_ids"].shape[1]
        gen_kwargs = self._generation_kwargs(batch, prompt_len)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **gen_kwargs)
        seconds = (time.perf_counter() - start) / len(batch)
        responses = []
        for row, p in enumerate(batch):
            ids = out[row, prompt_len:][: p.request.max_tokens]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            stopped = any(int(t) in self.eos_ids for t in ids)  # else it ran into max_tokens
            finish = "stop" if stopped or len(ids) < p.request.max_tokens else "length"
            responses.append(Response(key=p.request.key, text=text, seconds=seconds, finish_reason=finish))
        return responses

    def _generation_kwargs(self, batch: list[Prepared], prompt_len: int) -> dict[str, Any]:
        import torch

        kwargs: dict[str, Any] = {
            "max_new_tokens": max(p.request.max_tokens for p in batch),
            "pad_token_id": self.pad_id,
            "eos_token_id": self.eos_ids,
        }
        if self.temperature > 0:
            torch.manual_seed(int(self.settings.seed))
            kwargs |= {
                "do_sample": True,
                "temperature": self.temperature,
                "top_p": float(self.settings.top_p),
            }
        else:
            kwargs |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if batch[0].request.choices is not None:
            rows = [list(p.request.choices or []) for p in batch]
            constraint = ChoiceConstraint(self.tokenizer, rows, prompt_len, self.eos_ids[0])
            kwargs["prefix_allowed_tokens_fn"] = constraint
            kwargs["max_new_tokens"] = constraint.max_len
        return kwargs
