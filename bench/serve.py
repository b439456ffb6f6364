"""Serving throughput and time to first token: our HTTP server vs in-process `generate`.

One run, one model, side by side:
  - baselines: transformers `generate` in-process, one request at a time, and as one static batch;
  - ours: `flywheel serve` (a subprocess) driven by N concurrent streaming clients over HTTP,
    for each N in --clients and each backend in --backends (the embedded torch engine, and vLLM
    behind our server); tokens counted from the server's own usage report.
Prints a table of ratios and writes JSON. A program, not a test: run it on a quiet machine.

    .venv/bin/python bench/serve.py --out bench/out/serve-cpu.json
    .venv/bin/python bench/serve.py --backends torch,vllm   # after `make vllm-env`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flywheel_learner.demo_model import build_random_model  # noqa: E402
from tests.support import ServerProcess  # noqa: E402

PROMPT = "<|bos|><|user|>\nreverse: flywheel\n<|assistant|>\n"
T = TypeVar("T")


def isolated(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) in a fresh process. OpenMP keeps a thread team per calling thread, and torch ops
    on one thread slow later ops on another: one `generate` call on the main thread halved the
    engine thread's rate at 32 clients (5,779 -> 2,999 tok/s), so no measurement shares a process
    with another."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="1,8,32,64", help="concurrency levels (default 1,8,32,64)")
    p.add_argument("--requests", type=int, default=4, help="requests per client per level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128, help="model size (default: the demo's)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--backends",
        default="torch",
        help="comma-separated: torch and vllm (flywheel serve --backend ...), vllm-direct "
        "(vLLM's own server, no flywheel in front), null (flywheel with the model's math taken "
        "out: the ceiling of the server around it, see bench/null_engine.py)",
    )
    p.add_argument(
        "--vllm-python",
        type=Path,
        default=ROOT / ".venv-vllm" / "bin" / "python",
        help="the Python with vllm installed (default: .venv-vllm, from make vllm-env)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "serve.json")
    return p.parse_args()


@torch.inference_mode()
def baselines(
    model_dir: Path, max_tokens: int, device: str, static_batch: int = 32
) -> dict[str, float]:
    """tok/s of plain `generate`: batch 1 one after another, and one static batch."""
    from flywheel_learner.modeling import load_base

    model, tokenizer = load_base(model_dir, device=device)
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    kwargs = dict(
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.generate(ids, **kwargs)  # warm-up
    n_single = 16
    start = time.perf_counter()
    for _ in range(n_single):
        model.generate(ids, **kwargs)
    single = n_single * max_tokens / (time.perf_counter() - start)
    batch = ids.expand(static_batch, -1)
    model.generate(batch, **kwargs)
    start = time.perf_counter()
    rounds = 3
    for _ in range(rounds):
        model.generate(batch, **kwargs)
    static = rounds * static_batch * max_tokens / (time.perf_counter() - start)
    return {
        "generate_one_at_a_time_tok_s": single,
        f"generate_static_batch_{static_batch}_tok_s": static,
    }


def engine_rate(
    model_dir: Path, clients: int, requests: int, max_tokens: int, device: str
) -> float:
    return asyncio.run(engine_load(model_dir, clients, requests, max_tokens, device))


async def engine_load(
    model_dir: Path, clients: int, requests: int, max_tokens: int, device: str
) -> float:
    """tok/s of the engine alone, in-process (no HTTP, no store): where the server's time goes."""
    from flywheel_server.domain import Sampling
    from flywheel_server.engine import EngineRequest, TorchEngine

    engine = TorchEngine(model_dir, device=device, max_pending=4 * clients + 4, max_batch=64)
    request = EngineRequest(
        tuple(engine.encode(PROMPT)), 1, Sampling(temperature=1.0, max_tokens=max_tokens), None
    )

    async def one() -> int:
        tokens = 0
        async for event in engine.generate(request):
            tokens = event.completion_tokens
        return tokens

    async def worker() -> int:
        return sum([await one() for _ in range(requests)])

    try:
        await one()
        start = time.perf_counter()
        total = sum(await asyncio.gather(*(worker() for _ in range(clients))))
        return total / (time.perf_counter() - start)
    finally:
        engine.close()


