"""Frame sampling: ger's random-access reader vs the paper release's read-every-frame loop.

Run by hand:  python benchmarks/bench_frames.py [--quick] [--codec NAME|all]

Generates 640x480 clips of 2-10 s at 25/30 fps in a temp folder, in the encodings datasets
ship in (see CODECS: mp4v from OpenCV; H.264 with x264's defaults in mp4 and in AVI; MPEG-4
Part 2 with B-frames as XviD AVI and in mp4; all but mp4v need imageio-ffmpeg), then for
each clip runs, each in a fresh subprocess so neither inherits the other's memory:
  (a) ger:    sample_frames (3 frames, paper rule), as load_sample calls it: decord's seek where
              the container proves it exact (H.264 mp4), else one in-order PyAV decode
  (b) opencv: cv2.VideoCapture reads every frame into a list, then picks the same 3
Memory is the rise of peak RSS (VmHWM, reset before each call) over the RSS just before the
call, so the libraries' footprint (the same in both, ~700 MB for decord2 next to CUDA wheels)
does not dilute the ratio. "1st" is the first call in a process: it includes decoder
set-up paid once per process. Time is the median of warm calls.
Prints per-clip figures, the speed-up (target >= 10x) and memory ratio (target <= 0.10).
Seeking decodes from the keyframe before each wanted frame, so the speed-up grows with clip
length and keyframe density: expect it to be far below 10x on long-GOP H.264 clips. Where
ger decodes in order (AVI, MPEG-4 Part 2) it decodes the whole clip, as OpenCV does, but
converts and keeps only 3 frames: it wins on memory, and on time only the conversions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

REPO = Path(__file__).resolve().parents[1]
FULL = [(2, 25), (4, 30), (6, 25), (8, 30), (10, 25), (5, 30)]  # (seconds, fps) per clip
QUICK = [(2, 25), (4, 30), (3, 25)]
COUNT, SAMPLER = 3, "paper"
X264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p"]  # x264 defaults: keyframes up to 250 apart, B-frames
XVID = ["-c:v", "mpeg4", "-vtag", "XVID", "-bf", "2", "-q:v", "4"]  # ffmpeg's mpeg4: a keyframe every 12
CODECS = {  # name: (description, file suffix, ffmpeg output options; None: OpenCV's writer)
    "mp4v": ("MPEG-4 part 2 in mp4, OpenCV's writer: a keyframe every 12 frames", ".mp4", None),
    "h264": ("H.264 in mp4, x264 defaults (keyframes up to 250 apart + scene cuts, B-frames)", ".mp4", X264),
    "h264-avi": ("H.264 in AVI, x264 defaults (no presentation times in the AVI index)", ".avi", X264),
    "xvid-avi": ("MPEG-4 part 2 (XviD tag) in AVI, B-frames, a keyframe every 12 frames", ".avi", XVID),
    "mpeg4-mp4": ("MPEG-4 part 2 in mp4, B-frames, a keyframe every 12 frames", ".mp4", XVID[:2] + XVID[4:]),
}


def clip_frames(seconds: int, fps: int, seed: int) -> Iterator[np.ndarray]:
    """BGR frames: a face turning from neutral to an expression while drifting, with sensor-like noise."""
    import numpy as np

    from ger.data.demo import FACIAL_LABELS, draw_face

    n = seconds * fps
    label = FACIAL_LABELS[seed % len(FACIAL_LABELS)]
    levels = [np.asarray(draw_face((640, 480), label, k / 7, variant=seed))[:, :, ::-1] for k in range(8)]
    rng = np.random.default_rng(seed)
    noise = [rng.normal(0, 3, (480, 640, 3)).astype(np.int16) for _ in range(4)]
    for i in range(n):
        base = np.roll(levels[min(7, 8 * i // max(1, n // 2))], (i // 2) % 80 - 40, axis=1)
        yield np.clip(base.astype(np.int16) + noise[i % 4], 0, 255).astype(np.uint8)


def make_clip(path: Path, seconds: int, fps: int, seed: int, codec: str) -> None:
    options = CODECS[codec][2]
    if options is None:
        import cv2

        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (640, 480))
        if not writer.isOpened():
            raise RuntimeError("OpenCV cannot write mp4v")
        for frame in clip_frames(seconds, fps, seed):
            writer.write(frame)
        writer.release()
        return
    import imageio_ffmpeg  # ships an ffmpeg binary with libx264

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo",
           "-pix_fmt", "bgr24", "-s", "640x480", "-r", str(fps), "-i", "-", *options, str(path)]  # fmt: skip
    with subprocess.Popen(cmd, stdin=subprocess.PIPE) as proc:
        for frame in clip_frames(seconds, fps, seed):
            proc.stdin.write(frame.tobytes())
        proc.stdin.close()
        if proc.wait() != 0:
            raise RuntimeError(f"ffmpeg failed writing {path}")


# ---------------------------------------------------------------- the two variants (run in workers)


def run_ger(clip: str) -> tuple[list[int], list]:
    from ger.data.media import sample_frames
    from ger.data.video import _probe_cached

    _probe_cached.cache_clear()  # each call pays the container probe, as the first read of a clip does
    frames, indices, _, _ = sample_frames(clip, COUNT, SAMPLER)
    return indices, frames


def run_opencv(clip: str) -> tuple[list[int], list]:
    """What the paper's release does: decode the whole clip into memory, then pick frames."""
    import cv2
    from PIL import Image

    from ger.data.media import sample_indices

    cap = cv2.VideoCapture(clip)
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    indices = sample_indices(len(frames), COUNT, SAMPLER)
    return indices, [Image.fromarray(cv2.cvtColor(frames[i], cv2.COLOR_BGR2RGB)) for i in indices]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM), so each run's peak is measured on its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rise_mb(fn, clip: str) -> tuple[float, float, float, list[float], list[int]]:
    """(wall s, CPU s, peak RSS rise in MB over the RSS before the call, frame means, indices).

    CPU time (all threads) is reported beside wall time: it is the work done, and barely
    moves when other processes compete for the cores, which wall time does.
    """
    import gc

    import numpy as np

    gc.collect()
    base = _status_kb("VmRSS")
    resettable = _reset_peak()
    start, cpu_start = time.perf_counter(), time.process_time()
    indices, frames = fn(clip)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _status_kb("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    means = [float(np.asarray(f).mean()) for f in frames]  # uint8 view: no float copy
    return seconds, cpu, max(0, peak - base) / 1024, means, indices


def worker(variant: str, clip: str, repeats: int) -> None:
    """One variant on one clip: a cold first call (one-time decoder set-up included), then warm runs."""
    import av  # noqa: F401
    import cv2  # noqa: F401  both variants import the same libraries before any RSS is read
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401

    import ger.data.media  # noqa: F401
    from ger.data.video import _import_decord, probe

    _import_decord()

    fn = {"ger": run_ger, "opencv": run_opencv}[variant]
    _, _, cold_mb, means, indices = _peak_rise_mb(fn, clip)
    warm = [_peak_rise_mb(fn, clip) for _ in range(repeats)]
    reader = probe(clip).reader.split()[-1] if variant == "ger" else None  # "decord" or "decode"
    print(json.dumps({
        "indices": indices, "means": means, "reader": reader, "cold_mb": cold_mb,
        "wall": statistics.median(w[0] for w in warm), "cpu": statistics.median(w[1] for w in warm),
        "mb": max(w[2] for w in warm),
    }))  # fmt: skip


def measure(variant: str, clip: Path, repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, __file__, "--worker", variant, "--clip", str(clip), "--repeats", str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- the run


def bench_codec(codec: str, plan: list[tuple[int, int]], repeats: int, folder: Path) -> None:
    start = time.perf_counter()
    clips = []
    for k, (seconds, fps) in enumerate(plan):
        path = folder / f"{codec}-clip{k}{CODECS[codec][1]}"
        make_clip(path, seconds, fps, seed=k, codec=codec)
        clips.append((path, seconds, fps))
    print(f"== {codec}: {CODECS[codec][0]}")
    print(f"   {len(clips)} clips of 640x480 generated in {time.perf_counter() - start:.1f} s\n")
    print(
        f"{'clip':<6}{'s':>3}{'fps':>4}{'frames':>7}{'reader':>7} | {'ger ms':>7}{'cpu':>7}{'MB':>6}"
        f"{'1st':>6}"
        f" | {'cv2 ms':>7}{'cpu':>7}{'MB':>7} | {'speed-up':>8}{'(cpu)':>7}{'mem':>7}{'1st':>7}"
    )
    rows = []
    for path, seconds, fps in clips:
        a, b = measure("ger", path, repeats), measure("opencv", path, repeats)
        if a["indices"] != b["indices"]:
            raise SystemExit(f"{path.name}: indices differ: ger {a['indices']} vs opencv {b['indices']}")
        diff = max(abs(x - y) for x, y in zip(a["means"], b["means"], strict=True))
        rows.append((a, b, diff))
        print(
            f"{path.stem[-5:]:<6}{seconds:>3}{fps:>4}{seconds * fps:>7}{a['reader']:>7} | "
            f"{a['wall'] * 1e3:>7.1f}{a['cpu'] * 1e3:>7.1f}{a['mb']:>6.1f}{a['cold_mb']:>6.1f} | "
            f"{b['wall'] * 1e3:>7.1f}{b['cpu'] * 1e3:>7.1f}{b['mb']:>7.1f} | {b['wall'] / a['wall']:>7.1f}x"
            f"{b['cpu'] / a['cpu']:>6.1f}x{a['mb'] / b['mb']:>7.3f}{a['cold_mb'] / b['cold_mb']:>7.3f}"
        )
    total = {k: [sum(r[i][k] for r in rows) for i in (0, 1)] for k in ("wall", "cpu")}
    speed, speed_cpu = (total[k][1] / total[k][0] for k in ("wall", "cpu"))
    mem, cold = (sum(r[0][k] for r in rows) / sum(r[1][k] for r in rows) for k in ("mb", "cold_mb"))
    per_clip = [r[0]["mb"] / r[1]["mb"] for r in rows]
    per_speed = [r[1]["wall"] / r[0]["wall"] for r in rows]
    worst = max(d for _, _, d in rows)
    print(f"\nsame frames: indices equal on every clip, max |mean pixel difference| {worst:.3f}")
    verdict = "PASS" if speed >= 10 else "FAIL"
    print(f"speed-up (total cv2 time / total ger time): {speed:.1f}x wall, {speed_cpu:.1f}x CPU; per clip "
          f"{min(per_speed):.1f}-{max(per_speed):.1f}x wall   target >= 10x (wall): {verdict}")  # fmt: skip
    verdict = "PASS" if mem <= 0.10 else "FAIL"
    print(f"memory ratio (total peak RSS rise over the clips, ger / cv2): {mem:.3f}; per clip "
          f"{min(per_clip):.3f}-{max(per_clip):.3f}   target <= 0.10: {verdict}")  # fmt: skip
    print(f"  same, counting ger's one-time decoder set-up (first clip of a process): {cold:.3f}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 shorter clips, 2 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="warm runs per clip and variant (median)")
    ap.add_argument("--codec", choices=[*CODECS, "all"], default="all")
    ap.add_argument("--worker", choices=["ger", "opencv"], help=argparse.SUPPRESS)
    ap.add_argument("--clip", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.clip, args.repeats or 1)
    sys.path.insert(0, str(REPO))
    plan, repeats = (QUICK, args.repeats or 2) if args.quick else (FULL, args.repeats or 3)
    codecs = list(CODECS) if args.codec == "all" else [args.codec]
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        if args.codec not in ("all", "mp4v"):
            raise SystemExit(
                f"--codec {args.codec} needs imageio-ffmpeg (pip install imageio-ffmpeg)"
            ) from None
        print("imageio-ffmpeg not installed: only the mp4v clips\n")
        codecs = ["mp4v"]
    print(
        f"{COUNT} frames per clip, sampler {SAMPLER!r}; each variant in a fresh process per clip; "
        f"ms = wall and CPU time, median of {repeats} warm runs; MB = peak RSS rise during one call\n"
    )
    with tempfile.TemporaryDirectory(prefix="ger-bench-") as tmp:
        for codec in codecs:
            bench_codec(codec, plan, repeats, Path(tmp))


if __name__ == "__main__":
    main()
