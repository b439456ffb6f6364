"""The `flywheel` command line: run the server (and the learner), or talk to one over gRPC.

Environment variables (FLYWHEEL_SERVER, FLYWHEEL_API_KEY) are read when the parser is built,
and nowhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from flywheel_cli.args import EXIT_SERVER_ERROR, EXIT_USAGE, UsageError
from flywheel_cli.learn import add_learn
from flywheel_cli.verbs import add_verbs
from flywheel_client.errors import FlywheelError, InvalidArgument, Unauthenticated, Unavailable
from flywheel_server.config import ServerConfig, add_arguments, from_arguments


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

    add_verbs(commands, environ)
    add_learn(commands, environ)
    return parser


def _serve(args: argparse.Namespace) -> int:
    try:
        config = with_demo(from_arguments(args))
    except ValueError as e:
        raise UsageError(str(e)) from e
    from flywheel_server.app import run  # heavy (torch, bentoml): only when serving

    if args.up:
        run(config, up=True)
    else:
        run(config)
    return 0


def with_demo(config: ServerConfig) -> ServerConfig:
    """No --model: the demo model, built once under --data-dir (no download), with its initial
    reward model and pretraining corpus where none were given."""
    if config.model is not None:
        return config
    from flywheel_demo.model import ensure_demo_model  # torch: only when building

    demo = ensure_demo_model(config.data_dir, progress=sys.stderr.isatty())
    return dataclasses.replace(
        config,
        model=demo.model_dir,
        reward=config.reward or demo.reward_dir,
        pretraining=config.pretraining or demo.pretraining,
    )


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
