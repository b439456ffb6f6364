"""The labeling queue's transactions (`Store` mixes them in): tasks, and labelers' claims on them.

A task is open to a labeler while fewer than `copies` labelers hold it (a reservation not yet
expired, or a ranking) and the labeler has not had it before. A claim is one write transaction:
on SQLite `BEGIN IMMEDIATE`, on PostgreSQL an exclusive lock on the claims table, so two
labelers asking at once never both take the last copy of a task.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, cast

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session

from flywheel_server.domain import Claim, ClaimState, Task, TaskSource
from flywheel_server.errors import NotFound
from flywheel_server.store.schema import (
    Base,
    PromptRow,
    RankingRow,
    TaskClaimRow,
    TaskRow,
)

TRAFFIC_WINDOW = 500  # the newest logged prompts a refill samples from


def digest(kind: str, text: str) -> str:
    """The identity of a prompt in the queue: one task per distinct (kind, text)."""
    return hashlib.sha256(f"{kind}\n{text}".encode()).hexdigest()


def new_task(text: str, kind: Literal["text", "chat"], source: TaskSource, copies: int) -> Task:
    return Task(f"tsk-{uuid.uuid4().hex[:24]}", text, kind, source, copies)


class TaskQueue:
    """Mixed into `Store`, whose transactions (`_read`, `_write`) these use."""

    def _read(self) -> AbstractContextManager[Session]:
        raise NotImplementedError  # Store's

    def _write(self, *serialised: type[Base]) -> AbstractContextManager[Session]:
        raise NotImplementedError  # Store's

    def add_tasks(self, tasks: Sequence[Task]) -> list[Task]:
        """Queue the tasks whose prompt is not queued yet; returns those it added."""
        added = []
        with self._write(TaskRow) as s:
            known = set(
                s.scalars(
                    select(TaskRow.digest).where(
                        TaskRow.digest.in_({digest(t.kind, t.text) for t in tasks})
                    )
                )
            )
            for task in tasks:
                key = digest(task.kind, task.text)
                if key in known:
                    continue
                known.add(key)
                s.add(_task_row(task, key))
                added.append(task)
        return added

    def claim_task(self, labeler: str, at: float, hold_s: float, task_id: str = "") -> Claim | None:
        """The labeler's unexpired reservation, else the oldest open task reserved for them
        until `at + hold_s` (or `task_id`, when it is open to them); None when none is."""
        with self._write(TaskClaimRow) as s:
            held = None if task_id else s.execute(
                select(TaskClaimRow, TaskRow)
                .join(TaskRow, TaskRow.id == TaskClaimRow.task_id)
                .where(TaskClaimRow.labeler == labeler, TaskClaimRow.state == "reserved",
                       TaskClaimRow.reserved_until > at)
                .order_by(TaskClaimRow.updated_at)
                .limit(1)
            ).first()  # fmt: skip
            if held is not None:
                return _claim(*held)
            open_to_them = [~_had(labeler, at), _holders(at) < TaskRow.copies]
            if task_id:
                open_to_them.append(TaskRow.id == task_id)
            row = s.scalars(
                select(TaskRow).where(*open_to_them).order_by(TaskRow.seq).limit(1)
            ).first()
            if row is None:
                return None
            claim = s.get(TaskClaimRow, (row.id, labeler))
            if claim is None:  # else their own reservation expired: they may take it again
                shown = s.scalar(  # a shared task's comparison, when its first labeler has one
                    select(TaskClaimRow.prompt_id)
                    .where(TaskClaimRow.task_id == row.id, TaskClaimRow.prompt_id.is_not(None))
                    .limit(1)
                )
                claim = TaskClaimRow(task_id=row.id, labeler=labeler, prompt_id=shown)
                s.add(claim)
            claim.state, claim.reserved_until, claim.updated_at = "reserved", at + hold_s, at
            s.flush()
            return _claim(claim, row)

    def set_claim_prompt(self, task_id: str, labeler: str, prompt_id: str) -> str:
        """Record the comparison (the prompt whose completions are the candidates) of a task's
        claims that have none yet, and return the labeler's: every labeler of a shared task
        ranks the same candidates, so their agreement can be measured. Two labelers sampling
        at once both get the one stored first."""
        with self._write(TaskClaimRow) as s:
            s.execute(
                update(TaskClaimRow)
                .where(TaskClaimRow.task_id == task_id, TaskClaimRow.prompt_id.is_(None))
                .values(prompt_id=prompt_id)
            )
            shown = s.scalar(
                select(TaskClaimRow.prompt_id).where(
                    TaskClaimRow.task_id == task_id, TaskClaimRow.labeler == labeler
                )
            )
            if shown is None:
                raise NotFound(f"{labeler!r} holds no task {task_id!r}", field="task_id")
            return shown

    def skip_task(self, task_id: str, labeler: str, at: float, all_bad: bool = False) -> Claim:
        """The labeler passes on a task they hold, or marks all its candidates bad (no order
        to learn from): it is not offered to them again."""
        return self._end_claim(task_id, labeler, "all_bad" if all_bad else "skipped", at)

    def _end_claim(self, task_id: str, labeler: str, state: ClaimState, at: float) -> Claim:
        with self._write(TaskClaimRow) as s:
            claim = s.get(TaskClaimRow, (task_id, labeler))
            if claim is None:
                raise NotFound(f"{labeler!r} holds no task {task_id!r}", field="task_id")
            if claim.state == "reserved":
                claim.state, claim.updated_at = state, at
            task = s.scalars(select(TaskRow).where(TaskRow.id == task_id)).one()
            return _claim(claim, task)

    def traffic_prompts(self) -> list[tuple[str, str]]:
        """(kind, text) of the newest distinct logged prompts that were not themselves a
        labeling comparison and are not queued yet, newest first."""
        with self._read() as s:
            shown = select(TaskClaimRow.prompt_id).where(TaskClaimRow.prompt_id.is_not(None))
            rows = s.execute(
                select(PromptRow.id, PromptRow.text)
                .where(PromptRow.id.not_in(shown))
                .order_by(PromptRow.seq.desc())
                .limit(TRAFFIC_WINDOW)
            ).all()
            seen: dict[str, tuple[str, str]] = {}
            for _, text in rows:  # the rendered text the policy saw, whatever the route
                seen.setdefault(digest("text", text), ("text", text))
            queued = set(s.scalars(select(TaskRow.digest).where(TaskRow.digest.in_(seen))))
        return [pair for key, pair in seen.items() if key not in queued]

    def ranked_since(self, labeler: str, since: float) -> int:
        """How many rankings a labeler stored since a time (the page's "today")."""
        with self._read() as s:
            return int(
                s.scalar(
                    select(func.count()).where(
                        RankingRow.labeler == labeler, RankingRow.created_at >= since
                    )
                )
                or 0
            )


def finish_claim(s: Session, prompt_id: str, labeler: str, ranking_id: str, at: float) -> None:
    """Inside `add_ranking`'s transaction: a ranking of a claim's comparison by its labeler
    completes the claim."""
    s.execute(
        update(TaskClaimRow)
        .where(TaskClaimRow.prompt_id == prompt_id, TaskClaimRow.labeler == labeler)
        .values(state="ranked", ranking_id=ranking_id, updated_at=at)
    )


def _holders(at: float) -> Any:
    """Per task: labelers holding it now (an unexpired reservation, or a ranking)."""
    return (
        select(func.count())
        .where(
            TaskClaimRow.task_id == TaskRow.id,
            or_(
                TaskClaimRow.state == "ranked",
                and_(TaskClaimRow.state == "reserved", TaskClaimRow.reserved_until > at),
            ),
        )
        .scalar_subquery()
    )


def _had(labeler: str, at: float) -> Any:
    """The labeler ranked, skipped or now holds the task."""
    return exists().where(
        TaskClaimRow.task_id == TaskRow.id,
        TaskClaimRow.labeler == labeler,
        or_(TaskClaimRow.state != "reserved", TaskClaimRow.reserved_until > at),
    )


def _task_row(task: Task, key: str) -> TaskRow:
    return TaskRow(id=task.id, digest=key, text=task.text, kind=task.kind, source=task.source,
                   copies=task.copies, created_at=task.created_at)  # fmt: skip


def _task(row: TaskRow) -> Task:
    kind = cast(Literal["text", "chat"], row.kind)
    return Task(row.id, row.text, kind, cast(TaskSource, row.source), row.copies, row.created_at)


def _claim(claim: TaskClaimRow, task: TaskRow) -> Claim:
    state = cast(ClaimState, claim.state)
    return Claim(_task(task), claim.labeler, state, claim.reserved_until, claim.prompt_id)
