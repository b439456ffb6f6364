"""The HTTP keep-alive race: requests sent on a pooled connection after it sat idle for about
the server's keep-alive timeout. One that arrives just as the server closes the connection gets
a reset (`ReadError`), never a response.

--clients clients, one connection each: a request, then --requests more, each after an idle gap
of --gap-s ± 30 ms (the client's own idle expiry set well past the gap, so only the server
closes). Prints the outcomes. Arguments after `--` go to `flywheel serve`.

    .venv/bin/python bench/keep_alive.py --gap-s 5                      # the default: 75 s
    .venv/bin/python bench/keep_alive.py --gap-s 2 -- --keep-alive-s 2  # gap == keep-alive

A program, not a test; docs/benchmarks.md (the soak) has its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import ServerProcess  # noqa: E402
from flywheel_demo.model import build_tiny_model  # noqa: E402


async def client(url: str, args: argparse.Namespace, rng: random.Random) -> list[str]:
    limits = httpx.Limits(max_connections=1, keepalive_expiry=4 * args.gap_s)
    body = {"prompt": "x", "max_tokens": 1}
    outcomes = []
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        await http.post(url, json=body)
        for _ in range(args.requests):
            await asyncio.sleep(args.gap_s + rng.uniform(-0.03, 0.03))
            try:
                outcomes.append(str((await http.post(url, json=body)).status_code))
            except httpx.HTTPError as e:
                outcomes.append(type(e).__name__)
    return outcomes


async def run(url: str, args: argparse.Namespace) -> collections.Counter[str]:
    rng = random.Random(0)
    results = await asyncio.gather(*(client(url, args, rng) for _ in range(args.clients)))
    return collections.Counter(o for r in results for o in r)


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gap-s", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=40)
    p.add_argument("--requests", type=int, default=5)
    args = p.parse_args(argv[:split])
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "model")
        server = ServerProcess(model, Path(tmp) / "server", args=argv[split + 1 :]).start()
        try:
            outcomes = asyncio.run(run(f"{server.http}/v1/completions", args))
        finally:
            server.stop()
    print(f"idle gap {args.gap_s} s, server args {argv[split + 1 :]}: {dict(outcomes)}")


if __name__ == "__main__":
    main()
