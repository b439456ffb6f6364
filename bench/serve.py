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

from sse_client import HTTPStatusError, SSEConnection  # noqa: E402  # bench/ is on sys.path

from bench.harness import FLYWHEEL, ServerProcess  # noqa: E402
from flywheel_demo.model import build_random_model  # noqa: E402

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
    p.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="the load generator's HTTP client: raw (bench/sse_client.py, less CPU) or httpx",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "serve.json")
    return p.parse_args()


@torch.inference_mode()
def baselines(
    model_dir: Path, max_tokens: int, device: str, static_batch: int = 32
) -> dict[str, float]:
    """tok/s of plain `generate`: batch 1 one after another, and one static batch."""
    from flywheel_model.loading import load_base

    model, tokenizer = load_base(model_dir, device=device)
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    kwargs = dict(
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.generate(ids, **kwargs)  # warm-up
    n_single = 48
    start = time.perf_counter()
    for _ in range(n_single):
        model.generate(ids, **kwargs)
    single = n_single * max_tokens / (time.perf_counter() - start)
    batch = ids.expand(static_batch, -1)
    model.generate(batch, **kwargs)
    start = time.perf_counter()
    rounds = 8
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
    from flywheel_server.engine_api import EngineRequest
    from flywheel_server.torch_engine import TorchEngine

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


def completion_body(max_tokens: int) -> dict[str, object]:
    return {
        "model": "policy",
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


class Tally:
    """Time to first token and token count of one streamed completion, event by event."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.ttft: float | None = None
        self.tokens = 0

    def event(self, data: bytes) -> None:
        if data == b"[DONE]" or (self.ttft is not None and b'"usage"' not in data):
            return  # text after the first: nothing to count (the usage chunk has the total)
        doc = json.loads(data)
        if self.ttft is None and doc["choices"] and doc["choices"][0].get("text"):
            self.ttft = time.perf_counter() - self.start
        if doc.get("usage"):
            self.tokens = doc["usage"]["completion_tokens"]

    def result(self) -> tuple[float, int]:
        ttft = self.ttft if self.ttft is not None else time.perf_counter() - self.start
        return ttft, self.tokens


async def one_request_httpx(
    client: httpx.AsyncClient, url: str, max_tokens: int
) -> tuple[float, int]:
    tally = Tally()
    async with client.stream("POST", url, json=completion_body(max_tokens)) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                tally.event(line[6:].encode())
    return tally.result()


async def one_request_raw(conn: SSEConnection, max_tokens: int) -> tuple[float, int]:
    tally = Tally()
    body = json.dumps(completion_body(max_tokens)).encode()
    async for data in conn.post_events("/v1/completions", body):
        tally.event(data)
    return tally.result()


async def load(
    base_url: str, clients: int, requests: int, max_tokens: int, client: str = "raw"
) -> dict[str, float]:
    """N clients, each sending `requests` streamed completions in sequence on its own
    keep-alive connection; client "raw" (bench/sse_client.py) or "httpx"."""
    url = f"{base_url}/v1/completions"
    host, port = httpx.URL(base_url).host, httpx.URL(base_url).port or 80
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    results: list[tuple[float, int]] = []
    failures = 0
    async with httpx.AsyncClient(timeout=300, limits=limits) as pool:

        async def worker() -> None:
            nonlocal failures
            conn = SSEConnection(host, port)
            try:
                for _ in range(requests):
                    try:
                        if client == "httpx":
                            results.append(await one_request_httpx(pool, url, max_tokens))
                        else:
                            results.append(await one_request_raw(conn, max_tokens))
                    except (httpx.HTTPError, HTTPStatusError, OSError, asyncio.IncompleteReadError):
                        failures += 1
            finally:
                await conn.close()

        await one_request_httpx(pool, url, max_tokens)  # warm-up
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
    null = [sys.executable, str(ROOT / "bench" / "null_engine.py")]
    program = null if backend == "null" else [FLYWHEEL]
    server = ServerProcess(
        model_dir, data_dir, args=flags, start_timeout_s=900, program=program
    ).start()
    try:
        assert server.proc is not None
        return [http_level(model_dir, server.http, server.proc.pid, c, args) for c in levels]
    finally:
        server.stop()


def http_level(
    model_dir: Path, url: str, pid: int, clients: int, args: argparse.Namespace
) -> dict[str, float]:
    """One concurrency level through HTTP, with the baselines measured just before it: this
    machine's speed drifts by tens of percent within minutes, so each ratio compares figures
    taken side by side. Also the CPU the server (pid and its children) and the load generator
    used, per token."""
    base = isolated(baselines, model_dir, args.max_tokens, args.device)
    server_before, client_before = cpu_seconds(pid), time.process_time()
    result = asyncio.run(load(url, clients, args.requests, args.max_tokens, args.client))
    server_cpu, client_cpu = cpu_seconds(pid) - server_before, time.process_time() - client_before
    per_token = {
        "server_cpu_ms_per_token": 1000 * server_cpu / max(1, result["tokens"]),
        "client_cpu_ms_per_token": 1000 * client_cpu / max(1, result["tokens"]),
    }
    return {**result, **base, **per_token}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children, from /proc (Linux)."""
    total, tick = 0, os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.name == str(pid) or fields[1] == str(pid):
            total += int(fields[11]) + int(fields[12])
    return total / tick


def engine_level(model_dir: Path, clients: int, args: argparse.Namespace) -> dict[str, float]:
    """The engine alone in-process at one concurrency level, with its own baselines."""
    base = isolated(baselines, model_dir, args.max_tokens, args.device)
    rate = isolated(engine_rate, model_dir, clients, args.requests, args.max_tokens, args.device)
    return {"clients": clients, "tok_s": rate, **base}


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
        assert process.proc is not None
        return [http_level(model_dir, process.url, process.proc.pid, c, args) for c in levels]
    finally:
        process.stop()


def parameters(model_dir: Path) -> int:
    from flywheel_model.loading import load_base

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
        )
        params = isolated(parameters, model_dir)
        engine = [engine_level(model_dir, c, args) for c in levels]
        runs = {
            backend: serve_levels(model_dir, Path(tmp) / backend, backend, levels, args)
            for backend in args.backends.split(",")
        }
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
        "client": args.client,
        "engine_in_process": engine,
        "http": runs,
    }
    print(
        f"model: Llama hidden {args.hidden}, {args.layers} layers, {params / 1e6:.2f} M "
        f"parameters; {args.max_tokens} new tokens; each row's ratios against the `generate` "
        "baselines measured just before it"
    )
    header = ("backend", "clients", "1-at-a-time", "static-32", "tok/s", "x 1-at-a-time")
    header += ("of static-32", "TTFT p50 ms", "TTFT p99 ms", "failed", "server ms/tok", "client")
    print("".join(f"{h:>14}" for h in header))
    rows = [("engine", r) for r in engine]
    rows += [(backend, r) for backend, backend_runs in runs.items() for r in backend_runs]
    for backend, r in rows:
        single = r["generate_one_at_a_time_tok_s"]
        static = r["generate_static_batch_32_tok_s"]
        cells = [backend, r["clients"], f"{single:.0f}", f"{static:.0f}", f"{r['tok_s']:.0f}"]
        cells += [f"{r['tok_s'] / single:.1f}x", f"{r['tok_s'] / static:.0%}"]
        if backend == "engine":
            cells += ["-"] * 5
        else:
            cells += [f"{r['ttft_p50_ms']:.1f}", f"{r['ttft_p99_ms']:.1f}", r["failed"]]
            cells += [f"{r['server_cpu_ms_per_token']:.2f}", f"{r['client_cpu_ms_per_token']:.2f}"]
        print("".join(f"{c:>14}" for c in cells))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
