"""Soak: a long run at about 80% of capacity, with a hot swap every minute and a client that
drops or stalls a stream now and then. Does the server's memory or latency drift?

1. `flywheel serve` on a random model (or --model), with --write-timeout-s 5.
2. Capacity: --clients closed-loop clients for --probe-s seconds give a first estimate; then
   open-loop arrivals at 1.5 times it for --probe-s seconds give the completed requests per
   second the server sustains (what it answers, not what it refuses).
3. The soak: requests arrive at random (Poisson) at --load times that rate for --minutes, half
   of them streamed. Every --swap-every-s a new random LoRA adapter is published and promoted.
   Every --misbehave-every-s, in turn, a client drops its stream after the first bytes, or opens
   one and reads nothing for a minute before it goes away.
4. Every 10 s the server's RSS; per --window-min window: requests, failures, p50 and p99
   latency, RSS at the window's end. Failures are requests of the well-behaved clients that
   did not end in a complete answer (the misbehaving ones are not counted).

    .venv/bin/python bench/soak.py --minutes 30 --out bench/out/soak.json

A program, not a test; docs/benchmarks.md has its table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import ServerProcess, make_adapter, rss_bytes  # noqa: E402
from bench.hot_swap import p99  # noqa: E402
from flywheel_client import FlywheelClient  # noqa: E402
from flywheel_demo.model import build_random_model  # noqa: E402
from flywheel_model import loading  # noqa: E402

PROMPT = "<|bos|><|user|>\nreverse: flywheel\n<|assistant|>\n"
RSS_EVERY_S = 10.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--load", type=float, default=0.8, help="share of the measured capacity")
    p.add_argument("--clients", type=int, default=16, help="closed-loop clients of the probe")
    p.add_argument("--probe-s", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=None,
                   help="requests/s to offer; skips the probe (--load is then ignored)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--swap-every-s", type=float, default=60.0, help="0: no swaps")
    p.add_argument("--misbehave-every-s", type=float, default=30.0, help="0: no misbehaving")
    p.add_argument("--window-min", type=float, default=5.0)
    p.add_argument("--model", type=Path, default=None,
                   help="a model directory to serve; default: a random 4-layer Llama")  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "soak.json")
    return p.parse_args()


@dataclass
class Tally:
    """What the well-behaved clients saw: (arrival time, latency s, outcome) per request, the
    outcome one of "ok", "refused" (429: the server was past capacity) and "failed"."""

    requests: list[tuple[float, float, str]] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    swaps: list[tuple[float, bool]] = field(default_factory=list)
    misbehaved: dict[str, int] = field(default_factory=lambda: {"dropped": 0, "stalled": 0})
    errors: list[str] = field(default_factory=list)  # every failure: when, what, and its error


async def one_request(client: httpx.AsyncClient, url: str, stream: bool, max_tokens: int) -> None:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 1.0, "stream": stream}
    if not stream:
        r = await client.post(url, json=body)
        r.raise_for_status()
        return
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        last = ""
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"error"' in line[:20]:
                raise RuntimeError(line)
            last = line or last
        if last != "data: [DONE]":
            raise RuntimeError(f"stream ended without [DONE] (last line {last[:80]!r})")


async def closed_loop(url: str, clients: int, seconds: float, max_tokens: int) -> float:
    """Completed requests per second with `clients` closed-loop clients."""
    done = 0
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=300) as client:

        async def worker(i: int) -> None:
            nonlocal done
            while time.monotonic() < stop:
                await one_request(client, url, i % 2 == 0, max_tokens)
                done += 1

        start = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        return done / (time.monotonic() - start)


async def misbehave(port: int, stall: bool, max_tokens: int) -> None:
    """A streamed request from a client that reads its first bytes and hangs up (drop), or
    reads nothing for a minute and then goes away (stall)."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "stream": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, head + body)
        if stall:
            await asyncio.sleep(60)
        else:
            await loop.sock_recv(sock, 64)
    finally:
        sock.close()


async def soak(
    server: ServerProcess, rate: float, seconds: float, args: argparse.Namespace, tally: Tally
) -> None:
    url = f"{server.http}/v1/completions"
    assert server.proc is not None
    rng = random.Random(0)
    start = time.monotonic()
    end = start + seconds
    tasks: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def timed(stream: bool) -> None:
            t0, outcome = time.monotonic(), "ok"
            try:
                await one_request(client, url, stream, args.max_tokens)
            except Exception as e:  # any failure counts, whatever its kind
                status = e.response.status_code if isinstance(e, httpx.HTTPStatusError) else 0
                outcome = "refused" if status == 429 else "failed"
                if outcome == "failed":
                    kind = "stream" if stream else "unary"
                    tally.errors.append(f"{t0 - start:.0f}s {kind}: {type(e).__name__}: {e}"[:300])
            tally.requests.append((t0 - start, time.monotonic() - t0, outcome))

        async def sample_rss() -> None:
            while time.monotonic() < end:
                tally.rss.append((time.monotonic() - start, rss_bytes(server.proc.pid)))  # type: ignore[union-attr]
                await asyncio.sleep(RSS_EVERY_S)

        async def misbehaving() -> None:
            stall = False
            while args.misbehave_every_s and time.monotonic() + args.misbehave_every_s < end:
                await asyncio.sleep(args.misbehave_every_s)
                task = asyncio.create_task(misbehave(server.http_port, stall, 256))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                tally.misbehaved["stalled" if stall else "dropped"] += 1
                stall = not stall

        background = [asyncio.create_task(sample_rss()), asyncio.create_task(misbehaving())]
        n = 0
        next_at = start
        while next_at < end:
            next_at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            task = asyncio.create_task(timed(stream=n % 2 == 0))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        await asyncio.gather(*background)
        await asyncio.gather(*tasks, return_exceptions=True)


