"""The `flywheel` command line: run the server, or talk to one over gRPC.

Environment variables (FLYWHEEL_SERVER, FLYWHEEL_API_KEY) are read here, when the parser is
built, and nowhere else in the client package.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from flywheel_client.errors import FlywheelError, InvalidArgument, Unauthenticated, Unavailable
from flywheel_client.grpc_client import DEFAULT_TARGET, FlywheelClient
from flywheel_client.labelers import Labeler, LabelStats, demo_prompts, preference_from_spec
from flywheel_client.ranking import TIE, parse_tiers
from flywheel_client.types import Chunk, Completion, SamplingOptions
from flywheel_server.config import add_arguments, from_arguments

EXIT_SERVER_ERROR = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Input the user can fix; exits 2 like argparse's own errors."""


# -- argument types ------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 to rank, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


# -- parser --------------------------------------------------------------------------------------


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="flywheel",
        description="Serve a language model, collect rankings of its completions, learn from them.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name, up in (("serve", False), ("up", True)):
        sub = commands.add_parser(
            name,
            help=(
                "run the server and the learner together (the whole loop)"
                if up
                else "run the server: OpenAI-compatible HTTP and gRPC over one engine"
            ),
            description="Flags left out fall back to FLYWHEEL_<FLAG> variables, then defaults.",
        )
        add_arguments(sub)
        sub.set_defaults(func=_serve, up=up)

    client = argparse.ArgumentParser(add_help=False)
    group = client.add_argument_group("server connection")
    _add_connection(
        group, environ, "API key, sent as 'authorization: Bearer KEY' (default: $FLYWHEEL_API_KEY)"
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="per-call limit (default: 60)",
    )
    group.add_argument("--json", action="store_true", help="print machine-readable JSON lines")

    sampling = argparse.ArgumentParser(add_help=False)
    group = sampling.add_argument_group("sampling (server defaults when left out)")
    group.add_argument("--temperature", type=float, metavar="T", help="0 = greedy")
    group.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling, 0 < P <= 1")
    group.add_argument("--top-k", type=_non_negative_int, metavar="K", help="0 = off")
    group.add_argument("--max-tokens", type=_positive_int, metavar="M", help="tokens to generate")
    group.add_argument(
        "--stop", action="append", metavar="S", help="a stop string; repeat for more (at most 4)"
    )
    group.add_argument(
        "--seed", type=_non_negative_int, help="same seed, prompt and policy: same text"
    )

    sub = commands.add_parser(
        "generate",
        parents=[client, sampling],
        help="sample completions and print them with their ids",
        description="Sample completions of PROMPT. Rank them later by their ids with `flywheel rank`.",
    )
    sub.add_argument("prompt", metavar="PROMPT")
    sub.add_argument(
        "--n", type=_positive_int, default=1, help="completions to sample (default: 1)"
    )
    sub.add_argument(
        "--policy", default="", metavar="ID", help="policy version, e.g. policy-v3 (default: live)"
    )
    sub.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    sub.add_argument("--chat", action="store_true", help="send PROMPT as a user chat message")
    sub.set_defaults(func=_generate)

    sub = commands.add_parser(
        "compare",
        parents=[client, sampling],
        help="sample K candidates to rank, numbered with their ids",
        description="Sample K candidates for PROMPT, optionally from several policy versions.",
    )
    sub.add_argument("prompt", metavar="PROMPT")
    sub.add_argument("--k", type=_positive_int, default=4, help="candidates (default: 4)")
    sub.add_argument(
        "--policies",
        type=_names,
        default=[],
        metavar="A,B",
        help="comma-separated versions; candidate i comes from the (i mod count)-th",
    )
    sub.add_argument("--chat", action="store_true", help="send PROMPT as a user chat message")
    sub.set_defaults(func=_compare)

    sub = commands.add_parser(
        "rank",
        parents=[client],
        help="submit a ranking of completion ids, best first",
        description=(
            f"Rank completions of one prompt, best first. Join tied ids with '{TIE}': "
            f"`flywheel rank c1 c2{TIE}c3 c4` ranks c1 above c2 and c3 (tied) above c4."
        ),
    )
    sub.add_argument("ids", nargs="+", metavar="ID", help=f"a completion id, or tied ids a{TIE}b")
    sub.add_argument("--labeler", default="cli", metavar="NAME", help="who ranked (default: cli)")
    sub.add_argument(
        "--key",
        metavar="KEY",
        help="idempotency key; resubmitting it stores nothing new (default: fresh)",
    )
    sub.set_defaults(func=_rank)

    sub = commands.add_parser(
        "demonstrate",
        parents=[client],
        help="submit an ideal response to a prompt",
        description="Record RESPONSE as the ideal response to PROMPT, for supervised fine-tuning.",
    )
    sub.add_argument("prompt", metavar="PROMPT")
    sub.add_argument("response", metavar="RESPONSE")
    sub.add_argument("--labeler", default="cli", metavar="NAME", help="who wrote it (default: cli)")
    sub.add_argument("--key", metavar="KEY", help="idempotency key (default: fresh)")
    sub.add_argument("--chat", action="store_true", help="send PROMPT as a user chat message")
    sub.set_defaults(func=_demonstrate)

    sub = commands.add_parser(
        "score",
        parents=[client],
        help="score completions with the reward model",
        description="Print the reward model's score of each COMPLETION as a response to PROMPT.",
    )
    sub.add_argument("prompt", metavar="PROMPT")
    sub.add_argument("completions", nargs="+", metavar="COMPLETION")
    sub.add_argument(
        "--reward-model",
        default="",
        metavar="ID",
        help="reward version, e.g. reward-v2 (default: live)",
    )
    sub.set_defaults(func=_score)

    sub = commands.add_parser(
        "policies",
        parents=[client],
        help="list adapter versions; the live ones are marked *",
        description="List policy and reward adapter versions. Live versions are marked with *.",
    )
    sub.add_argument("--name", choices=("policy", "reward"), default="", help="only this kind")
    sub.set_defaults(func=_policies)

    sub = commands.add_parser(
        "simulate",
        parents=[client, sampling],
        help="run a scripted labeler that ranks candidates by a stated preference",
        description=(
            "Drive the feedback loop with a scripted labeler: for each demo-task prompt "
            "(reverse:, sort:, add:, capitalise:), ask the server for K candidates, rank them "
            "by PREFERENCE and submit the ranking, exactly as a user would. Candidates that all "
            "tie are skipped (no information). Stops after --count prompts or --seconds, "
            "whichever comes first. --seed also fixes the prompt sequence."
        ),
    )
    sub.add_argument(
        "--preference",
        required=True,
        metavar="NAME",
        help=(
            "correct (the demo task's right answer first), incorrect (wrong answers first), "
            "shorter, longer (by characters), or contains:WORD (responses containing WORD first)"
        ),
    )
    sub.add_argument(
        "--k", type=_at_least_two, default=4, help="candidates per prompt (default: 4)"
    )
    sub.add_argument(
        "--count", type=_non_negative_int, default=100, help="prompts to label (default: 100)"
    )
    sub.add_argument(
        "--seconds", type=_non_negative_float, metavar="S", help="stop after S seconds too"
    )
    sub.add_argument(
        "--labeler",
        metavar="NAME",
        help="labeler name recorded with each ranking (default: sim-PREFERENCE)",
    )
    sub.add_argument(
        "--policies",
        type=_names,
        default=[],
        metavar="A,B",
        help="comma-separated versions; candidate i comes from the (i mod count)-th",
    )
    sub.set_defaults(func=_simulate)
    _add_learn(commands, environ)
    return parser


