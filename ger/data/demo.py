"""A small, licence-free demo dataset drawn on the fly, so `ger run dataset=demo` works anywhere.

The real test sets cannot be redistributed; these cartoon faces (PIL drawings, clips
written with OpenCV) exercise the whole pipeline: image, video and video+transcript, and the
multimodal clips carry a synthetic voice-like sound track (numpy tones, muxed in with PyAV, which
ger already reads audio with; OpenCV writes no sound) so the audio modalities run on demo data.
Generation is deterministic and takes about a second.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image, ImageDraw

MARKER = ".ger-demo-complete"
VERSION = "2"  # bump when the generated files change, so old copies are regenerated
DEMO_KEYS = ("demo", "demo_video", "demo_multimodal")
FACIAL_LABELS = ("anger", "disgust", "fear", "happy", "neutral", "sad", "surprise")
MULTIMODAL_LABELS = ("worried", "happy", "neutral", "angry", "surprised", "sad")  # as MER2023
FPS = 25
SOUND_RATE, SOUND_LAYOUT = 44100, "stereo"  # as datasets ship sound: ger resamples and downmixes it
# A voice-like tone per label: fundamental (Hz) and syllables per second (happy high and quick, sad low).
VOICES = {"worried": (260, 5.0), "happy": (300, 4.0), "neutral": (180, 3.0), "angry": (220, 6.0),
          "surprised": (340, 3.5), "sad": (140, 2.0)}  # fmt: skip


@dataclass(frozen=True)
class Expression:
    """Face parameters at full intensity; all zero is the neutral face."""

    smile: float = 0.0  # mouth curvature: + corners up, - corners down
    mouth_open: float = 0.0
    brow_tilt: float = 0.0  # + inner ends down (anger), - inner ends up (sadness, fear)
    brow_raise: float = 0.0
    eye_open: float = 0.0  # added to 1.0
    asym: float = 0.0  # one-sided mouth (disgust)


EXPRESSIONS = {
    "neutral": Expression(),
    "happy": Expression(smile=1.0, mouth_open=0.35, brow_raise=0.1, eye_open=-0.2),
    "sad": Expression(smile=-0.8, brow_tilt=-0.7, eye_open=-0.3),
    "anger": Expression(smile=-0.4, mouth_open=0.15, brow_tilt=1.0, brow_raise=-0.4, eye_open=-0.2),
    "surprise": Expression(mouth_open=1.0, brow_raise=0.9, eye_open=0.5),
    "fear": Expression(smile=-0.7, mouth_open=0.45, brow_tilt=-0.8, brow_raise=0.6, eye_open=0.4),
    "disgust": Expression(
        smile=-0.5, mouth_open=0.1, brow_tilt=0.5, brow_raise=-0.2, eye_open=-0.4, asym=0.8
    ),
}
ALIASES = {"worried": "fear", "angry": "anger", "surprised": "surprise"}

TRANSCRIPTS = {
    "worried": "I keep thinking the results will not come back in time, what if it all goes wrong?",
    "happy": "We won! I honestly cannot stop smiling, this is the best day in months.",
    "neutral": "The meeting moved to Thursday at ten, the room is on the second floor.",
    "angry": "You promised me twice and you still did nothing. I am done waiting for you.",
    "surprised": "Wait, you are here? Nobody told me you were coming back today!",
    "sad": "She left this morning and the house feels so empty without her.",
}


def _lerp(e: Expression, t: float) -> Expression:
    return Expression(*(t * getattr(e, f) for f in Expression.__dataclass_fields__))


def draw_face(size: tuple[int, int], label: str, intensity: float = 1.0, variant: int = 0) -> Image.Image:
    """A cartoon face showing `label` at `intensity` (0 = neutral), in one of a few looks."""
    from PIL import Image, ImageDraw

    e = _lerp(EXPRESSIONS[ALIASES.get(label, label)], intensity)
    w, h = size
    rng = random.Random(variant)  # per-variant look: skin, background, face size and position
    bg = tuple(rng.randrange(170, 235) for _ in range(3))
    skin = rng.choice([(241, 200, 160), (224, 172, 125), (198, 134, 90), (141, 85, 54), (255, 219, 172)])
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    r = min(w, h) * rng.uniform(0.40, 0.46)
    cx, cy = w / 2 + rng.uniform(-0.05, 0.05) * w, h / 2
    d.ellipse([cx - r * 0.85, cy - r, cx + r * 0.85, cy + r], fill=skin, outline=(60, 40, 30), width=2)

    eye_y, eye_dx = cy - 0.25 * r, 0.35 * r
    eye_rx, eye_ry = 0.14 * r, 0.10 * r * (1.0 + e.eye_open)
    for s in (-1, 1):
        ex = cx + s * eye_dx
        d.ellipse([ex - eye_rx, eye_y - eye_ry, ex + eye_rx, eye_y + eye_ry], fill="white", outline="black")
        pr = min(0.06 * r, eye_ry)
        d.ellipse([ex - pr, eye_y - pr, ex + pr, eye_y + pr], fill=(30, 30, 30))
        brow_y = eye_y - 0.25 * r - e.brow_raise * 0.12 * r
        inner = (cx + s * 0.12 * r, brow_y + e.brow_tilt * 0.10 * r)
        outer = (cx + s * 0.55 * r, brow_y - e.brow_tilt * 0.04 * r)
        d.line([inner, outer], fill=(50, 30, 20), width=max(2, int(0.06 * r)))
    if e.asym > 0:  # wrinkled nose of disgust
        for s in (-1, 1):
            d.arc(
                [cx + s * 0.1 * r - 0.08 * r, cy - 0.05 * r, cx + s * 0.1 * r + 0.08 * r, cy + 0.08 * r],
                200,
                340,
                fill=(90, 50, 40),
                width=2,
            )
    d.line(
        [(cx, cy - 0.1 * r), (cx - 0.06 * r, cy + 0.12 * r), (cx + 0.04 * r, cy + 0.14 * r)],
        fill=(120, 80, 60),
        width=2,
    )
    _draw_mouth(d, cx, cy + 0.45 * r, r, e)
    return img


def _draw_mouth(d: ImageDraw.ImageDraw, cx: float, my: float, r: float, e: Expression) -> None:
    """Upper lip a parabola (smile bends it), lower lip the same pushed down by mouth_open."""
    mw, amp, steps = 0.38 * r * (1.0 + 0.2 * e.smile), 0.18 * r, 16
    ts = [-1 + 2 * i / steps for i in range(steps + 1)]
    upper = [(cx + t * mw, my + e.smile * amp * (1 - t * t) - e.asym * amp * t) for t in ts]
    if e.mouth_open > 0.05:
        lower = [(x, y + e.mouth_open * 0.35 * r * (1 - t * t)) for (x, y), t in zip(upper, ts, strict=True)]
        d.polygon(upper + lower[::-1], fill=(120, 20, 30), outline=(60, 10, 10))
    else:
        d.line(upper, fill=(120, 20, 30), width=max(2, int(0.05 * r)), joint="curve")


# ---------------------------------------------------------------- the three test sets


def _write_labels(folder: Path, rows: list[tuple[str, str]]) -> None:
    with (folder / "label.csv").open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["name", "gt"])
        writer.writerows(rows)


def _shuffled(items: list[str], seed: int) -> list[str]:
    """Names must not reveal labels (they appear in batch prompts), so order is shuffled."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def _write_clip(
    path: Path, label: str, n_frames: int, variant: int, size: tuple[int, int] = (160, 120)
) -> None:
    """Neutral onset to the full expression over the first half, then held, as in DFER clips."""
    import cv2
    import numpy as np

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, size)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write mp4v video {path}; is opencv-python-headless installed?")
    try:
        for i in range(n_frames):
            intensity = min(1.0, i / max(1, n_frames // 2))
            rgb = np.asarray(draw_face(size, label, intensity, variant))
            writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))  # OpenCV wants BGR
    finally:
        writer.release()


