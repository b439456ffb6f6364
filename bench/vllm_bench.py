"""`vllm bench serve` against Flywheel and against vLLM's own server: the same client, the same
model, the same random prompts, every answer --output-len tokens long (`ignore_eos`).

Targets (--targets):
  flywheel       `flywheel serve` on its embedded torch engine
  flywheel-vllm  `flywheel serve --backend vllm`: flywheel's API in front of a vLLM it starts
  vllm           vLLM's own OpenAI server, started as the vllm backend starts it

For each target and each concurrency level (--levels), vLLM's client (bench/vllm_bench_client.py
under .venv-vllm) sends max(32, 4 x level) streamed /v1/completions requests, at most `level` at
once, and reports throughput and the TTFT, TPOT (time per output token after the first) and ITL
(time between two streamed messages) percentiles. A program, not a test; docs/benchmarks.md has
its table.

    make vllm-env
    .venv/bin/python bench/vllm_bench.py --out bench/out/vllm_bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import ServerProcess  # noqa: E402
from flywheel_demo.model import build_random_model  # noqa: E402

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
TARGETS = ("flywheel", "flywheel-vllm", "vllm")
COLUMNS = [
    ("request_throughput", "req/s", 1), ("output_throughput", "out tok/s", 0),
    ("p50_ttft_ms", "TTFT p50 ms", 0), ("p99_ttft_ms", "TTFT p99 ms", 0),
    ("p50_tpot_ms", "TPOT p50 ms", 1), ("p99_tpot_ms", "TPOT p99 ms", 1),
    ("p50_itl_ms", "ITL p50 ms", 1), ("p99_itl_ms", "ITL p99 ms", 1),
]  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None,
                   help="a model directory (default: a random Llama of --hidden/--layers/--heads)")  # fmt: skip
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument(
        "--heads", type=int, default=4, help="vLLM's CPU attention needs head size >= 32"
    )
    p.add_argument("--levels", default="1,8,32,64")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--vllm-python", type=Path, default=VLLM_PYTHON)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "vllm_bench.json")
    return p.parse_args()


def run_client(
    base_url: str, model_dir: Path, results: Path, target: str, args: argparse.Namespace
) -> list[dict[str, Any]]:
    levels = [int(x) for x in args.levels.split(",")]
    command = [
        str(args.vllm_python), str(ROOT / "bench" / "vllm_bench_client.py"),
        "--levels", args.levels, "--result-dir", str(results), "--prefix", target, "--",
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
        "--model", "policy", "--tokenizer", str(model_dir), "--dataset-name", "random",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--ignore-eos", "--temperature", "1.0", "--request-rate", "inf", "--seed", "0",
        "--num-warmups", "2", "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
    ]  # fmt: skip
    subprocess.run(command, env={**os.environ, **OFFLINE}, check=True, cwd=ROOT)
    return [json.loads((results / f"{target}-c{c}.json").read_text()) for c in levels]


def bench_target(
    target: str, model_dir: Path, work: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    if target == "vllm":
        from flywheel_server import vllm_sidecar

        port = vllm_sidecar.free_loopback_port()
        command = vllm_sidecar.serve_command(
            args.vllm_python, model_dir, port=port, served_name="policy", max_loras=4,
            max_model_len=args.input_len + args.output_len + 64, cpu=True,
        )  # fmt: skip
        process = vllm_sidecar.VllmProcess(command, port, work / "vllm.log").start()
        try:
            asyncio.run(process.wait_ready())
            return run_client(process.url, model_dir, work, target, args)
        finally:
            process.stop()
    extra = ["--backend", "vllm", "--vllm-python", str(args.vllm_python)]
    server = ServerProcess(
        model_dir, work / "server", args=extra if target == "flywheel-vllm" else [],
        start_timeout_s=600,
    ).start()  # fmt: skip
    try:
        return run_client(server.http, model_dir, work, target, args)
    finally:
        server.stop()


def main() -> None:
    args = parse_args()
    if not args.vllm_python.exists():
        sys.exit(f"no vLLM environment at {args.vllm_python}: run `make vllm-env`")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_random_model(
            Path(tmp) / "model", hidden=args.hidden, layers=args.layers, heads=args.heads,
        )  # fmt: skip
        runs = {}
        for target in args.targets.split(","):
            work = Path(tmp) / target
            work.mkdir()
            runs[target] = bench_target(target, model_dir, work, args)
    report = {
        "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "model": str(args.model) if args.model else
        {"hidden": args.hidden, "layers": args.layers, "heads": args.heads},
        "input_len": args.input_len,
        "output_len": args.output_len,
        "runs": {
            t: [{k: r.get(k) for k in ("max_concurrency", "completed", "failed", "duration",
                                       *(c for c, _, _ in COLUMNS))} for r in results]
            for t, results in runs.items()
        },
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| target | concurrency | done | failed | " + " | ".join(h for _, h, _ in COLUMNS) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(COLUMNS))
    for target, results in report["runs"].items():
        for r in results:
            cells = [f"{r[k]:.{digits}f}" for k, _, digits in COLUMNS]
            print(f"| {target} | {r['max_concurrency']} | {r['completed']} | {r['failed']} | "
                  + " | ".join(cells) + " |")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
