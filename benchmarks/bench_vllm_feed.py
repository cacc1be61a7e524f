"""The offline vLLM backend's feed vs `LLM.generate` on the same pre-built inputs, one engine.

Run by hand:  python benchmarks/bench_vllm_feed.py [--n 96] [--chunk 16] [--max-tokens 16] [--model NAME]

Builds --n single-image requests and, with the backend's own conversion, their engine prompts and
SamplingParams (so every side runs the same inputs), then on one engine (the CPU engine and the
tiny random Qwen2-VL by default; on a GPU host pass a real model config) times, in turn:
  - `LLM.generate` over all pre-built prompts at once (the engine's own best case);
  - ger's feed (`VLLMBackend.generate`: at most --chunk requests in the engine, topped up after
    every step, each answer yielded when it finishes): from the call to the last answer, and from
    the first answer to the last;
  - the chunked path it replaces: `LLM.generate` per --chunk requests, each chunk drained before
    the next is rendered.
Prefix caching is off, so no side profits from an earlier one. Prints each time and the feed's
rate as a fraction of `LLM.generate`'s (target >= 90%). CPU timings on a shared machine are
noisy (other work takes the cores for seconds): each side runs once untimed, then the order of
the sides rotates over --rounds rounds, and the fastest round of each side is compared (the
least disturbed one), with the medians printed beside.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--model", default="tiny-random-qwen2vl")
    args = parser.parse_args()

    import vllm_worker as w

    from ger.backends import create_backend
    from ger.records import Request

    overrides = w.OVERRIDES | {
        "chunk_size": args.chunk,
        "max_num_seqs": args.chunk,
        "engine_kwargs": {"enable_prefix_caching": False},
    }
    backend = create_backend(
        "vllm", w.backend_config(overrides | {"load_format": "auto"}), w.load_model(args.model)
    )
    ask = w.text("Which emotion does the face show? Answer with one label.")

    def requests(tag: str) -> list[Request]:
        return [
            Request(
                key=f"{tag}{i}", names=(f"s{i}",), messages=w.user(ask, w.img(i)), max_tokens=args.max_tokens
            )
            for i in range(args.n)
        ]

    built = requests("x")
    prompts = [backend.engine_prompt(r) for r in built]
    params = [backend.sampling_params(r) for r in built]

    def engine() -> float:
        start = time.perf_counter()
        backend.llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    def feed() -> tuple[float, float]:
        start, first = time.perf_counter(), None
        for _ in backend.generate(built):
            first = first or time.perf_counter()
        end = time.perf_counter()
        return end - start, end - (first or end)

    def chunked() -> float:
        start = time.perf_counter()
        for i in range(0, args.n, args.chunk):
            list(backend._generate_chunk(built[i : i + args.chunk]))
        return time.perf_counter() - start

    engine(), feed(), chunked()  # warm-up: every batch shape each side meets is compiled once
    times: dict[str, list[float]] = {"engine": [], "feed": [], "feed first->last": [], "chunked": []}
    sides = ["engine", "feed", "chunked"]
    for r in range(args.rounds):
        for side in sides[r % 3 :] + sides[: r % 3]:
            if side == "feed":
                total, span = feed()
                times["feed"].append(total)
                times["feed first->last"].append(span)
            else:
                times[side].append(engine() if side == "engine" else chunked())
    med = {k: min(v) for k, v in times.items()}
    print(f"{args.n} requests, {args.max_tokens} tokens at most, chunk {args.chunk}, model {args.model}")
    for k, v in times.items():
        print(f"  {k:18s} fastest {med[k]:.2f} s, median {statistics.median(v):.2f} s  "
              f"({', '.join(f'{x:.2f}' for x in v)})")  # fmt: skip
    print(f"(d) ger's feed at {100 * med['engine'] / med['feed']:.0f}% of LLM.generate's rate "
          f"(first->last answer: {100 * med['engine'] / med['feed first->last']:.0f}%); the chunked "
          f"path it replaces: {100 * med['engine'] / med['chunked']:.0f}% (target >= 90%)")  # fmt: skip
    backend.close()


if __name__ == "__main__":
    main()