def voice(label: str, seconds: float, rate: int = SOUND_RATE) -> Any:
    """A synthetic voice for `label`: a fundamental with three harmonics, gated into syllables.

    Stereo float32 (channels x samples), the right channel a little quieter, so a downmix matters."""
    import numpy as np

    f0, syllables = VOICES[label]
    t = np.arange(int(round(seconds * rate))) / rate
    tone = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 5))
    gate = np.clip(np.sin(np.pi * syllables * t), 0, None) ** 2
    mono = (0.3 * tone * gate).astype(np.float32)
    return np.stack([mono, 0.8 * mono])


def _add_sound(path: Path, label: str, n_frames: int) -> None:
    """Mux a voice as long as the clip into OpenCV's file (video packets copied, not re-encoded)."""
    import av

    samples = voice(label, n_frames / FPS)
    tmp = path.with_name(path.stem + ".sound" + path.suffix)
    with av.open(str(path)) as src, av.open(str(tmp), "w") as dst:
        v_in = src.streams.video[0]
        v_out = dst.add_stream_from_template(v_in)
        a_out = dst.add_stream("aac", rate=SOUND_RATE, layout=SOUND_LAYOUT)
        for packet in src.demux(v_in):
            if packet.dts is None:  # the demuxer's flush packet
                continue
            packet.stream = v_out
            dst.mux(packet)
        step = 1024  # AAC frame size
        for start in range(0, samples.shape[1], step):
            chunk = samples[:, start : start + step]
            frame = av.AudioFrame.from_ndarray(chunk.copy(), format="fltp", layout=SOUND_LAYOUT)
            frame.sample_rate, frame.pts = SOUND_RATE, start
            dst.mux(a_out.encode(frame))
        dst.mux(a_out.encode(None))
    tmp.replace(path)


