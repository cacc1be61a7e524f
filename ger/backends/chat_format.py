"""Request messages -> OpenAI chat-completions content, shared by the HTTP backends.

A Request holds PIL images (see ger/records.py). Over HTTP they travel as base64
JPEG data URLs, the one image format every OpenAI-compatible server accepts; a still
image whose part carries its file (`source`: a JPEG, PNG or WebP decoded with nothing
changed, ger/data/media.py load_still) travels as the file's own bytes, not re-encoded.
A video part (sampled frames) goes either as several images, which every server
and GPT-4V accept, or as one vLLM `video_url` whose data URL is a JPEG frame
sequence (`data:video/jpeg;base64,<frame>,<frame>,...`): vLLM decodes that
without a video codec, so no video file has to be encoded on our side.
A decoding worker may already have done that encoding (`EncodedImage`, see wire_image); such an
image travels as it was made.
A sound track (models with `supports_audio`) goes as an `input_audio` part holding a base64
16-bit PCM WAV at the model's rate (OpenAI's format; `vllm serve` reads it with its audio loader).
"""

from __future__ import annotations

import base64
import io
import json
import secrets
from collections.abc import Iterator
from typing import Any

from ger.records import EncodedImage

VIDEO_AS = ("images", "video")


def wire_image(image: Any, quality: int = 90, source: tuple[str, bytes] | None = None) -> EncodedImage:
    """An image as the HTTP backends send it: its file's bytes where `source` is given (a still sent
    as it is), else a JPEG at `quality`. A decoding worker calls it ahead (ger/run/stream.py); an
    image it already made passes through."""
    if isinstance(image, EncodedImage):
        return image
    if source is not None:
        mime, data = source[0], base64.b64encode(source[1]).decode("ascii")
    else:
        mime, data = "image/jpeg", jpeg_base64(image, quality)
    return EncodedImage(mime, data, image.width, image.height)


def jpeg_base64(image: Any, quality: int = 90) -> str:
    """One PIL image as base64 JPEG; greyscale stays one channel, anything else becomes RGB."""
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # JPEG has no alpha or palette
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")


_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp"})  # what wire_image makes


class Base64Text(str):
    """A str json.dumps writes as it is: base64 that ger encoded, behind a header ger wrote.

    json_payload would otherwise check each media string character by character to learn that it
    needs no escaping: about 70 us for a 640x480 JPEG, a tenth of ger's own CPU per request against
    a fast server. Only the functions here that build the string with base64.b64encode mark it.
    """

    __slots__ = ()


def image_data_url(image: Any, quality: int = 90, source: tuple[str, bytes] | None = None) -> str:
    """A data URL of the image's own file where the part carries one (a still sent as it is), else JPEG."""
    made = wire_image(image, quality, source)
    url = f"data:{made.mime};base64,{made.data}"
    return Base64Text(url) if made.mime in _IMAGE_TYPES else url  # another type: json_payload checks it


def image_base64(image: Any, quality: int = 90, source: tuple[str, bytes] | None = None) -> str:
    """The base64 payload an image travels as: its file's bytes (`source`) when given, else a JPEG."""
    return wire_image(image, quality, source).data


def video_data_url(frames: list[Any], quality: int = 90) -> str:
    """vLLM's frame-sequence video: JPEG frames (all of one size) joined by commas, type video/jpeg."""
    if not frames:
        raise ValueError("a video part needs at least one frame")
    # RGB always: vLLM stacks the decoded frames into one (T, H, W, 3) array
    return Base64Text("data:video/jpeg;base64," + ",".join(_frame_jpeg(f, quality) for f in frames))


def _frame_jpeg(frame: Any, quality: int) -> str:
    if isinstance(frame, EncodedImage):  # a worker encoded the frame (ger's frames are always RGB)
        if frame.mime != "image/jpeg":
            raise ValueError(f"a video frame must travel as JPEG, not {frame.mime}")
        return frame.data
    return jpeg_base64(frame.convert("RGB"), quality)


