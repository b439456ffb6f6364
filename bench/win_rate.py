"""Blind pairs through the public API: the live policy against the SFT policy (policy-v0).

For each fresh demo prompt, `Compare` with k=2 and policies=[live, policy-v0] draws one
completion from each; the `correct` labeler's key (the demo task's checker) judges them. A
win is live right and SFT wrong, a loss the reverse; both right or both wrong is a tie. A
program, not a test:

    .venv/bin/python bench/win_rate.py --server 127.0.0.1:50051 --prompts 300
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flywheel_cli.labelers import demo_prompts, preference_from_spec, prompt_text  # noqa: E402
from flywheel_client import FlywheelClient  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--prompts", type=int, default=300)
    p.add_argument("--seed", type=int, default=777, help="prompts the labelers never saw")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--against", default="policy-v0", help="the SFT policy's version id")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    correct = preference_from_spec("correct")
    wins = losses = ties = 0
    with FlywheelClient(args.server) as client:
        live = client.versions().live["policy"]
        prompts = demo_prompts(seed=args.seed)
        for _ in range(args.prompts):
            messages = next(prompts)
            out = client.compare(
                messages=messages,
                k=2,
                policies=[live, args.against],
                temperature=args.temperature,
                max_tokens=16,
            )
            ours, sft = out.candidates  # candidate i comes from policies[i]
            text = prompt_text(messages)
            mine, theirs = correct.key(text, ours.text), correct.key(text, sft.text)
            wins += mine > theirs
            losses += mine < theirs
            ties += mine == theirs
    decided = wins + losses
    report = {
        "live": live,
        "against": args.against,
        "prompts": args.prompts,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "win_rate_decided": wins / decided if decided else None,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