def _make_image_set(folder: Path) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    pairs = [(label, k) for label in FACIAL_LABELS for k in range(2)]
    order = _shuffled([f"{label}|{k}" for label, k in pairs], seed=1)
    rows = []
    for i, key in enumerate(order, start=1):
        label, k = key.split("|")
        name = f"img_{i:03d}"
        draw_face((160, 160), label, 1.0, variant=2 * i + int(k)).save(folder / "images" / f"{name}.png")
        rows.append((name, label))
    _write_labels(folder, rows)


def _make_video_set(folder: Path) -> None:
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, label in enumerate(_shuffled(list(FACIAL_LABELS), seed=2), start=1):
        name = f"clip_{i:02d}"
        _write_clip(folder / "videos" / f"{name}.mp4", label, n_frames=24 + 2 * i, variant=100 + i)
        rows.append((name, label))
    _write_labels(folder, rows)


def _make_multimodal_set(folder: Path) -> None:
    import numpy as np

    for sub in ("videos", "transcripts"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, label in enumerate(_shuffled(list(MULTIMODAL_LABELS), seed=3), start=1):
        name = f"sample_{i:04d}"
        _write_clip(folder / "videos" / f"{name}.mp4", label, n_frames=28 + 2 * i, variant=200 + i)
        _add_sound(folder / "videos" / f"{name}.mp4", label, n_frames=28 + 2 * i)
        np.save(folder / "transcripts" / f"{name}.npy", np.array(TRANSCRIPTS[label]))
        rows.append((name, label))
    _write_labels(folder, rows)


def is_complete(root: Path) -> bool:
    """True when a finished demo of this version is under root."""
    marker = Path(root) / MARKER
    return (
        marker.is_file()
        and marker.read_text().strip() == VERSION
        and all((Path(root) / key / "label.csv").is_file() for key in DEMO_KEYS)
    )


def ensure_demo(root: Path) -> Path:
    """Create the demo test sets under root/<key>/ unless already there; returns root.

    The marker is written last, so an interrupted run is redone rather than used half-made.
    """
    root = Path(root)
    if is_complete(root):
        return root
    makers = {"demo": _make_image_set, "demo_video": _make_video_set, "demo_multimodal": _make_multimodal_set}
    for key in DEMO_KEYS:
        makers[key](root / key)
    (root / MARKER).write_text(VERSION + "\n")
    return root