def probe(server: ServerProcess, args: argparse.Namespace) -> float:
    """What the server completes per second against open-loop arrivals: closed-loop clients
    overstate it (they never queue behind a burst), so arrivals at 1.5 times their rate for
    --probe-s seconds, counting the answers that end in its last two thirds."""
    url = f"{server.http}/v1/completions"
    estimate = asyncio.run(closed_loop(url, args.clients, args.probe_s, args.max_tokens))
    quiet = argparse.Namespace(**{**vars(args), "misbehave_every_s": 0})
    tally = Tally()
    asyncio.run(soak(server, 1.5 * estimate, args.probe_s, quiet, tally))
    # answers that ended in the window (by when they ended: a queue still grows meanwhile)
    lo, hi = args.probe_s / 3, args.probe_s
    ended = [t + lat for t, lat, outcome in tally.requests if outcome == "ok"]
    capacity = sum(lo <= t < hi for t in ended) / (hi - lo)
    print(f"probe: {estimate:.1f}/s closed-loop, {capacity:.1f}/s served of "
          f"{1.5 * estimate:.1f}/s offered", flush=True)  # fmt: skip
    return capacity


def swap_every(server: ServerProcess, adapters: list[Path], every_s: float,
               stop: threading.Event, tally: Tally, start: float) -> None:  # fmt: skip
    base = loading.base_fingerprint(server.model)
    with FlywheelClient(server.grpc) as client:
        for adapter in adapters:
            if stop.wait(every_s):
                return
            try:
                client.publish_adapter(adapter, name="policy", base_model=base, promote=True)
                tally.swaps.append((time.monotonic() - start, True))
            except Exception as e:  # a failed swap is reported, and the soak goes on
                tally.swaps.append((time.monotonic() - start, False))
                tally.errors.append(f"{time.monotonic() - start:.0f}s swap: {e}"[:300])


def count(requests: list[tuple[float, float, str]], outcome: str) -> int:
    return sum(o == outcome for _, _, o in requests)


def windows(tally: Tally, minutes: float, window_min: float) -> list[dict[str, float]]:
    rows = []
    width = window_min * 60
    for i in range(max(1, round(minutes / window_min))):
        lo, hi = i * width, (i + 1) * width
        inside = [r for r in tally.requests if lo <= r[0] < hi]
        latencies = [lat for _, lat, outcome in inside if outcome == "ok"]
        rss = [b for t, b in tally.rss if t < hi]
        rows.append({
            "from_min": lo / 60, "to_min": hi / 60, "requests": len(inside),
            "refused": count(inside, "refused"), "failed": count(inside, "failed"),
            "p50_s": statistics.median(latencies) if latencies else float("nan"),
            "p99_s": p99(latencies) if latencies else float("nan"),
            "rss_mib": rss[-1] / 2**20 if rss else float("nan"),
        })  # fmt: skip
    return rows


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = args.model or build_random_model(root / "model", hidden=128, layers=4, heads=4)
        swaps = int(args.minutes * 60 // args.swap_every_s) if args.swap_every_s else 0
        adapters = [make_adapter(model_dir, root / f"adapter-{i}", seed=i) for i in range(swaps)]
        server = ServerProcess(model_dir, root / "data", args=["--write-timeout-s", "5"]).start()
        tally = Tally()
        stop = threading.Event()
        try:
            capacity = float("nan") if args.rate else probe(server, args)
            rate = args.rate or args.load * capacity
            print(f"capacity {capacity:.2f} requests/s; soaking at {rate:.2f}/s for "
                  f"{args.minutes:g} min", flush=True)  # fmt: skip
            swapper = threading.Thread(
                target=swap_every,
                args=(server, adapters, args.swap_every_s, stop, tally, time.monotonic()),
            )
            swapper.start()
            asyncio.run(soak(server, rate, args.minutes * 60, args, tally))
            # connections the server cut off for not reading (its write timeout)
            cut_off = server.metric("flywheel_stalled_streams_total")
        finally:
            stop.set()
            server.stop()
    rows = windows(tally, args.minutes, args.window_min)
    first, last = rows[0], rows[-1]
    report = {
        "minutes": args.minutes, "capacity_rps": capacity, "rate_rps": rate,
        "max_tokens": args.max_tokens, "requests": len(tally.requests),
        "refused": count(tally.requests, "refused"), "failed": count(tally.requests, "failed"),
        "swaps": len(tally.swaps), "swaps_failed": sum(not ok for _, ok in tally.swaps),
        "misbehaved": tally.misbehaved, "errors": tally.errors,
        "cut_off_by_write_timeout": cut_off,
        "rss_growth_mib": last["rss_mib"] - first["rss_mib"],
        "p99_drift": last["p99_s"] / first["p99_s"], "windows": rows,
        "rss_mib": [(round(t), round(b / 2**20, 1)) for t, b in tally.rss],
    }  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "rss_mib"}, indent=2))
    print(
        "| minutes | requests | refused | failed | p50 s | p99 s | RSS MiB |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        print(f"| {r['from_min']:g}-{r['to_min']:g} | {r['requests']} | {r['refused']} | "
              f"{r['failed']} | {r['p50_s']:.3f} | {r['p99_s']:.3f} | {r['rss_mib']:.0f} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
