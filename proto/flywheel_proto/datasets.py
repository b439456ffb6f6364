"""Rankings out as standard datasets, part of the contract: JSON Lines other trainers read as
they are (`flywheel export` through the gRPC export, and the admin route `GET /v1/export`).

    pairs     one line per ordered pair of a ranking: {"prompt", "chosen", "rejected"}, what
              TRL's RewardTrainer and DPOTrainer and OpenRLHF's reward and DPO datasets read;
              tied completions give no pair, nor do two identical texts.
    rankings  one line per ranking: {"prompt", "ranking": [[best, tied], [next], ...]}, the
              K-way ranking with its ties, as InstructGPT trains on it.

Both carry "labeler", "user" (the end user the prompt was asked for), "ranking_id" and
"created_at", and `flywheel learn --import-preferences` reads both back. "prompt" is the text
the policy saw (a chat already in its template); a chat prompt's lines also carry its
"messages" before the template, the conversation a chat trainer renders with its own template.
Pure functions of the ranking records (the server's and the client's have the same fields).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

FORMATS = ("pairs", "rankings")

# Characters JSON leaves raw inside strings but str.splitlines (and readers built on it) breaks
# lines at; generated text holds them now and then. The rest it breaks at are escaped by JSON.
_ESCAPE_LINE_BREAKS = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}


class Completion(Protocol):
    @property
    def text(self) -> str: ...
    @property
    def tier(self) -> int: ...


class Record(Protocol):
    @property
    def prompt(self) -> str: ...
    @property
    def completions(self) -> Sequence[Completion]: ...
    @property
    def labeler(self) -> str: ...
    @property
    def user(self) -> str: ...
    @property
    def ranking_id(self) -> str: ...
    @property
    def created_at(self) -> float: ...
    @property
    def messages(self) -> Sequence[Mapping[str, str]] | None: ...


def tiers(record: Record) -> list[list[str]]:
    """The ranking's completion texts, best tier first."""
    out: dict[int, list[str]] = {}
    for c in sorted(record.completions, key=lambda c: c.tier):
        out.setdefault(c.tier, []).append(c.text)
    return list(out.values())


def lines(records: Iterable[Record], fmt: str) -> Iterator[dict[str, Any]]:
    """The JSONL records of `records` in format `fmt` (one of FORMATS)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    for record in records:
        about: dict[str, Any] = {
            "labeler": record.labeler,
            "user": record.user,
            "ranking_id": record.ranking_id,
            "created_at": record.created_at,
        }
        if record.messages:
            about["messages"] = [dict(m) for m in record.messages]
        ranked = tiers(record)
        if fmt == "rankings":
            yield {"prompt": record.prompt, "ranking": ranked, **about}
            continue
        for better, worse in itertools.combinations(range(len(ranked)), 2):
            for chosen, rejected in itertools.product(ranked[better], ranked[worse]):
                if chosen != rejected:  # the same text ranked twice teaches nothing
                    yield {"prompt": record.prompt, "chosen": chosen, "rejected": rejected, **about}


def jsonl(record: dict[str, Any]) -> str:
    """One JSON Lines line, text left readable (not ASCII-escaped) but with every character a
    line reader might split at escaped: one record is one line for any reader."""
    return json.dumps(record, ensure_ascii=False).translate(_ESCAPE_LINE_BREAKS) + "\n"
