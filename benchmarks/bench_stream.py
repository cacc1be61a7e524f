"""The streamed `ger run` against an instantly answering server: memory, rate and cached reruns.

Run by hand:  python benchmarks/bench_stream.py [--n 4000] [--small 1000] [--rounds 3]
              python benchmarks/bench_stream.py --clips --n 400 --small 100   # 3-frame clips
              python benchmarks/bench_stream.py --workers 1   # stream.workers (default: one per core)
              python benchmarks/bench_stream.py --nice 0      # stream.nice (default: conf/config.yaml's)

Makes --n 640x480 JPEG images (smooth gradients, small noise; --clips: 2 s mp4v clips of
50 640x480 frames, 3 frames sampled; no two files alike), starts the loopback
server of tests/instant_server.py answering every request at once at next to no CPU (so that only
the harness is timed: it shares these cores with ger), and runs `ger run
backend=server` as a subprocess, as a user would, sampling the resident memory of ger and its
decoding workers (the process tree, summed) every 50 ms. --rounds times (3), from an empty cache
each time: a first run, its cached reruns (of all, then of one; each three times, the median), and
the decode-only pass, so each ratio pairs figures measured seconds apart (this machine's pace
drifts by tens of percent over minutes); prints each round's ratios and their median:
  (b) peak memory at N=--n vs N=--small images (target <= 1.3);
  (c) a fully cached rerun of --n images vs the first run (target >= 10x faster); a cached rerun
      of one sample (`limit=1`: all that does not grow with the samples asked, and the label list
      read), with the most (c) can be while that part stays; and of that, how long the interpreter
      and Hydra alone take (a Hydra app over the same config whose task does nothing);
  (a) ger's end-to-end rate vs decoding the same images only, with the same reader in the same
      worker pool (ger/run/stream.py Decoder; target >= 80%); and the same without the run's fixed
      part (interpreter and Hydra start-up, file digests, scoring's imports, writing the files),
      taken as the first run's time minus the cached rerun's, which does all of that and nothing else.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHORT = 3  # runs of each sub-second measurement a round (the cached reruns, the Hydra-only app)
sys.path.insert(0, str(REPO / "tests"))


def make_images(root: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    labels = ["anger", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    lines = ["name,gt"]
    for i in range(n):
        base = (x * (1 + i % 5) + y * (1 + i % 3)) % 256
        rgb = np.stack([base, (base + 85 * (i % 3)) % 256, 255 - base], axis=-1)
        rgb = np.clip(rgb + rng.integers(-8, 8, rgb.shape), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"img_{i:05d}.jpg", quality=90)
        lines.append(f"img_{i:05d},{labels[i % 7]}")
    (root / "label.csv").write_text("\n".join(lines) + "\n")


def make_clips(root: Path, n: int) -> None:
    import cv2
    import numpy as np

    (root / "videos").mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:480, 0:640]
    labels = ["anger", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    lines = ["name,gt"]
    for i in range(n):
        writer = cv2.VideoWriter(str(root / "videos" / f"img_{i:05d}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"),
                                 25, (640, 480))  # fmt: skip
        for k in range(50):
            base = ((x * (1 + i % 5) + y + 3 * k) % 256).astype(np.uint8)
            base[:16, :16], base[:16, 16:32] = i % 256, i // 256  # the clip's number: no two files alike
            writer.write(np.ascontiguousarray(np.stack([base, 255 - base, base // 2], axis=-1)))
        writer.release()
        lines.append(f"img_{i:05d},{labels[i % 7]}")
    (root / "label.csv").write_text("\n".join(lines) + "\n")


def tree_sample(pid: int, cpu: dict[int, float]) -> int:
    """RSS of the process tree (bytes); records each process's CPU seconds so far into `cpu`."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            with p.oneshot():
                total += p.memory_info().rss
                times = p.cpu_times()
                cpu[p.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


@dataclass
class CpuUse:
    """CPU seconds of one run: ger's process tree, its main process (the tree less its workers as
    last sampled), and this process (the instant server's thread and the 50 ms sampler)."""

    tree: float
    main: float
    here: float

    def text(self, n: int) -> str:
        per = 1000 / n
        workers = (self.tree - self.main) * per
        return (f"ger {self.tree * per:.2f} ms/sample of CPU (main process {self.main * per:.2f}, "
                f"decoding workers {workers:.2f}), server {self.here * per:.2f}")  # fmt: skip


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children so far."""
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def overrides(url: str, root: Path, out: Path, clips: bool) -> list[str]:
    """The benchmark's `ger run` overrides."""
    dataset = ["dataset=demo_video"] if clips else ["dataset=demo", "dataset.layout.extension=.jpg"]
    return [
        *dataset, f"dataset.layout.root={root}", "dataset.demo=false", "model=qwen2_5_vl_7b",
        "backend=server", f"backend.base_url={url}", "progress=false", f"hydra.run.dir={out}",
    ]  # fmt: skip


def ger_run(url: str, root: Path, cache: Path, out: Path, limit: int | None, clips: bool, pool: dict):
    """Wall seconds, peak tree RSS (bytes) and metrics.json of one `ger run`; `pool`: the stream
    settings given on the command line (workers, nice)."""
    args = ["run", *overrides(url, root, out, clips)]
    if limit:
        args.append(f"limit={limit}")
    args += [f"stream.{k}={v}" for k, v in pool.items() if v is not None]
    env = {**os.environ, "GER_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    start, own, before = time.perf_counter(), time.process_time(), children_cpu()
    proc = subprocess.Popen([sys.executable, "-m", "ger.cli", *args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    peak = 0
    cpu: dict[int, float] = {}
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, tree_sample(proc.pid, cpu))
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    reader.join()
    if proc.returncode:
        raise SystemExit(f"ger run failed:\n{b''.join(err).decode()[-3000:]}")
    tree = children_cpu() - before  # ger and its workers (each waited for)
    workers = sum(v for k, v in cpu.items() if k != proc.pid)
    used = CpuUse(tree, tree - workers, time.process_time() - own)
    return seconds, peak, json.loads((out / "metrics.json").read_text()), used


# a Hydra app over ger's conf/ whose task does nothing; as ger does, it composes the config once
# where nothing but -m sets the run mode (ger/cli.py _mode_known) and leaves out the exit's collection
HYDRA_ONLY = """
import gc, sys, hydra
from pathlib import Path
from ger.cli import _mode_known
conf = sys.argv.pop(1)
@hydra.main(config_path=conf, config_name="config", version_base="1.3")
def app(cfg): pass
with _mode_known(sys.argv[1:], Path(conf)):
    app()
gc.freeze()
"""


def hydra_only(url: str, root: Path, out: Path, clips: bool) -> float:
    """Wall seconds of the interpreter, Hydra's import and its composition of the run's config, with a
    task that does nothing: the part of a `ger run` that is not ger's."""
    args = [sys.executable, "-c", HYDRA_ONLY, str(REPO / "conf"), *overrides(url, root, out, clips)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    subprocess.run(args, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def decode_only(root: Path, n: int, clips: bool, pool: dict) -> float:
    """Seconds to describe and decode the first n samples in ger's worker pool, nothing else.

    The workers do exactly what they do in the `ger run backend=server` above: decode, and hand back
    the images as the server backend sends them (DecodeSpec.wire, its default JPEG quality)."""
    from omegaconf import OmegaConf

    from ger.backends.base import check_backend
    from ger.data.media import describe_sample
    from ger.records import Sample
    from ger.run.stream import Decoder, DecodeSpec, StreamStats, chunks, worker_count, worker_nice

    kind = "video" if clips else "image"
    paths = [root / "videos" / f"img_{i:05d}.mp4" if clips else root / "images" / f"img_{i:05d}.jpg"
             for i in range(n)]  # fmt: skip
    shells = [describe_sample(Sample("demo", p.stem, "happy", media=p), kind, frames=3) for p in paths]
    stream = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "config.yaml").stream,
                             {k: v for k, v in pool.items() if v is not None})  # fmt: skip
    stats = StreamStats(window=128, workers=worker_count(stream), nice=worker_nice(stream))
    wire = check_backend("server", {}).wire_quality()
    decoder = Decoder(DecodeSpec(kind, 3, "paper", False, wire), stats, progress=False)
    start = time.perf_counter()
    try:
        parts = chunks([(s.sample.name,) for s in shells], 64)
        by_name = {s.sample.name: s for s in shells}
        pending = decoder.start([by_name[g[0]] for g in parts[0]], n)
        for i in range(len(parts)):
            done = decoder.collect(pending)
            pending = decoder.start([by_name[g[0]] for g in parts[i + 1]], n) if i + 1 < len(parts) else []
            del done
    finally:
        decoder.close()
    return time.perf_counter() - start


def http_floor(url: str, image: Path, n: int = 1000) -> float:
    """CPU ms per request of ger's HTTP client alone (ger/backends/http_client.py, 32 in flight),
    POSTing a body like the run's (one image as a data URL) to the same server: the least any
    HTTP backend pays per request on ger's side."""
    import asyncio
    import base64

    from ger.backends.http_client import Session

    data_url = "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()
    part = {"type": "image_url", "image_url": {"url": data_url}}
    content = [{"type": "text", "text": "What emotion?"}, part]
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()

    async def post_all() -> float:
        session, room = Session(url, "", 600), asyncio.Semaphore(32)

        async def one() -> None:
            async with room:
                await session.request("POST", "/chat/completions", body)

        await one()  # the connection and its first request are not timed
        start = time.thread_time()
        await asyncio.gather(*(one() for _ in range(n)))
        spent = time.thread_time() - start
        await session.close()
        return 1000 * spent / n

    return asyncio.run(post_all())


def digest_floor(root: Path, n: int) -> float:
    """CPU ms per image of the cache key's file digest alone: sha256 of each file's bytes, read as
    ger/data/digests.py reads them on a first run (hashlib.file_digest), from the page cache as there.
    Any design pays it once per file: the key must name the bytes before anything is sent. The stdlib
    call itself, not ger's file_digest: in this process that one answers from the digests remembered
    when decode_only described the same files."""
    import hashlib

    paths = sorted((root / "images").glob("*.jpg"))[:n]
    start = time.thread_time()
    for path in paths:
        with open(path, "rb") as f:
            hashlib.file_digest(f, "sha256")
    return 1000 * (time.thread_time() - start) / len(paths)


@dataclass
class Round:
    """One round's first run, cached rerun and decode-only pass of the --n samples."""

    first_s: float
    first_mem: int
    first_cpu: CpuUse
    stream: dict
    again_s: float
    again_mem: int
    again_stream: dict
    one_s: float  # a cached rerun of one sample: the run's fixed part alone
    hydra_s: float  # the part of it that is the interpreter and Hydra (hydra_only)
    decode_s: float
    decode_cpu: CpuUse


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--clips", action="store_true", help="3-frame mp4 clips instead of images")
    parser.add_argument("--workers", type=int, default=None, help="stream.workers (default: one per core)")
    parser.add_argument("--nice", type=int, default=None, help="stream.nice (default: conf/config.yaml's)")
    parser.add_argument("--rounds", type=int, default=3, help="first run, rerun and decode-only rounds")
    args = parser.parse_args()
    what = "clips" if args.clips else "images"
    from instant_server import InstantServer

    # ger's modules byte-compiled, as an installed package has them: a run under PYTHONDONTWRITEBYTECODE
    # (as on this project's machines) would compile them all again each time, on both sides of (c)
    compileall.compile_dir(str(REPO / "ger"), quiet=1)

    pool = {"workers": args.workers, "nice": args.nice}
    server = InstantServer("happy").start()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        root = tmp_path / "data"
        t0 = time.perf_counter()
        (make_clips if args.clips else make_images)(root, args.n)
        print(f"made {args.n} {what} in {time.perf_counter() - t0:.1f} s", flush=True)

        def run(cache: str, out: str, limit: int | None):
            return ger_run(server.url, root, tmp_path / cache, tmp_path / out, limit, args.clips, pool)

        small_s, small_mem, _, _ = run("small", "small", args.small)
        print(f"first run of {args.small}: {small_s:.1f} s", flush=True)
        rounds = []
        for i in range(args.rounds):  # each round from an empty cache; the machine's pace drifts between
            first_s, first_mem, first, first_cpu = run(f"c{i}", f"first{i}", None)
            # the short runs, interleaved, SHORT times each (their median): one sub-second run varies by
            # a third on this machine
            reruns, ones, hydras = [], [], []
            for k in range(SHORT):
                reruns.append(run(f"c{i}", f"again{i}_{k}", None))
                ones.append(run(f"c{i}", f"one{i}_{k}", 1)[0])
                hydras.append(hydra_only(server.url, root, tmp_path / f"hydra{i}_{k}", args.clips))
            again_s, again = median([r[0] for r in reruns]), reruns[0][2]
            again_mem, one_s, hydra_s = max(r[1] for r in reruns), median(ones), median(hydras)
            own, before = time.process_time(), children_cpu()
            decode_s = decode_only(root, args.n, args.clips, pool)
            main_cpu = time.process_time() - own  # this process: the pool's results, nothing else
            decode_cpu = CpuUse(children_cpu() - before + main_cpu, main_cpu, 0.0)
            rounds.append(Round(first_s, first_mem, first_cpu, first["stream"], again_s, again_mem,
                                again["stream"], one_s, hydra_s, decode_s, decode_cpu))  # fmt: skip
            print(f"round {i + 1}: first run {first_s:.1f} s, cached rerun {again_s:.1f} s, "
                  f"decode only {decode_s:.1f} s", flush=True)  # fmt: skip
        sample = next(root.glob("videos/*.mp4" if args.clips else "images/*.jpg"))
        floor = None if args.clips else http_floor(server.url, sample)
        digest = None if args.clips else digest_floor(root, args.n)
    server.stop()
    report(args, what, small_mem, rounds, floor, digest)


def report(
    args: argparse.Namespace,
    what: str,
    small_mem: int,
    rounds: list[Round],
    floor: float | None,
    digest: float | None,
) -> None:
    """Each target's ratio per round and their median (the figure the README quotes)."""
    mib, n = 1024 * 1024, args.n
    last = rounds[-1]
    print(f"stream stats, first run of {n}: {last.stream}; rerun: {last.again_stream}")
    mems = [r.first_mem / small_mem for r in rounds]
    print(f"(b) peak memory {n} {what} {', '.join(f'{r.first_mem / mib:.0f}' for r in rounds)} MiB vs "
          f"{args.small} {what} {small_mem / mib:.0f} MiB: ratio {median(mems):.2f} "
          f"(rounds {', '.join(f'{m:.2f}' for m in mems)}; target <= 1.3)")  # fmt: skip
    speedups = [r.first_s / r.again_s for r in rounds]
    pairs = ", ".join(f"{r.first_s:.1f} s vs {r.again_s:.1f} s" for r in rounds)
    print(f"(c) first run vs cached rerun: {pairs} "
          f"(peak {last.again_mem / mib:.0f} MiB): {median(speedups):.1f}x faster "
          f"(rounds {', '.join(f'{x:.1f}x' for x in speedups)}; target >= 10x)")  # fmt: skip
    # what any rerun pays before its first sample: the interpreter, Hydra's composition, the imports,
    # the label list, opening the caches, scoring and writing the files
    ones = ", ".join(f"{r.one_s:.2f}" for r in rounds)
    share = 100 * median([r.one_s / r.again_s for r in rounds])
    most = median([r.first_s / r.one_s for r in rounds])
    print(f"    a cached rerun of 1 {what[:-1]} (the fixed part): {ones} s, {share:.0f}% of the cached "
          f"rerun; the most (c) can be while that part stays: {most:.1f}x")  # fmt: skip
    hydras = ", ".join(f"{r.hydra_s:.2f}" for r in rounds)
    print(f"    of it, the interpreter and Hydra alone (a task that does nothing over the same config): "
          f"{hydras} s, {100 * median([r.hydra_s / r.one_s for r in rounds]):.0f}%")  # fmt: skip
    shares = [r.decode_s / r.first_s for r in rounds]
    workers = last.stream["workers"]
    print(f"(a) end to end vs decode only: "
          f"{', '.join(f'{n / r.first_s:.1f} vs {n / r.decode_s:.1f}' for r in rounds)} {what}/s "
          f"({workers} decoding workers, {os.cpu_count()} cores): {100 * median(shares):.0f}% "
          f"(rounds {', '.join(f'{100 * x:.0f}%' for x in shares)}; target >= 80%)")  # fmt: skip
    # the cached rerun does all the rest: start-up, digests, scoring, files
    streamed = [r.decode_s / (r.first_s - r.again_s) for r in rounds]
    print(f"    without the fixed part (the first run minus the cached rerun): {100 * median(streamed):.0f}% "
          f"of decode only (rounds {', '.join(f'{100 * x:.0f}%' for x in streamed)})")  # fmt: skip
    print(f"    CPU, first run: {last.first_cpu.text(n)}")
    print(f"    CPU, decode only: {last.decode_cpu.text(n).replace(', server 0.00', '')}")
    if floor is None:
        return
    print(f"    CPU of ger's HTTP client alone, one image a request, same server: {floor:.2f} ms/request")
    print(f"    CPU of the cache key's file digest alone (sha256 of a file's bytes): {digest:.2f} ms/image")
    if workers < len(os.sched_getaffinity(0)):
        return  # a core left to ger's main process and the server: the bound below assumes none is
    # with every core decoding, rates go as 1 / CPU a sample: a run must add at least the server's
    # CPU and one HTTP request's to what decoding alone costs
    decode_ms, server_ms = 1000 * last.decode_cpu.tree / n, 1000 * last.first_cpu.here / n
    ceiling = 100 * decode_ms / (decode_ms + server_ms + floor)
    print(f"    the most (a) can be on these cores, a harness costing only its HTTP client: decode only "
          f"{decode_ms:.2f} / ({decode_ms:.2f} + server {server_ms:.2f} + HTTP client {floor:.2f}) ms "
          f"a sample = {ceiling:.0f}% (last round)")  # fmt: skip
    # the key's digest too: whichever process sends the requests, with every core busy the shares of
    # the CPU a sample decide the rate, so this bound holds on any number of cores
    keyed = 100 * decode_ms / (decode_ms + server_ms + floor + digest)
    left = decode_ms / 0.8 - decode_ms - server_ms - floor - digest
    print(f"    and its file digest: {keyed:.0f}%; (a) at 80% leaves {left:.2f} ms a sample for all else "
          f"ger does (the workers' hand-off, the JSON, the answer's parse, the cache row)")  # fmt: skip


if __name__ == "__main__":
    main()
