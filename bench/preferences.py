"""Does the loop learn what its labelers prefer? One live run per preference (issue 15).

For each preference, on a fresh data directory: `flywheel up` (the demo model; its build is
copied from --demo-cache when one is given, which equals building it again: the build is
deterministic and cached by its config's hash), then a scripted labeler ranks 4 chat
completions per prompt through the HTTP API (`/v1/compare`, `/v1/feedback`) at no more than
--rate rankings per second (a comparison with nothing to rank, all candidates tied, waits a
quarter of that gap), until --rankings rankings or --minutes minutes. The learner runs
beside the server throughout, as `make up` runs it. Then blind pairs on fresh prompts: the
live policy against the initial one (policy-v0), one completion each, judged by the same
preference, ties counted half.

Pairs are drawn greedy (--pair-temperature 0) by default, and also at temperature 1. For a
yes/no preference the win rate with ties half is 0.5 + (p_live - p_initial) / 2, where p is the
share of a policy's answers the preference likes; at temperature 1 the initial policy is right
43% of the time, so no policy could reach 80% under `incorrect` there (at most 71.5%).

    .venv/bin/python bench/preferences.py --out bench/out/preferences.json \
        --preferences shorter longer contains:x incorrect correct

A program, not a test: each preference takes --minutes (15) plus the pairs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flywheel_cli.labelers import (  # noqa: E402
    Labeler,
    LabelStats,
    Preference,
    demo_prompts,
    preference_from_spec,
    prompt_text,
)
from flywheel_client import HttpClient  # noqa: E402

PAIR_SEED = 777  # prompts the labelers never saw (they draw from seed 0 onwards)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preferences", nargs="+",
                   default=["shorter", "longer", "contains:x", "incorrect", "correct"])  # fmt: skip
    p.add_argument("--minutes", type=float, default=15.0, help="per preference, from /readyz")
    p.add_argument("--rankings", type=int, default=2000, help="at most this many per preference")
    p.add_argument("--rate", type=float, default=5.0, help="at most this many rankings/s")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--pair-temperature", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--demo-cache", type=Path, default=None,
                   help="a data dir whose models/ holds a finished demo build to copy")  # fmt: skip
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "preferences")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "preferences.json")
    p.add_argument("--http-port", type=int, default=3100)
    p.add_argument("--grpc-port", type=int, default=50151)
    return p.parse_args()


class Pace:
    """Prompts for the labeler at no more than `rate` rankings per second: a submitted ranking
    waits 1/rate before the next prompt; a comparison skipped because all its candidates tie
    (nothing to rank) waits 1/(4 rate), as a person moves on from one quickly."""

    def __init__(self, rate: float) -> None:
        self.gap, self.skip_gap = 1.0 / rate, 0.25 / rate
        self.due = time.monotonic()
        self.submitted = 0

    def prompts(self, prompts: Iterator[list[dict[str, str]]]) -> Iterator[object]:
        for prompt in prompts:
            delay = self.due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.due = time.monotonic() + self.skip_gap
            yield prompt

    def on_result(self, stats: LabelStats) -> None:
        """`Labeler.run`'s callback: after a ranking went in, the next waits the full gap."""
        if stats.submitted > self.submitted:
            self.submitted = stats.submitted
            self.due += self.gap - self.skip_gap


def start_server(data_dir: Path, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    log = (data_dir / "up.log").open("wb")
    command = [str(ROOT / ".venv" / "bin" / "flywheel"), "up", "--data-dir", str(data_dir),
               "--http-port", str(args.http_port), "--grpc-port", str(args.grpc_port)]  # fmt: skip
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 900.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"flywheel up exited with {proc.returncode}; see its up.log")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("the server was not ready in time")


def blind_pairs(
    client: HttpClient, preference: Preference, n: int, temperature: float, max_tokens: int
) -> dict[str, object]:
    """Live vs policy-v0 on fresh prompts, judged by `preference`; ties count half."""
    live = client.versions().live["policy"]
    wins = losses = ties = 0
    prompts = demo_prompts(seed=PAIR_SEED)
    for _ in range(n):
        messages = next(prompts)
        out = client.compare(messages=messages, k=2, policies=[live, "policy-v0"],
                             temperature=temperature, max_tokens=max_tokens)  # fmt: skip
        ours, initial = out.candidates  # candidate i comes from policies[i]
        text = prompt_text(messages)
        mine, theirs = preference.key(text, ours.text), preference.key(text, initial.text)
        wins, losses, ties = (
            wins + (mine > theirs),
            losses + (mine < theirs),
            ties + (mine == theirs),
        )
    return {"live": live, "temperature": temperature, "wins": wins, "losses": losses,
            "ties": ties, "win_rate": (wins + ties / 2) / n}  # fmt: skip