async def one_request(client: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[float, int]:
    """(time to first token, completion tokens) of one streamed completion."""
    body = {
        "model": "policy",
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            if ttft is None and doc["choices"] and doc["choices"][0].get("text"):
                ttft = time.perf_counter() - start
            if doc.get("usage"):
                tokens = doc["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - start), tokens


async def load(base_url: str, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    url = f"{base_url}/v1/completions"
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await one_request(client, url, max_tokens)  # warm-up
        results: list[tuple[float, int]] = []
        failures = 0

        async def worker() -> None:
            nonlocal failures
            for _ in range(requests):
                try:
                    results.append(await one_request(client, url, max_tokens))
                except httpx.HTTPError:
                    failures += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    ttfts = sorted(t for t, _ in results)
    return {
        "clients": clients,
        "requests": len(results),
        "failed": failures,
        "tokens": sum(n for _, n in results),
        "tok_s": sum(n for _, n in results) / wall,
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
    }


def serve_levels(
    model_dir: Path, data_dir: Path, backend: str, levels: list[int], args: argparse.Namespace
) -> list[dict[str, float]]:
    if backend == "vllm-direct":
        return vllm_direct_levels(model_dir, data_dir, levels, args)
    flags = ["--device", args.device, "--backend", "torch" if backend == "null" else backend]
    if backend == "vllm":
        flags += ["--vllm-python", str(args.vllm_python)]
    program = (
        [sys.executable, str(ROOT / "bench" / "null_engine.py")] if backend == "null" else None
    )
    server = ServerProcess(
        model_dir,
        data_dir,
        args=flags,
        start_timeout_s=900,
        **({"program": program} if program else {}),
    ).start()
    try:
        return [asyncio.run(load(server.http, c, args.requests, args.max_tokens)) for c in levels]
    finally:
        server.stop()


def vllm_direct_levels(
    model_dir: Path, data_dir: Path, levels: list[int], args: argparse.Namespace
) -> list[dict[str, float]]:
    """The same clients against vLLM's own OpenAI server, started as the vllm backend starts it:
    what vLLM gives with flywheel taken out."""
    from flywheel_server import vllm_sidecar

    port = vllm_sidecar.free_loopback_port()
    command = vllm_sidecar.serve_command(
        args.vllm_python, model_dir, port=port, served_name="policy", max_loras=4,
        max_model_len=256, cpu=args.device == "cpu",
    )  # fmt: skip
    process = vllm_sidecar.VllmProcess(command, port, data_dir / "vllm.log").start()
    try:
        asyncio.run(process.wait_ready())
        return [asyncio.run(load(process.url, c, args.requests, args.max_tokens)) for c in levels]
    finally:
        process.stop()


def parameters(model_dir: Path) -> int:
    from flywheel_learner.modeling import load_base

    return sum(p.numel() for p in load_base(model_dir)[0].parameters())


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_random_model(
            Path(tmp) / "model",
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            intermediate=4 * args.hidden,
        )
        params = isolated(parameters, model_dir)
        base = isolated(baselines, model_dir, args.max_tokens, args.device)
        engine_only = {
            c: isolated(engine_rate, model_dir, c, args.requests, args.max_tokens, args.device)
            for c in levels
        }
        runs = {
            backend: serve_levels(model_dir, Path(tmp) / backend, backend, levels, args)
            for backend in args.backends.split(",")
        }
    single = base["generate_one_at_a_time_tok_s"]
    static = base["generate_static_batch_32_tok_s"]
    report = {
        "device": args.device
        if args.device != "cpu"
        else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "parameters": params,
        },
        "max_tokens": args.max_tokens,
        "baselines": base,
        "engine_in_process_tok_s": engine_only,
        "http": runs,
    }
    print(
        f"model: Llama hidden {args.hidden}, {args.layers} layers, {params / 1e6:.2f} M parameters; {args.max_tokens} new tokens"
    )
    print(f"generate one at a time: {single:8.0f} tok/s   static batch 32: {static:8.0f} tok/s")
    header = (
        "backend",
        "clients",
        "engine tok/s",
        "HTTP tok/s",
        "x one-at-a-time",
        "of static-32",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "failed",
    )
    print("".join(f"{h:>16}" for h in header))
    for backend, backend_runs in runs.items():
        for r in backend_runs:
            cells = (
                backend,
                r["clients"],
                f"{engine_only[r['clients']]:.0f}" if backend == "torch" else "-",
                f"{r['tok_s']:.0f}",
                f"{r['tok_s'] / single:.1f}x",
                f"{r['tok_s'] / static:.0%}",
                f"{r['ttft_p50_ms']:.1f}",
                f"{r['ttft_p99_ms']:.1f}",
                r["failed"],
            )
            print("".join(f"{c:>16}" for c in cells))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
