"""The SDK's verbs on the command line: generate, compare, rank, demonstrate, score, policies,
and simulate (a scripted labeler)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flywheel_cli import prompts
from flywheel_cli.args import (
    UsageError,
    add_connection,
    at_least_two,
    credentials,
    names,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from flywheel_cli.labelers import Labeler, LabelStats, demo_prompts, preference_from_spec
from flywheel_client.errors import InvalidArgument
from flywheel_client.grpc_client import FlywheelClient
from flywheel_client.ranking import TIE, parse_tiers
from flywheel_client.types import Chunk, Completion, SamplingOptions
from flywheel_proto import datasets


def add_verbs(commands: Any, environ: Mapping[str, str]) -> None:
    """The verbs' subcommands, each with the connection flags (and sampling where it samples)."""
    client = argparse.ArgumentParser(add_help=False)
    group = client.add_argument_group("server connection")
    add_connection(
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
    group.add_argument("--top-k", type=non_negative_int, metavar="K", help="0 = off")
    group.add_argument("--max-tokens", type=positive_int, metavar="M", help="tokens to generate")
    group.add_argument(
        "--stop", action="append", metavar="S", help="a stop string; repeat for more (at most 4)"
    )
    group.add_argument(
        "--seed", type=non_negative_int, help="same seed, prompt and policy: same text"
    )

    sub = commands.add_parser(
        "generate",
        parents=[client, sampling],
        help="sample completions and print them with their ids",
        description="Sample completions of PROMPT. Rank them later by their ids with `flywheel rank`.",
    )
    sub.add_argument("prompt", metavar="PROMPT")
    sub.add_argument("--n", type=positive_int, default=1, help="completions to sample (default: 1)")
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
    sub.add_argument("--k", type=positive_int, default=4, help="candidates (default: 4)")
    sub.add_argument(
        "--policies",
        type=names,
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
    sub.add_argument("--labeler", metavar="NAME", help=f"who ranked ({LABELER_DEFAULT})")
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
    sub.add_argument("--labeler", metavar="NAME", help=f"who wrote it ({LABELER_DEFAULT})")
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
    sub.add_argument("--k", type=at_least_two, default=4, help="candidates per prompt (default: 4)")
    sub.add_argument(
        "--count", type=non_negative_int, default=100, help="prompts to label (default: 100)"
    )
    sub.add_argument(
        "--seconds", type=non_negative_float, metavar="S", help="stop after S seconds too"
    )
    sub.add_argument(
        "--labeler",
        metavar="NAME",
        help="labeler name recorded with each ranking (default: the API key's name when one is "
        "given, else sim-PREFERENCE)",
    )
    sub.add_argument(
        "--policies",
        type=names,
        default=[],
        metavar="A,B",
        help="comma-separated versions; candidate i comes from the (i mod count)-th",
    )
    sub.set_defaults(func=_simulate)

    sub = commands.add_parser(
        "export",
        parents=[client],
        help="write the rankings as a JSONL dataset (admin key)",
        description=datasets.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("--format", choices=datasets.FORMATS, default="pairs", help="(default: pairs)")
    sub.add_argument("--out", required=True, metavar="FILE", help="the JSONL file to write")
    sub.add_argument(
        "--after", type=non_negative_int, default=0, metavar="CURSOR", help="rankings after this"
    )
    sub.add_argument(
        "--page", type=non_negative_int, default=0, metavar="N",
        help="rankings per request (default: the server's page, 500)",
    )  # fmt: skip
    sub.set_defaults(func=_export)

    sub = commands.add_parser(
        "prompts", help="the labeling queue's prompts (admin key)", description=prompts.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    actions = sub.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub = actions.add_parser(
        "add", parents=[client], help="queue the prompts of a JSONL file for labelers",
        description=prompts.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub.add_argument("file", metavar="FILE.jsonl", type=Path)
    sub.set_defaults(func=_add_prompts)


# With auth on the server records feedback under the key's name, and refuses another unless
# the key allows sub-labelers; so with a key the CLI sends no name of its own by default.
LABELER_DEFAULT = "default: the API key's name when one is given, else cli"


def _labeler(args: argparse.Namespace, anonymous: str) -> str:
    """--labeler, else "" with an API key (the server records the key's name), else `anonymous`."""
    if args.labeler:
        return str(args.labeler)
    return "" if args.api_key else anonymous


def _client(args: argparse.Namespace) -> FlywheelClient:
    return FlywheelClient(
        args.server, api_key=args.api_key, timeout=args.timeout, credentials=credentials(args)
    )


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
        receipt = client.rank(tiers, labeler=_labeler(args, "cli"), idempotency_key=args.key)
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
            **_prompt(args),
            response=args.response,
            labeler=_labeler(args, "cli"),
            idempotency_key=args.key,
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


def _export(args: argparse.Namespace) -> int:
    """Write to a temporary file beside --out, then rename: a failed export leaves no half file."""
    out = Path(args.out)
    partial = out.with_name(f".{out.name}.partial")
    rankings = written = 0
    try:
        with _client(args) as client, partial.open("w", encoding="utf-8") as f:
            after = args.after
            while page := client.export_rankings(after, args.page):  # page by page, to the end
                after = page[-1].cursor
                rankings += len(page)
                for line in datasets.lines(page, args.format):
                    f.write(datasets.jsonl(line))
                    written += 1
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    summary = {"rankings": rankings, "lines": written, "format": args.format, "out": str(out)}
    print(json.dumps(summary) if args.json else f"{rankings} rankings -> {written} lines in {out}")
    return 0


def _add_prompts(args: argparse.Namespace) -> int:
    try:
        texts = prompts.read_prompts(args.file)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from e
    added = duplicates = 0
    with _client(args) as client:
        for start in range(0, len(texts), prompts.BATCH):
            result = client.add_prompts(texts[start : start + prompts.BATCH])
            added, duplicates = added + result.added, duplicates + result.duplicates
    summary = {"added": added, "duplicates": duplicates, "file": str(args.file)}
    print(json.dumps(summary) if args.json else
          f"{added} prompts queued, {duplicates} already queued, from {args.file}")  # fmt: skip
    return 0


def _simulate(args: argparse.Namespace) -> int:
    try:
        preference = preference_from_spec(args.preference)
    except ValueError as e:
        raise UsageError(str(e)) from e
    name = _labeler(args, f"sim-{preference}")
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
        f"{name or 'labeler'}: {stats.submitted} rankings submitted ({stats.pairs} pairs), "
        f"{stats.skipped} skipped (all tied), {stats.errors} errors in {stats.seconds:.1f}s"
    )
    if stats.candidates:
        line += f"; mean {preference} score {stats.mean_key:.3g}"
    print(line)
    if stats.last_error:
        print(f"last error: {stats.last_error}", file=sys.stderr)
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
