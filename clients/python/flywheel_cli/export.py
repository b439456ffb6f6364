"""Rankings out as standard datasets (issue 20): JSON Lines other trainers read as they are.

    pairs     one line per ordered pair of a ranking: {"prompt", "chosen", "rejected"}, what
              TRL's RewardTrainer and DPOTrainer and OpenRLHF's reward and DPO datasets read;
              tied completions give no pair, nor do two identical texts.
    rankings  one line per ranking: {"prompt", "ranking": [[best, tied], [next], ...]}, the
              K-way ranking with its ties, as InstructGPT trains on it.

Both carry "labeler", "user" (the end user the prompt was asked for), "ranking_id" and
"created_at", and `flywheel learn --import-preferences` reads both back. The prompt is the text
the policy saw (a chat already in its template).
Pure functions of the exported records; the command writes them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from flywheel_client.types import RankingRecord

FORMATS = ("pairs", "rankings")


def tiers(record: RankingRecord) -> list[list[str]]:
    """The ranking's completion texts, best tier first."""
    out: dict[int, list[str]] = {}
    for c in sorted(record.completions, key=lambda c: c.tier):
        out.setdefault(c.tier, []).append(c.text)
    return list(out.values())


def lines(records: Iterable[RankingRecord], fmt: str) -> Iterator[dict[str, Any]]:
    """The JSONL records of `records` in format `fmt` (one of FORMATS)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    for record in records:
        about = {
            "labeler": record.labeler,
            "user": record.user,
            "ranking_id": record.ranking_id,
            "created_at": record.created_at,
        }
        ranked = tiers(record)
        if fmt == "rankings":
            yield {"prompt": record.prompt, "ranking": ranked, **about}
            continue
        for better, worse in itertools.combinations(range(len(ranked)), 2):
            for chosen, rejected in itertools.product(ranked[better], ranked[worse]):
                if chosen != rejected:  # the same text ranked twice teaches nothing
                    yield {"prompt": record.prompt, "chosen": chosen, "rejected": rejected, **about}