def learner_events(log_path: Path) -> list[dict[str, str]]:
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        match = re.search(r"event=(\S+)(.*)$", line)
        if match:
            pairs = re.findall(r"""(\w+)=('[^']*'|"[^"]*"|\S+)""", match.group(2))
            fields = {key: value.strip("'\"") for key, value in pairs}
            events.append({"event": match.group(1), **fields})
    return events


def run_one(spec: str, args: argparse.Namespace) -> dict[str, object]:
    preference = preference_from_spec(spec)
    data_dir = args.work / re.sub(r"[^a-z0-9]+", "-", spec.lower())
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    if args.demo_cache is not None:
        shutil.copytree(args.demo_cache / "models", data_dir / "models")
    url = f"http://127.0.0.1:{args.http_port}"
    proc = start_server(data_dir, args)
    try:
        ready_s = wait_ready(url, proc)
        deadline = time.monotonic() + args.minutes * 60
        with HttpClient(url, timeout=120) as client:
            labeler = Labeler(client, preference, name=f"bench-{spec}", k=args.k,
                              max_tokens=args.max_tokens, temperature=1.0)  # fmt: skip
            stats = LabelStats()
            total = LabelStats()
            while time.monotonic() < deadline and total.submitted < args.rankings:
                left = min(deadline - time.monotonic(), 60.0)
                pace = Pace(args.rate)
                stats = labeler.run(pace.prompts(demo_prompts(seed=int(time.time()))),
                                    count=args.rankings - total.submitted, seconds=left,
                                    on_result=pace.on_result)  # fmt: skip
                total = _sum(total, stats)
                print(f"  {spec}: {total.submitted} rankings, {total.errors} errors, "
                      f"live {client.versions().live['policy']}", flush=True)  # fmt: skip
            left = deadline - time.monotonic()
            if left > 0:  # the rankings are in; the learner keeps its time
                time.sleep(left)
            pairs = [blind_pairs(client, preference, args.pairs, t, args.max_tokens)
                     for t in args.pair_temperature]  # fmt: skip
            versions = client.versions("policy").versions
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    events = learner_events(data_dir / "learner" / "learner.log")
    fits = [e for e in events if e["event"] == "reward_fit"]
    return {
        "preference": spec,
        "ready_s": round(ready_s, 1),
        "rankings": total.submitted,
        "skipped_all_tied": total.skipped,
        "errors": total.errors,
        "rounds": sum(e["event"] == "round_done" for e in events),
        "rounds_skipped": sum(e["event"] == "round_skipped" for e in events),
        "promoted": sum(v.state in ("live", "retired") for v in versions if v.version > 0),
        "refused": sum(e["event"] == "gate_refused" for e in events),
        "reward_accuracy": [float(f["held_out_accuracy"]) for f in fits],
        "init_accuracy": [float(f.get("init_accuracy", "nan")) for f in fits],
        "kept": [f.get("kept", "") for f in fits],
        "gate_refusals": [e.get("reasons", "") for e in events if e["event"] == "gate_refused"],
        "pairs": pairs,
    }


def _sum(a: LabelStats, b: LabelStats) -> LabelStats:
    return LabelStats(submitted=a.submitted + b.submitted, skipped=a.skipped + b.skipped,
                      errors=a.errors + b.errors)  # fmt: skip


def main() -> None:
    args = parse_args()
    results = []
    for spec in args.preferences:
        print(f"{spec}: starting", flush=True)
        results.append(run_one(spec, args))
        print(json.dumps(results[-1]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    temps = args.pair_temperature
    print("| preference | " + " | ".join(f"win rate, T={t:g} (W-L-T)" for t in temps)
          + " | rankings | rounds (skipped) | promoted / refused | failed requests"
          " | reward-model held-out accuracy per refit (initial RM's) |")  # fmt: skip
    print("|---" * (len(temps) + 6) + "|")
    for r in results:
        cells = [f"**{p['win_rate']:.0%}** ({p['wins']}-{p['losses']}-{p['ties']})"
                 for p in r["pairs"]]  # type: ignore[attr-defined]  # fmt: skip
        fits = zip(r["reward_accuracy"], r["init_accuracy"], strict=True)  # type: ignore[call-overload]
        accuracy = ", ".join(f"{a:.2f} ({i:.2f})" for a, i in fits)
        print(f"| {r['preference']} | " + " | ".join(cells)
              + f" | {r['rankings']} | {r['rounds']} ({r['rounds_skipped']}) "
              f"| {r['promoted']} / {r['refused']} | {r['errors']} | {accuracy} |")  # fmt: skip


if __name__ == "__main__":
    main()