def _add_learn(commands: Any, environ: Mapping[str, str]) -> None:
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
    _add_connection(sub, environ, "admin-scope API key (default: $FLYWHEEL_API_KEY)")
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
        type=_positive_int,
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
        "--rounds", type=_positive_int, metavar="N", help="stop after N rounds (default: never)"
    )
    sub.add_argument(
        "--ppo-steps",
        type=_positive_int,
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
        type=_positive_int,
        default=50,
        metavar="N",
        help="held-out ranked pairs needed to trust that accuracy (default: %(default)s)",
    )
    sub.add_argument(
        "--challenger",
        action="store_true",
        help="publish a candidate that passes the gate as the server's challenger (blind "
        "comparisons by live labelers promote or retire it) instead of promoting it",
    )
    sub.add_argument(
        "--final-norm-lr",
        type=_non_negative_float,
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
        help="a .txt or .jsonl corpus for the ptx term (default: the demo's pretraining "
        "documents: words repeated, no task answers)",
    )
    sub.add_argument(
        "--threads",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="torch CPU threads (default: 0, one per core; `flywheel up` passes the cores its "
        "server leaves free)",
    )
    sub.add_argument("--seed", type=_non_negative_int, default=0, help="default: %(default)s")
    sub.set_defaults(func=_learn)


# -- commands ------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    try:
        config = from_arguments(args)
    except ValueError as e:
        raise UsageError(str(e)) from e
    from flywheel_server.app import run  # heavy (torch, bentoml): only when serving

    if args.up:
        run(config, up=True)
    else:
        run(config)
    return 0


def _client(args: argparse.Namespace) -> FlywheelClient:
    return FlywheelClient(args.server, api_key=args.api_key, timeout=args.timeout)


def _sampling(args: argparse.Namespace) -> SamplingOptions:
    given = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "max_tokens": args.max_tokens,
        "stop": args.stop,
        "seed": args.seed,
    }
    return SamplingOptions(**{k: v for k, v in given.items() if v is not None})  # type: ignore[typeddict-item]


