"""What every command shares: argument types, the connection flags, exit codes."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from flywheel_client.grpc_client import DEFAULT_TARGET

EXIT_SERVER_ERROR = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Input the user can fix; exits 2 like argparse's own errors."""


# -- argument types ------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 to rank, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_connection(group: Any, environ: Mapping[str, str], api_key_help: str) -> None:
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
    for flag, what in (
        ("ca", "connect over TLS, trusting the server certificate this PEM CA bundle signed"),
        ("cert", "client certificate (PEM) for a server that requires one (mutual TLS)"),
        ("key", "private key of --tls-cert"),
    ):
        variable = f"FLYWHEEL_TLS_{flag.upper()}"
        group.add_argument(
            f"--tls-{flag}",
            default=environ.get(variable) or None,
            metavar="FILE",
            help=f"{what} (default: ${variable})",
        )


def credentials(args: Any) -> Any:
    """gRPC channel credentials from --tls-ca/--tls-cert/--tls-key; None for plain TCP."""
    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    from flywheel_client import tls_credentials

    try:
        return tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    except (OSError, ValueError) as e:
        raise UsageError(f"TLS: {e}") from e
