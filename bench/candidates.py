"""Replay a preferences run's policy candidates offline: were they better, and who could tell?

For each candidate a learner saved (`learner/adapters/policy-r*` under a data directory that
`bench/preferences.py` left), greedy answers to fresh prompts (the pair prompts, seed 777)
against the initial policy's: the preference's own verdict (W-L-T), how many answers changed,
and the verdicts of that round's reward model and judge on the changed answers, with how often
each agreed with the preference where it decided.

    .venv/bin/python bench/candidates.py bench/out/preferences/correct correct --prompts 200

A program, not a test (issue 15's analysis: docs/benchmarks.md, "Session 16").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.preferences import PAIR_SEED  # noqa: E402
from flywheel_cli.labelers import demo_prompts, preference_from_spec, prompt_text  # noqa: E402
from flywheel_learner.config import LEARNER_PPO  # noqa: E402
from flywheel_learner.ppo import sample_responses  # noqa: E402
from flywheel_learner.ppo_models import POLICY, SharedBaseModels  # noqa: E402
from flywheel_model import adapters  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", type=Path, help="one preference's data dir from preferences.py")
    p.add_argument("preference", help="the spec the run used: correct, longer, contains:x, ...")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--examples", type=int, default=8, help="changed answers to print")
    return p.parse_args()


def counts(ours: list[float], theirs: list[float]) -> tuple[int, int, int]:
    wins = sum(a > b for a, b in zip(ours, theirs, strict=True))
    losses = sum(a < b for a, b in zip(ours, theirs, strict=True))
    return wins, losses, len(ours) - wins - losses


def main() -> None:
    args = parse_args()
    preference = preference_from_spec(args.preference)
    base = next((args.data_dir / "models").glob("demo-*")) / "model"
    saved = args.data_dir / "learner" / "adapters"
    candidates = sorted(saved.glob("policy-r*"))
    if not candidates:
        raise SystemExit(f"no policy candidates under {saved}")
    stream = demo_prompts(seed=PAIR_SEED)
    chats = [next(stream) for _ in range(args.prompts)]
    texts = [prompt_text(chat) for chat in chats]
    models = SharedBaseModels.build(base, sorted(saved.glob("reward-r*"))[-1], LEARNER_PPO)
    prompts = [
        models.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        for chat in chats
    ]
    with models.peft.disable_adapter():
        initial = sample_responses(models, prompts, greedy=True).responses
    initial_keys = [preference.key(t, a) for t, a in zip(texts, initial, strict=True)]
    answers = initial
    for candidate in candidates:
        if not adapters.load_adapter_weights(models.peft, candidate, POLICY):
            print(f"{candidate.name}: another LoRA shape, skipped")
            continue
        answers = sample_responses(models, prompts, greedy=True).responses
        keys = [preference.key(t, a) for t, a in zip(texts, answers, strict=True)]
        changed = [i for i in range(len(prompts)) if answers[i] != initial[i]]
        decisive = [i for i in changed if keys[i] != initial_keys[i]]
        row: dict[str, object] = {"truth": counts(keys, initial_keys), "changed": len(changed)}
        for kind in ("reward", "judge"):
            scorer = candidate.name.replace("policy", kind)
            if not (saved / scorer).is_dir():
                continue
            models.add_scorer(scorer, saved / scorer)
            ours = models.rewards(prompts, answers, scorer).tolist()
            theirs = models.rewards(prompts, initial, scorer).tolist()
            agree = sum((ours[i] > theirs[i]) == (keys[i] > initial_keys[i]) for i in decisive)
            verdicts = counts([ours[i] for i in changed], [theirs[i] for i in changed])
            row[kind] = {"changed": verdicts[:2], "agrees": f"{agree}/{len(decisive)}"}
        print(candidate.name, json.dumps(row))
    changed = [i for i in range(len(prompts)) if answers[i] != initial[i]]
    for i in changed[: args.examples]:
        print(f"  {texts[i]!r}: {initial[i]!r} -> {answers[i]!r} (the last candidate replayed)")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
