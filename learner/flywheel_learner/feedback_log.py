"""The learner's local copy of the feedback: rankings and prompts exported through the contract.

Each export page is written as its own JSON Lines segment (atomically), and only then is the
cursor advanced in the checkpoint. A crash between the two re-exports that page on restart;
records already held are recognised by id and skipped, so nothing is lost or duplicated.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flywheel_client import types as t
from flywheel_learner.checkpoint import LearnerState, atomic_write_text, save_state

RANKINGS, PROMPTS = "rankings", "prompts"


class ExportClient(Protocol):
    """The part of `FlywheelClient` that sync needs (a fake in the unit tests)."""

    def export_rankings(self, after: int = 0, limit: int = 0) -> list[t.RankingRecord]: ...

    def export_prompts(self, after: int = 0, limit: int = 0) -> list[t.PromptRecord]: ...


@dataclass(frozen=True)
class Ranking:
    """A logged ranking: completion texts grouped by tier, best first."""

    ranking_id: str
    prompt: str
    tiers: tuple[tuple[str, ...], ...]

    @property
    def informative(self) -> bool:
        """At least two non-empty tiers: it implies at least one ordered pair."""
        return sum(1 for tier in self.tiers if tier) >= 2


def ranking_row(record: t.RankingRecord) -> dict[str, Any]:
    by_tier: dict[int, list[str]] = {}
    for c in record.completions:
        by_tier.setdefault(c.tier, []).append(c.text)
    return {
        "cursor": record.cursor,
        "ranking_id": record.ranking_id,
        "prompt_id": record.prompt_id,
        "prompt": record.prompt,
        "tiers": [by_tier[tier] for tier in sorted(by_tier)],
        "labeler": record.labeler,
        "created_at": record.created_at,
    }


def prompt_row(record: t.PromptRecord) -> dict[str, Any]:
    return {
        "cursor": record.cursor,
        "prompt_id": record.prompt_id,
        "prompt": record.prompt,
        "created_at": record.created_at,
    }


def _rows(work_dir: Path, kind: str) -> Iterator[dict[str, Any]]:
    for segment in sorted((work_dir / kind).glob("*.jsonl")):
        for n, line in enumerate(segment.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{segment}:{n} is not valid JSON: {e}") from e


def _ids(work_dir: Path, kind: str, key: str) -> set[str]:
    return {row[key] for row in _rows(work_dir, kind)}


def _write_segment(work_dir: Path, kind: str, rows: Sequence[dict[str, Any]]) -> None:
    name = f"{rows[0]['cursor']:012d}-{rows[-1]['cursor']:012d}.jsonl"
    atomic_write_text(work_dir / kind / name, "".join(json.dumps(r) + "\n" for r in rows))


@dataclass(frozen=True)
class SyncResult:
    state: LearnerState
    new_rankings: int
    new_prompts: int


def sync(
    client: ExportClient, work_dir: Path, state: LearnerState, *, page: int = 500
) -> SyncResult:
    """Export everything past the checkpointed cursors, page by page: data, then cursor."""
    if page < 1:
        raise ValueError(f"page must be >= 1, got {page}")
    state, new_rankings = _sync_kind(
        client.export_rankings, ranking_row, work_dir, state, RANKINGS, "ranking_id", page
    )
    state, new_prompts = _sync_kind(
        client.export_prompts, prompt_row, work_dir, state, PROMPTS, "prompt_id", page
    )
    return SyncResult(state, new_rankings, new_prompts)


def _sync_kind(
    export: Callable[..., Sequence[Any]],
    to_row: Callable[[Any], dict[str, Any]],
    work_dir: Path,
    state: LearnerState,
    kind: str,
    id_key: str,
    page: int,
) -> tuple[LearnerState, int]:
    cursor_field = f"{kind}_cursor"
    seen = _ids(work_dir, kind, id_key)
    new = 0
    while True:
        records = export(after=getattr(state, cursor_field), limit=page)
        if not records:
            return state, new
        rows = [to_row(r) for r in records if getattr(r, id_key) not in seen]
        if rows:
            _write_segment(work_dir, kind, rows)
            seen.update(row[id_key] for row in rows)
            new += len(rows)
        state = state.replace(**{cursor_field: max(r.cursor for r in records)})
        save_state(work_dir, state)
        if len(records) < page:
            return state, new


def read_rankings(work_dir: Path) -> list[Ranking]:
    """Every logged ranking once (by ranking_id), oldest first."""
    out: dict[str, Ranking] = {}
    for row in _rows(work_dir, RANKINGS):
        tiers = tuple(tuple(tier) for tier in row["tiers"])
        out.setdefault(row["ranking_id"], Ranking(row["ranking_id"], row["prompt"], tiers))
    return list(out.values())


def read_prompts(work_dir: Path) -> list[tuple[str, str]]:
    """Every logged (prompt_id, prompt text) once, oldest first."""
    out: dict[str, str] = {}
    for row in _rows(work_dir, PROMPTS):
        out.setdefault(row["prompt_id"], row["prompt"])
    return list(out.items())
