#!/usr/bin/env python
"""Start `vllm serve` for a model config, wait until it is healthy, print how to use it.

    python launch/serve.py qwen2_5_vl_7b                   # one GPU, port 8000
    python launch/serve.py qwen2_5_vl_72b --tp 4           # tensor parallel over 4 GPUs
    python launch/serve.py qwen2_5_vl_7b --dp 8            # 8 engine replicas behind one endpoint
    python launch/serve.py qwen2_5_vl_7b --dry-run         # print the command only
    python launch/serve.py qwen2_5_vl_7b -- --gpu-memory-utilization 0.8   # extra vLLM flags

MODEL is a conf/model/<name>.yaml name or a path to such a YAML file. The model is
served under its config name, so `ger run backend=server model=<name>` finds it.
The script stays in the foreground and stops the server on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

CPU_ENV = {  # vLLM's CPU build: a small KV cache, and the engine in the server's own process
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def load_model_config(model: str) -> dict[str, Any]:
    """A model config by name (conf/model/<name>.yaml) or by YAML path, as a plain dict."""
    from omegaconf import OmegaConf

    if model.endswith((".yaml", ".yml")):
        data = OmegaConf.to_container(OmegaConf.load(model), resolve=True)
        assert isinstance(data, dict), f"{model} must hold a mapping"
        return data
    from ger.config import load_group_yaml

    return load_group_yaml("model", model)


def engine_command() -> list[str]:
    """`vllm serve` for the official package; the module entry point for the vllm-cpu build.

    vllm-cpu installs the `vllm` module under another distribution name, and the
    `vllm` CLI then fails looking up its own version; the module entry point works.
    """
    try:
        importlib.metadata.version("vllm")
        return ["vllm", "serve"]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


def build_command(model_cfg: dict[str, Any], args: argparse.Namespace, weights: str) -> list[str]:
    """The vLLM server command line for one model config and the parsed flags."""
    limits = {"image": int(model_cfg.get("max_images", 1)), "video": int(model_cfg.get("max_videos", 0))}
    if model_cfg.get("supports_audio"):  # one sound track per sample (input_audio parts)
        limits["audio"] = int(model_cfg.get("max_audios", 0))
    cmd = [*engine_command(), weights]
    cmd += ["--served-model-name", model_cfg["name"], "--host", args.host, "--port", str(args.port)]
    cmd += ["--max-model-len", str(model_cfg.get("max_model_len", 4096))]
    cmd += ["--limit-mm-per-prompt", json.dumps(limits, separators=(",", ":"))]
    cmd += ["--dtype", str(args.dtype or model_cfg.get("dtype", "auto"))]
    cmd += ["--trust-request-mm-kwargs"]  # lets backend.video_metadata=true send a clip's fps
    if model_cfg.get("revision"):
        cmd += ["--revision", str(model_cfg["revision"])]
    if model_cfg.get("trust_remote_code"):
        cmd += ["--trust-remote-code"]
    if model_cfg.get("mm_processor_kwargs"):
        cmd += ["--mm-processor-kwargs", json.dumps(model_cfg["mm_processor_kwargs"])]
    if args.tp > 1:
        cmd += ["--tensor-parallel-size", str(args.tp)]
    if args.dp > 1:
        cmd += ["--data-parallel-size", str(args.dp)]
    if args.cpu:
        cmd += ["--enforce-eager", "--distributed-executor-backend", "uni"]
    if args.api_key_env:
        cmd += ["--api-key", "$" + args.api_key_env]  # placeholder; replaced from the env at launch
    return cmd + list(args.extra)


def resolve_weights(model_cfg: dict[str, Any]) -> str:
    """Hub id or folder to load; a tiny test model is built locally first."""
    if model_cfg.get("tiny"):
        from ger.testing.tiny_models import ensure_tiny_model

        return str(ensure_tiny_model(model_cfg["tiny"]))
    if not model_cfg.get("path"):
        raise SystemExit(f"model {model_cfg.get('name')!r} has neither `path` nor `tiny`")
    return str(model_cfg["path"])


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll GET /health until 200; fail if the server exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the vLLM server exited with code {proc.returncode} before becoming healthy")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"the vLLM server was not healthy at {url} after {timeout:.0f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="conf/model/<name>.yaml name, or a path to a model YAML")
    parser.add_argument("--host", default="0.0.0.0", help="bind address (127.0.0.1 for this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (GPUs per engine)")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size (engine replicas)")
    parser.add_argument("--dtype", default=None, help="override the model config's dtype")
    parser.add_argument("--cpu", action="store_true", help="vLLM CPU build: eager mode, one process")
    parser.add_argument(
        "--api-key-env", default=None, help="NAME of an env variable holding a key to require"
    )
    parser.add_argument("--health-timeout", type=float, default=1800.0, help="seconds to wait for /health")
    parser.add_argument("--dry-run", action="store_true", help="print the command and exit")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # everything after -- goes to vLLM unchanged
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    args.extra = extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_cfg = load_model_config(args.model)
    weights = resolve_weights(model_cfg) if not args.dry_run else str(model_cfg.get("path") or "<tiny>")
    cmd = build_command(model_cfg, args, weights)
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    env = dict(os.environ)
    if args.cpu:
        env = {**CPU_ENV, **env}  # the caller's values win
    if args.api_key_env:  # the key goes on the command line only here, never into a printed line
        cmd = [env[args.api_key_env] if c == "$" + args.api_key_env else c for c in cmd]
    proc = subprocess.Popen(cmd, env=env)  # same process group: a kill of this script's group ends both

    def stop(*_: Any) -> None:
        if proc.poll() is None:
            proc.terminate()  # vLLM shuts its own workers down on SIGTERM

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    base = f"http://{host}:{args.port}"
    wait_healthy(f"{base}/health", proc, args.health_timeout)
    print(f"\nvLLM is serving {model_cfg['name']} at {base}/v1", flush=True)
    print(
        f"  ger run backend=server model={model_cfg['name']} backend.base_url={base}/v1 dataset=...\n",
        flush=True,
    )
    return proc.wait()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ger` from a plain checkout
    sys.exit(main())
