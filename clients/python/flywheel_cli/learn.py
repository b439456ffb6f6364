"""`flywheel learn`: the continuous learner against a running server."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Any

from flywheel_cli.args import (
    UsageError,
    add_connection,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)


def add_learn(commands: Any, environ: Mapping[str, str]) -> None:
    sub = commands.add_parser(
        "learn",
        help="run the continuous learner against a server",
        description=(
            "Learn from the server's feedback, round after round: export new rankings and "
            "prompts, refit the reward model, run PPO-ptx on the logged prompts, compare the "
            "candidate with the live policy on held-out prompts, and publish it (live only if "
            "it passes the gate). Wakes on --min-new-rankings new rankings, or every --interval "
            "seconds when any arrived. Checkpoints live in --work-dir: a killed learner resumes "
            "there without losing feedback or publishing a version twice. Needs an admin key "
            "when the server has API keys."
        ),
    )
    sub.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        metavar="PORT",
        help="serve the learner's Prometheus metrics at 127.0.0.1:PORT/metrics (default: off)",
    )
    add_connection(sub, environ, "admin-scope API key (default: $FLYWHEEL_API_KEY)")
    sub.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="the base model directory the server serves (loaded again here to train)",
    )
    sub.add_argument(
        "--work-dir",
        default=".flywheel/learner",
        metavar="DIR",
        help="checkpoints, exported feedback and adapters (default: %(default)s)",
    )
    sub.add_argument(
        "--min-new-rankings",
        type=positive_int,
        default=16,
        metavar="N",
        help="wake when N rankings arrived since the last round (default: %(default)s)",
    )
    sub.add_argument(
        "--interval",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="also wake after this long if any ranking arrived (default: %(default)s)",
    )
    sub.add_argument(
        "--rounds", type=positive_int, metavar="N", help="stop after N rounds (default: never)"
    )
    sub.add_argument(
        "--ppo-steps",
        type=positive_int,
        default=20,
        metavar="N",
        help="PPO-ptx steps per round (default: %(default)s)",
    )
    sub.add_argument(
        "--rm-min-accuracy",
        type=float,
        default=0.6,
        metavar="A",
        help="held-out pairwise accuracy a reward model needs before it trains or judges a "
        "policy; a round without one publishes no policy (default: %(default)s)",
    )
    sub.add_argument(
        "--rm-min-held-out-pairs",
        type=positive_int,
        default=50,
        metavar="N",
        help="held-out ranked pairs needed to trust that accuracy (default: %(default)s)",
    )
    sub.add_argument(
        "--anchor-prompts",
        type=non_negative_int,
        default=32,
        metavar="N",
        help="train a policy only once the held-out rankings hold N distinct prompts: the gate "
        "checks the candidate's greedy answers against the labelers' own rankings of them "
        "(default: %(default)s)",
    )
    sub.add_argument(
        "--challenger",
        action="store_true",
        help="publish a candidate that passes the gate as the server's challenger (blind "
        "comparisons by live labelers promote or retire it) instead of promoting it",
    )
    sub.add_argument(
        "--kl-target",
        type=positive_float,
        metavar="NATS",
        help="KL to the base policy, per completion, that PPO's adaptive penalty aims for; "
        "below --max-kl (default: half of it)",
    )
    sub.add_argument(
        "--max-kl",
        type=non_negative_float,
        default=20.0,
        metavar="NATS",
        help="the gate refuses a candidate further than this from the base policy, per "
        "completion; a round's PPO also stops at 0.8 of it (default: %(default)s)",
    )
    sub.add_argument(
        "--final-norm-lr",
        type=non_negative_float,
        default=3e-2,
        metavar="LR",
        help="learning rate of the policy's own copy of the model's final norm, trained with "
        "its LoRA and shipped in the adapter: it lets PPO sharpen the policy (default: "
        "%(default)s). 0 ships LoRA matrices only, which the vLLM backend needs",
    )
    sub.add_argument(
        "--import-preferences",
        nargs="+",
        default=[],
        metavar="FILE",
        help="JSONL preference files ({prompt, chosen, rejected} or HH-RLHF) added to every "
        "reward-model refit",
    )
    sub.add_argument(
        "--reward-init",
        metavar="DIR",
        help="a saved reward model (adapter + score head) the first refit warm-starts from; "
        "later refits start from the last promoted one. Every refit also fits from scratch "
        "and keeps whichever orders the held-out rankings better (default: fresh only)",
    )
    sub.add_argument(
        "--pretraining",
        metavar="FILE",
        help="a .txt or .jsonl corpus for the ptx term and the gate's pretraining-loss check "
        "(`flywheel up` passes the demo's; without one, PPO runs without the ptx term)",
    )
    sub.add_argument(
        "--threads",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="torch CPU threads (default: 0, one per core; `flywheel up` passes the cores its "
        "server leaves free)",
    )
    sub.add_argument(
        "--device",
        default="auto",
        help="where the base weights live: auto (CUDA when present), cpu, or cuda[:N] "
        "(default: %(default)s)",
    )
    sub.add_argument(
        "--dtype",
        default="auto",
        help="the base weights' precision: auto (bfloat16 on CUDA, float32 on CPU), float32, "
        "bfloat16 or float16; LoRA, heads and optimiser state stay float32 (default: %(default)s)",
    )
    sub.add_argument(
        "--max-tokens-per-microbatch",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="bound each forward of the reward refit and of PPO-ptx to N padded tokens: a "
        "step's batch is split by length and its gradients accumulated, the same update in "
        "bounded memory (default: 0, no bound)",
    )
    sub.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each decoder layer's activations in the backward of the reward refit "
        "and of PPO-ptx instead of keeping them: less memory for one more forward per step",
    )
    sub.add_argument("--seed", type=non_negative_int, default=0, help="default: %(default)s")
    sub.set_defaults(func=_learn)


def _learn(args: argparse.Namespace) -> int:
    import logging
    import signal
    from pathlib import Path

    from flywheel_learner.config import (  # torch: only here
        LEARNER_PPO,
        LEARNER_REWARD,
        LearnerConfig,
    )
    from flywheel_learner.gate import GateThresholds
    from flywheel_learner.loop import LearnerError, run

    try:
        config = LearnerConfig(
            server=args.server,
            api_key=args.api_key,
            tls_ca=Path(args.tls_ca) if args.tls_ca else None,
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
            model_dir=Path(args.model),
            work_dir=Path(args.work_dir),
            min_new_rankings=args.min_new_rankings,
            interval_s=args.interval,
            max_rounds=args.rounds,
            ppo_steps_per_round=args.ppo_steps,
            rm_min_accuracy=args.rm_min_accuracy,
            rm_min_held_out_pairs=args.rm_min_held_out_pairs,
            anchor_prompts=args.anchor_prompts,
            challenger=args.challenger,
            ppo=dataclasses.replace(
                LEARNER_PPO,
                final_norm_lr=args.final_norm_lr,
                kl_target=args.kl_target or args.max_kl / 2,
                max_tokens_per_microbatch=args.max_tokens_per_microbatch,
                gradient_checkpointing=args.gradient_checkpointing,
            ),
            reward=dataclasses.replace(
                LEARNER_REWARD,
                max_tokens_per_microbatch=args.max_tokens_per_microbatch,
                gradient_checkpointing=args.gradient_checkpointing,
            ),
            gate=GateThresholds(max_kl=args.max_kl),
            import_preferences=tuple(Path(p) for p in args.import_preferences),
            pretraining=Path(args.pretraining) if args.pretraining else None,
            reward_init=Path(args.reward_init) if args.reward_init else None,
            seed=args.seed,
            threads=args.threads,
            device=args.device,
            dtype=args.dtype,
        )
        config.precision  # noqa: B018  # a CUDA device that is not there fails here, not mid-round
    except ValueError as e:
        raise UsageError(str(e)) from e
    logging.basicConfig(level=logging.INFO, format="ts=%(asctime)s level=%(levelname)s %(message)s")

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # checkpoints are atomic: stopping anywhere is safe

    signal.signal(signal.SIGTERM, _stop)
    if args.metrics_port:
        from flywheel_learner import metrics

        metrics.serve(args.metrics_port)
    try:
        rounds = run(config)
    except LearnerError as e:
        raise UsageError(str(e)) from e
    print(f"learner: {rounds} round(s) done; state in {config.work_dir}")
    return 0