def wav_base64(samples: Any, rate: int) -> str:
    """Mono float samples in [-1, 1] as base64 16-bit PCM WAV (stdlib `wave`; no audio codec needed)."""
    import wave

    import numpy as np

    pcm = np.round(np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(pcm.tobytes())
    return Base64Text(base64.b64encode(buf.getvalue()).decode("ascii"))


def _image_part(
    image: Any, quality: int, detail: str | None, source: tuple[str, bytes] | None = None
) -> dict[str, Any]:
    url: dict[str, Any] = {"url": image_data_url(image, quality, source)}
    if detail:
        url["detail"] = detail  # OpenAI: low | high | auto; vLLM ignores it
    return {"type": "image_url", "image_url": url}


def _convert_part(part: dict[str, Any], video_as: str, quality: int, detail: str | None) -> list[dict]:
    kind = part.get("type")
    if kind == "text":
        return [{"type": "text", "text": part["text"]}]
    if kind == "image":
        return [_image_part(part["image"], quality, detail, part.get("source"))]
    if kind == "video":
        if video_as == "images":
            return [_image_part(f, quality, detail) for f in part["frames"]]
        return [{"type": "video_url", "video_url": {"url": video_data_url(part["frames"], quality)}}]
    if kind == "audio":
        wav = wav_base64(part["audio"], part["sampling_rate"])
        return [{"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]
    if kind in ("image_url", "video_url", "input_audio"):
        return [part]  # already in wire format
    raise ValueError(f"unknown content part type {kind!r}; expected one of text, image, video, audio")


def to_openai_messages(
    messages: list[dict[str, Any]],
    video_as: str = "images",
    quality: int = 90,
    detail: str | None = None,
) -> list[dict[str, Any]]:
    """Convert a Request's messages to the chat-completions wire format (JSON-serialisable)."""
    if video_as not in VIDEO_AS:
        raise ValueError(f"unknown video_as {video_as!r}; expected one of {list(VIDEO_AS)}")
    out = []
    for msg in messages:
        content = msg["content"]
        if not isinstance(content, str):
            content = [p for part in content for p in _convert_part(part, video_as, quality, detail)]
        out.append({"role": msg["role"], "content": content})
    return out


def video_io_kwargs(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """vLLM's per-request `media_io_kwargs` for frame-sequence videos (fps, source length).

    Without them vLLM assumes 1 fps and that the frames are the whole clip, which
    changes the time stamps models like Qwen2-VL see. The kwargs apply to every
    video of the request, so fps is sent only when all videos share it and the
    source length only for a single video. None when there is nothing to send.
    """
    videos = [p for p in iter_parts(messages) if p.get("type") == "video"]
    kwargs: dict[str, Any] = {}
    rates = {float(v["fps"]) for v in videos if v.get("fps")}
    if len(rates) == 1 and all(v.get("fps") for v in videos):
        kwargs["fps"] = rates.pop()
    if len(videos) == 1:
        total = videos[0].get("total_frames")
        if total and int(total) >= len(videos[0]["frames"]):
            kwargs["total_num_frames"] = int(total)
    return {"video": kwargs} if kwargs else None


def clip_positions(part: dict[str, Any], n_frames: int) -> tuple[float | None, int, list[int]]:
    """(fps, source frame count, source index of each frame) of a video part.

    The prompt builder always says which frames it took; a part that does not is
    taken as evenly spaced over the clip.
    """
    fps = float(part["fps"]) if part.get("fps") else None
    total = max(int(part.get("total_frames") or n_frames), n_frames)
    indices = [int(i) for i in part.get("indices") or []]
    if len(indices) != n_frames:
        indices = [i * total // n_frames for i in range(n_frames)]
    return fps, total, indices


def iter_parts(messages: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every content part of every message; a string content counts as one text part."""
    for msg in messages:
        content = msg["content"]
        if isinstance(content, str):
            yield {"type": "text", "text": content}
        else:
            yield from content


def iter_images(messages: list[dict[str, Any]]) -> Iterator[Any]:
    """Every PIL image a request sends: images, and the frames of videos."""
    for part in iter_parts(messages):
        if part.get("type") == "image":
            yield part["image"]
        elif part.get("type") == "video":
            yield from part["frames"]


def request_text(messages: list[dict[str, Any]]) -> str:
    """All the text a request sends, for token estimates."""
    return "\n".join(p["text"] for p in iter_parts(messages) if p.get("type") == "text")


_TOKEN = secrets.token_hex(8)  # placeholders no request text holds (once: urandom is a syscall)


def json_payload(body: dict[str, Any]) -> bytes:
    """json.dumps(body).encode(), without the JSON encoder scanning every character of the media.

    A request's base64 media (tens of kB an image) need no escaping, yet json.dumps looks at them
    character by character: a quarter of ger's own CPU per request against a fast server. They are
    swapped for short random tokens, the small rest is encoded, and the media are put back in.
    """
    token, media = _TOKEN, []

    def slim(value: Any) -> Any:
        if type(value) is Base64Text:
            pass  # known to need no escaping
        elif not (isinstance(value, str) and len(value) > 256 and _json_safe(value)):
            return value
        media.append(value)
        return f"ger-media-{token}-{len(media) - 1}"

    messages = [_slim_message(m, slim) for m in body.get("messages", [])]
    text = json.dumps({**body, "messages": messages} if "messages" in body else body)
    pieces: list[str] = []
    for i, value in enumerate(media):
        head, text = text.split(f"ger-media-{token}-{i}", 1)
        pieces += [head, value]
    pieces.append(text)
    return "".join(pieces).encode()


# The characters json.dumps writes as they are: printable ASCII but '"' and '\\' (its C encoder's rule)
_JSON_PLAIN = bytes(c for c in range(32, 127) if c not in b'"\\')


def _json_safe(value: str) -> bool:
    """Whether json.dumps writes `value` as it is, between quotes (true of every base64 data URL)."""
    return value.isascii() and not value.encode("ascii").translate(None, _JSON_PLAIN)


def _slim_message(message: dict[str, Any], slim: Any) -> dict[str, Any]:
    """`message` with each media payload passed through `slim` (copies: the body is left as it was)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        kind = part.get("type")
        field = {"image_url": "url", "video_url": "url", "input_audio": "data"}.get(kind)
        inner = part.get(kind)
        if field and isinstance(inner, dict):
            part = {**part, kind: {**inner, field: slim(inner.get(field))}}
        parts.append(part)
    return {**message, "content": parts}
