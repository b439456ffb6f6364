"""Hot-swap under load: publish-and-promote N adapter versions while clients stream.

For each swap: time from the start of the publish call (a streamed, checksummed upload through
the gRPC contract) to the first request answered by the new version; and, over the whole run,
requests that failed. A program, not a test:

    .venv/bin/python bench/hot_swap.py --swaps 50 --clients 32 --out bench/out/hot-swap-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import ServerProcess, make_adapter  # noqa: E402
from flywheel_client import FlywheelClient  # noqa: E402
from flywheel_demo.model import build_random_model  # noqa: E402
from flywheel_model import loading  # noqa: E402

PROMPT = "<|bos|><|user|>\nreverse: flywheel\n<|assistant|>\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--swaps", type=int, default=50)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--backend", default="torch", help="torch, or vllm (after make vllm-env)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "hot-swap.json")
    return p.parse_args()


async def stream(client: httpx.AsyncClient, url: str, max_tokens: int) -> None:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 1.0, "stream": True}
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"error"' in line[:20]:
                raise RuntimeError(line)


def run_load(
    base_url: str, clients: int, max_tokens: int, stop: threading.Event, tally: dict[str, int]
) -> None:
    async def main() -> None:
        url = f"{base_url}/v1/completions"
        limits = httpx.Limits(max_connections=clients + 4)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:

            async def worker() -> None:
                while not stop.is_set():
                    try:
                        await stream(client, url, max_tokens)
                        tally["ok"] += 1
                    except Exception as e:  # any failure counts, whatever its kind
                        tally["failed"] += 1
                        tally.setdefault("first_error", str(e)[:200])  # type: ignore[arg-type]

            await asyncio.gather(*(worker() for _ in range(clients)))

    asyncio.run(main())


def p99(values: list[float]) -> float:
    """The 99th percentile, nearest rank below (the largest value when there are under 100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_random_model(root / "model", hidden=128, layers=4, heads=4)
        base = loading.base_fingerprint(model_dir)
        adapters = [
            make_adapter(model_dir, root / f"adapter-{i}", seed=i) for i in range(args.swaps)
        ]
        flags = ["--backend", args.backend]
        if args.backend == "vllm":
            flags += ["--vllm-python", str(ROOT / ".venv-vllm" / "bin" / "python")]
        server = ServerProcess(model_dir, root / "data", args=flags, start_timeout_s=900).start()
        stop = threading.Event()
        tally: dict[str, int] = {"ok": 0, "failed": 0}
        load = threading.Thread(
            target=run_load, args=(server.http, args.clients, args.max_tokens, stop, tally)
        )
        load.start()
        latencies: list[float] = []
        published: list[float] = []
        try:
            time.sleep(2.0)  # let the load reach steady state
            with FlywheelClient(server.grpc) as client, httpx.Client(timeout=60) as probe:
                for adapter in adapters:
                    start = time.perf_counter()
                    version = client.publish_adapter(
                        adapter, name="policy", base_model=base, promote=True
                    )
                    published.append(time.perf_counter() - start)  # uploaded, loaded and live
                    while True:
                        answer = probe.post(
                            f"{server.http}/v1/completions",
                            json={"prompt": PROMPT, "max_tokens": 1},
                        )
                        answer.raise_for_status()
                        if answer.json()["model"] == version.id:
                            break
                    latencies.append(time.perf_counter() - start)
        finally:
            stop.set()
            load.join()
            server.stop()
            if tally["failed"]:  # keep the logs that say why
                logs = args.out.parent / f"{args.out.stem}-logs"
                logs.mkdir(parents=True, exist_ok=True)
                for name in ("server.log", "vllm.log"):
                    if (root / "data" / name).exists():
                        shutil.copy(root / "data" / name, logs / name)
    first_served = [total - call for total, call in zip(latencies, published, strict=True)]
    report = {
        "backend": args.backend,
        "swaps": len(latencies),
        "clients": args.clients,
        "publish_to_serving_p50_s": statistics.median(latencies),
        "publish_to_serving_p99_s": p99(latencies),
        "publish_to_serving_max_s": max(latencies),
        # the two parts: the publish call (upload, checksum, store, load, smoke check, promote),
        # then the probe's wait for a request answered by the new version
        "publish_call_p50_s": statistics.median(published),
        "publish_call_p99_s": p99(published),
        "first_served_after_call_p50_s": statistics.median(first_served),
        "first_served_after_call_p99_s": p99(first_served),
        "requests_ok": tally["ok"],
        "requests_failed": tally["failed"],
        "first_error": tally.get("first_error"),
    }
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
