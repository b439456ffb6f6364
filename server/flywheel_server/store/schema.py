"""Tables of the Flywheel store. migrations/versions/ must create exactly this (a test checks)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Double,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Explicit constraint names, so the hand-written migration and the metadata agree on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID = String(128)
KEY = String(256)  # idempotency keys and labeler ids

# A cursor must never be handed out twice: AUTOINCREMENT keeps SQLite from reusing a rowid.
_CURSOR_TABLE_ARGS: dict[str, Any] = {"sqlite_autoincrement": True}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class PromptRow(Base):
    __tablename__ = "prompts"
    __table_args__ = _CURSOR_TABLE_ARGS

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(ID, unique=True)
    text: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Double)
    user: Mapped[str] = mapped_column(KEY, server_default="")
    messages: Mapped[list[dict[str, str]] | None] = mapped_column(JSON, nullable=True)


class CompletionRow(Base):
    __tablename__ = "completions"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    prompt_id: Mapped[str] = mapped_column(ID, ForeignKey("prompts.id"))
    index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(16))
    policy: Mapped[str] = mapped_column(String(64))
    sampling: Mapped[dict[str, Any]] = mapped_column(JSON)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Double)


class RankingRow(Base):
    __tablename__ = "rankings"
    __table_args__ = _CURSOR_TABLE_ARGS

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(ID, unique=True)
    prompt_id: Mapped[str] = mapped_column(ID, ForeignKey("prompts.id"))
    labeler: Mapped[str] = mapped_column(KEY)
    idempotency_key: Mapped[str] = mapped_column(KEY, unique=True)
    pairs: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Double)


class RankingItemRow(Base):
    __tablename__ = "ranking_items"

    ranking_id: Mapped[str] = mapped_column(ID, ForeignKey("rankings.id"), primary_key=True)
    completion_id: Mapped[str] = mapped_column(ID, ForeignKey("completions.id"), primary_key=True)
    tier: Mapped[int] = mapped_column(Integer)  # 0 is the best tier


class DemonstrationRow(Base):
    __tablename__ = "demonstrations"
    __table_args__ = _CURSOR_TABLE_ARGS

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(ID, unique=True)
    prompt: Mapped[str] = mapped_column(Text)
    response: Mapped[str] = mapped_column(Text)
    labeler: Mapped[str] = mapped_column(KEY)
    idempotency_key: Mapped[str] = mapped_column(KEY, unique=True)
    created_at: Mapped[float] = mapped_column(Double)


class AdapterVersionRow(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (
        CheckConstraint("state IN ('ready', 'live', 'retired', 'refused')", name="state"),
        # At most one live version per name, whatever the caller does.
        Index(
            "uq_adapter_versions_live",
            "name",
            unique=True,
            sqlite_where=text("state = 'live'"),
            postgresql_where=text("state = 'live'"),
        ),
    )

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    state: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    base_model: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Double)


class PromotionRow(Base):
    """The promotion history of each adapter name, used as a stack by rollback."""

    __tablename__ = "promotions"
    __table_args__ = (
        ForeignKeyConstraint(
            ["name", "version"], ["adapter_versions.name", "adapter_versions.version"]
        ),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer)
    rolled_back: Mapped[bool] = mapped_column(Boolean)
    at: Mapped[float] = mapped_column(Double)


class ChallengeRow(Base):
    """A champion / challenger comparison of two policy versions; at most one runs at a time."""

    __tablename__ = "challenges"
    __table_args__ = (
        CheckConstraint("outcome IN ('running', 'promoted', 'retired', 'stopped')", name="outcome"),
        Index(
            "uq_challenges_running",
            "outcome",
            unique=True,
            sqlite_where=text("outcome = 'running'"),
            postgresql_where=text("outcome = 'running'"),
        ),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    challenger: Mapped[int] = mapped_column(Integer)  # policy version
    champion: Mapped[int] = mapped_column(Integer)  # policy version; 0 = the base model
    outcome: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[float] = mapped_column(Double)
    ended_at: Mapped[float | None] = mapped_column(Double, nullable=True)


class ChallengePromptRow(Base):
    """Prompts whose candidates were a blind champion / challenger mix: their rankings count."""

    __tablename__ = "challenge_prompts"

    prompt_id: Mapped[str] = mapped_column(ID, ForeignKey("prompts.id"), primary_key=True)
    challenge: Mapped[int] = mapped_column(Integer, ForeignKey("challenges.seq"), index=True)


class AuditRow(Base):
    """Who published, promoted, rolled back or challenged what, and refusals by key (`audit`)."""

    __tablename__ = "audit"
    __table_args__ = _CURSOR_TABLE_ARGS

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Double)
    actor: Mapped[str] = mapped_column(KEY)
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)


class TaskRow(Base):
    """A prompt waiting for labelers (`tasks`): from logged traffic, a prompt file, or typed.

    `digest` (sha256 of kind and text) keeps one task per distinct prompt, so no prompt floods
    the queue. `copies` is how many labelers rank it (2 for the share that measures agreement).
    """

    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint("source IN ('traffic', 'file', 'typed')", name="source"),
        CheckConstraint("kind IN ('text', 'chat')", name="kind"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(ID, unique=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    text: Mapped[str] = mapped_column(Text)  # chat: the user's message; text: the raw prompt
    kind: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    copies: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Double)


class TaskClaimRow(Base):
    """One labeler's hold on a task: reserved until a time, then ranked or skipped. `prompt_id`
    is the comparison (the candidates) shown; the labelers of a shared task share one."""

    __tablename__ = "task_claims"
    __table_args__ = (
        CheckConstraint("state IN ('reserved', 'ranked', 'skipped', 'all_bad')", name="state"),
    )

    task_id: Mapped[str] = mapped_column(ID, ForeignKey("tasks.id"), primary_key=True)
    labeler: Mapped[str] = mapped_column(KEY, primary_key=True)
    prompt_id: Mapped[str | None] = mapped_column(
        ID, ForeignKey("prompts.id"), nullable=True, index=True
    )
    state: Mapped[str] = mapped_column(String(16))
    reserved_until: Mapped[float] = mapped_column(Double)
    ranking_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    updated_at: Mapped[float] = mapped_column(Double)