def _prompt(args: argparse.Namespace) -> dict[str, Any]:
    if args.chat:
        return {"messages": [{"role": "user", "content": args.prompt}]}
    return {"prompt": args.prompt}


def _print_json(value: Any) -> None:
    """One result (a `flywheel_client.types` dataclass) as one line of JSON."""
    print(json.dumps(dataclasses.asdict(value)))


def _print_completion(c: Completion, label: str) -> None:
    print(f"{label} {c.id}  {c.policy}  {c.finish_reason}")
    print(c.text)


def _generate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.stream:
            _stream(client, args)
            return 0
        generation = client.generate(
            **_prompt(args), n=args.n, policy=args.policy, **_sampling(args)
        )
    if args.json:
        _print_json(generation)
        return 0
    print(f"prompt {generation.prompt_id}")
    for c in generation.completions:
        _print_completion(c, f"[{c.index}]")
    return 0


def _stream(client: FlywheelClient, args: argparse.Namespace) -> None:
    chunks = client.generate_stream(
        **_prompt(args), n=args.n, policy=args.policy, **_sampling(args)
    )
    if args.json:
        for chunk in chunks:
            _print_json(chunk)
        return
    if args.n == 1:
        started = False
        for chunk in chunks:
            if not started:
                print(f"prompt {chunk.prompt_id}\n[0] {chunk.completion_id}  {chunk.policy}")
                started = True
            print(chunk.delta, end="", flush=True)
            if chunk.finish_reason:
                print(f"\n({chunk.finish_reason})")
        return
    # Deltas of n completions interleave; print each one whole as soon as it finishes.
    texts: dict[int, list[str]] = {}
    for chunk in chunks:
        if not texts:
            print(f"prompt {chunk.prompt_id}")
        texts.setdefault(chunk.index, []).append(chunk.delta)
        if chunk.finish_reason:
            _print_finished(chunk, "".join(texts[chunk.index]))


def _print_finished(last: Chunk, text: str) -> None:
    print(f"[{last.index}] {last.completion_id}  {last.policy}  {last.finish_reason}", flush=True)
    print(text, flush=True)


def _compare(args: argparse.Namespace) -> int:
    with _client(args) as client:
        comparison = client.compare(
            **_prompt(args), k=args.k, policies=args.policies, **_sampling(args)
        )
    if args.json:
        _print_json(comparison)
        return 0
    print(f"prompt {comparison.prompt_id}")
    for number, c in enumerate(comparison.candidates, start=1):
        _print_completion(c, f"{number}.")
    return 0


def _rank(args: argparse.Namespace) -> int:
    try:
        tiers = parse_tiers(args.ids)
    except InvalidArgument as e:
        raise UsageError(e.message) from e
    with _client(args) as client:
        receipt = client.rank(tiers, labeler=args.labeler, idempotency_key=args.key)
    if args.json:
        _print_json(receipt)
        return 0
    note = " (duplicate: this key was already recorded)" if receipt.duplicate else ""
    print(
        f"ranking {receipt.ranking_id} of prompt {receipt.prompt_id}: {receipt.pairs} pairs{note}"
    )
    return 0


def _demonstrate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        receipt = client.demonstrate(
            **_prompt(args), response=args.response, labeler=args.labeler, idempotency_key=args.key
        )
    if args.json:
        _print_json(receipt)
        return 0
    note = " (duplicate: this key was already recorded)" if receipt.duplicate else ""
    print(f"demonstration {receipt.demonstration_id}{note}")
    return 0


def _score(args: argparse.Namespace) -> int:
    with _client(args) as client:
        scores = client.score(args.prompt, args.completions, reward_model=args.reward_model)
    if args.json:
        _print_json(scores)
        return 0
    print(f"reward model {scores.reward_model}")
    for score, completion in zip(scores.scores, args.completions, strict=False):
        print(f"{score:+.4f}  {completion}")
    return 0


def _policies(args: argparse.Namespace) -> int:
    with _client(args) as client:
        versions = client.versions(args.name)
    if args.json:
        _print_json(versions)
        return 0
    live = set(versions.live.values())
    rows = [("", "ID", "STATE", "CREATED", "SHA256", "METRICS")]
    for v in versions.versions:
        created = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_at))
            if v.created_at
            else "-"
        )
        metrics = " ".join(f"{k}={val:.4g}" for k, val in sorted(v.metrics.items())) or "-"
        rows.append(
            ("*" if v.id in live else "", v.id, v.state, created, v.sha256[:12] or "-", metrics)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1])
    if (c := versions.challenge) is not None:
        print(
            f"challenge {c.challenger} vs {c.champion} ({c.outcome}): {c.rankings} rankings, "
            f"{c.wins}-{c.losses}-{c.ties} won-lost-tied, win rate {c.win_rate:.3f} "
            f"[{c.lower:.3f}, {c.upper:.3f}] at {c.confidence:.0%}; from {c.min_rankings} "
            f"rankings, promotes if lower > {c.promote_above:g}, retires if upper < "
            f"{c.retire_below:g}"
        )
    return 0


