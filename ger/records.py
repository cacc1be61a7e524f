"""The records passed between pipeline stages.

Every stage takes and returns these dataclasses, never dicts or DictConfig, so a
reader can follow one sample from the label list to the metrics by type alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Parse statuses of a prediction. Anything but OK is scored as wrong, never dropped.
OK = "ok"
EMPTY = "empty"  # the model answered nothing usable for this sample
UNKNOWN_LABEL = "unknown_label"  # top-1 is not in the label set
MISSING = "missing"  # the sample never got an answer (batch answer lacked it)
ERROR = "error"  # media could not be read or the request failed
STATUSES = (OK, EMPTY, UNKNOWN_LABEL, MISSING, ERROR)


@dataclass(frozen=True)
class Sample:
    """One test item as listed in a dataset's label file, with where its media live."""

    dataset: str
    name: str
    gt: str  # raw label text; a continuous score stays a string ("-1.6") until scoring
    media: Path | None = None  # image file, video file or folder of frames
    transcript: Path | None = None
    line: int = 0  # line of the label list (0: not from one), for error messages
    # Why the manifest cannot give this sample's files; with media None the label list itself is
    # wrong (a name leaving the dataset folder), else the file is (a link out of the data root).
    problem: str = ""


@dataclass
class EncodedImage:
    """A decoded image already in the form an HTTP backend sends it: base64 of its file or of a JPEG.

    Made in a decoding worker (ger/run/stream.py) for backends that send images over HTTP, so neither
    the pixels (about 1 MB for 640x480) nor the encoding cost cross to ger's main process, which
    builds and sends the requests. Not frozen, so the decoder's weakref can count it alive.
    """

    mime: str  # image/jpeg, image/png or image/webp
    data: str  # base64 (ASCII), exactly what the data URL carries
    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


@dataclass
class LoadedSample:
    """A sample with its media decoded, ready to be put into a prompt."""

    sample: Sample
    # PIL images (one image, or the sampled frames); EncodedImage for the HTTP backends (DecodeSpec.wire)
    images: list[Any] = field(default_factory=list)
    frame_indices: list[int] = field(default_factory=list)  # source-clip indices of the frames
    source_fps: float | None = None
    source_frames: int | None = None
    text: str | None = None  # transcript
    content_hash: str = ""  # hash of the media files and of how they become pixels, for the cache key
    # Known before decoding (ger/data/media.py describe_sample), so prompts and keys need no pixels:
    n_images: int = 0  # images the prompt will show (0: count `images`)
    clip: bool = False  # frames of a clip, not a still image (False: look at `frame_indices`)
    # The sound track (audio modalities): the rate describe_sample asked for (0: no audio) and, once
    # decoded, the samples (ger/data/audio.py AudioTrack).
    audio_rate: int = 0
    audio: Any = None
    # A still image's own file (MIME type, bytes), where it can travel as it is: decoded to exactly
    # `images[0]` with nothing changed (no greyscale, no EXIF turn) in a format servers accept.
    source: tuple[str, bytes] | None = None
    # The media file's stamp (ger/data/digests.py) when its digest was taken: decoding checks it still is.
    stamp: tuple[int, ...] | None = None

    @property
    def image_count(self) -> int:
        return self.n_images or len(self.images)

    @property
    def is_clip(self) -> bool:
        return self.clip or bool(self.frame_indices)


@dataclass
class Request:
    """One chat request: one or more samples, in OpenAI-style messages.

    Content parts are {"type": "text", "text": str}, {"type": "image", "image": PIL.Image} (a still
    may add "source": (MIME type, its file's bytes), which HTTP backends send instead of re-encoding)
    or {"type": "video", "frames": [PIL.Image], "fps": float, "total_frames": int}, and for
    models with `supports_audio` {"type": "audio", "audio": 1-D float32 numpy array (mono),
    "sampling_rate": int, the model's own rate}. Each backend converts these to its own input format.
    """

    key: str  # cache key: hash of everything that changes the answer
    names: tuple[str, ...]  # samples this request answers, in prompt order
    messages: list[dict[str, Any]]
    choices: list[str] | None = None  # constrained output (single mode), or None
    # answer=likelihood: score each of these labels as the whole answer (Backend.label_logprobs), or None
    candidates: list[str] | None = None
    max_tokens: int = 512
    ids: tuple[str, ...] = ()  # batch mode: the positional ids the prompt gives `names` ("Sample 1", ...)


@dataclass
class Response:
    """A backend's answer to one request; `error` set means no usable answer."""

    key: str
    text: str = ""
    error: str | None = None
    cached: bool = False
    seconds: float = 0.0
    finish_reason: str | None = None  # "stop" | "length" (cut at max_tokens) | None when unknown
    # Cut for length before its own max_tokens: the engine's context limit (vLLM clamps max_tokens to
    # max_model_len minus the prompt), a setting outside the cache key. Used in its run, never cached.
    context_cut: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.text.strip())


@dataclass
class Prediction:
    """One scored row of predictions.csv."""

    name: str
    gt: str
    ranked: list[str]  # the model's ranked labels, in the label set's spelling where matched
    status: str = OK
    response_key: str = ""
    detail: str = ""  # why a status is not OK: an error message or the unmatched text
    # Likelihood answers only: every label's probability as the model's answer (sums to 1 over the
    # label set, in label-set order); None for answers read from generated text.
    probs: dict[str, float] | None = None

    @property
    def top1(self) -> str:
        return self.ranked[0] if self.ranked else ""