def _simulate(args: argparse.Namespace) -> int:
    try:
        preference = preference_from_spec(args.preference)
    except ValueError as e:
        raise UsageError(str(e)) from e
    name = args.labeler or f"sim-{preference}"
    with _client(args) as client:
        labeler = Labeler(
            client, preference, name=name, k=args.k, policies=args.policies, **_sampling(args)
        )
        with _progress(args) as update:
            stats = labeler.run(
                demo_prompts(args.seed), count=args.count, seconds=args.seconds, on_result=update
            )
    if args.json:
        summary = {
            "labeler": name,
            "preference": str(preference),
            "attempts": stats.attempts,
            **dataclasses.asdict(stats),
        }
        summary["mean_key"] = None if math.isnan(stats.mean_key) else stats.mean_key
        print(json.dumps(summary))
        return 0
    line = (
        f"{name}: {stats.submitted} rankings submitted ({stats.pairs} pairs), "
        f"{stats.skipped} skipped (all tied), {stats.errors} errors in {stats.seconds:.1f}s"
    )
    if stats.candidates:
        line += f"; mean {preference} score {stats.mean_key:.3g}"
    print(line)
    if stats.last_error:
        print(f"last error: {stats.last_error}", file=sys.stderr)
    return 0


def _add_connection(group: Any, environ: Mapping[str, str], api_key_help: str) -> None:
    """--server and --api-key, defaulting to $FLYWHEEL_SERVER and $FLYWHEEL_API_KEY."""
    group.add_argument(
        "--server",
        default=environ.get("FLYWHEEL_SERVER") or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help="gRPC address of the server (default: $FLYWHEEL_SERVER or %(default)s)",
    )
    group.add_argument(
        "--api-key",
        default=environ.get("FLYWHEEL_API_KEY") or None,
        metavar="KEY",
        help=api_key_help,
    )


def _learn(args: argparse.Namespace) -> int:
    import logging
    import signal
    from pathlib import Path

    from flywheel_learner.loop import LearnerConfig, LearnerError, run  # torch: only here
    from flywheel_learner.ppo import PPOConfig

    try:
        config = LearnerConfig(
            server=args.server,
            api_key=args.api_key,
            model_dir=Path(args.model),
            work_dir=Path(args.work_dir),
            min_new_rankings=args.min_new_rankings,
            interval_s=args.interval,
            max_rounds=args.rounds,
            ppo_steps_per_round=args.ppo_steps,
            rm_min_accuracy=args.rm_min_accuracy,
            rm_min_held_out_pairs=args.rm_min_held_out_pairs,
            challenger=args.challenger,
            ppo=PPOConfig(final_norm_lr=args.final_norm_lr),
            import_preferences=tuple(Path(p) for p in args.import_preferences),
            pretraining=Path(args.pretraining) if args.pretraining else None,
            reward_init=Path(args.reward_init) if args.reward_init else None,
            seed=args.seed,
            threads=args.threads,
        )
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


@contextlib.contextmanager
def _progress(args: argparse.Namespace) -> Iterator[Callable[[LabelStats], None]]:
    """A tqdm bar on a terminal; nothing when piped or printing JSON."""
    if args.json or not sys.stderr.isatty():
        yield lambda stats: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=args.count, unit="prompt", desc="simulate") as bar:

        def update(stats: LabelStats) -> None:
            bar.update(stats.attempts - bar.n)
            bar.set_postfix(submitted=stats.submitted, skipped=stats.skipped, errors=stats.errors)

        yield update


# -- entry point ---------------------------------------------------------------------------------


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func
    try:
        return command(args)
    except UsageError as e:
        return _fail(str(e), EXIT_USAGE)
    except InvalidArgument as e:
        return _fail(e.message, EXIT_USAGE)
    except Unauthenticated as e:
        return _fail(f"{e.message} (pass --api-key or set FLYWHEEL_API_KEY)", EXIT_SERVER_ERROR)
    except Unavailable as e:
        server = getattr(args, "server", "?")
        return _fail(f"cannot reach the server at {server}: {e.message}", EXIT_SERVER_ERROR)
    except FlywheelError as e:
        return _fail(e.message, EXIT_SERVER_ERROR)
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        return _fail(str(e), EXIT_SERVER_ERROR)
    except Exception as e:
        if args.func is _serve:
            raise  # a crashing server's traceback is what its operator needs
        return _fail(f"{type(e).__name__}: {e}", EXIT_SERVER_ERROR)


if __name__ == "__main__":
    sys.exit(main())
