"""Initial schema: prompts, completions, rankings, demonstrations, adapter versions, promotions.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.String(128)
KEY = sa.String(256)
CURSOR = {"sqlite_autoincrement": True}


def _seq() -> sa.Column[int]:
    return sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False)


def _seq_key(table: str) -> sa.PrimaryKeyConstraint:
    # On SQLite this still renders as "seq INTEGER PRIMARY KEY AUTOINCREMENT": the rowid.
    return sa.PrimaryKeyConstraint("seq", name=f"pk_{table}")


def upgrade() -> None:
    op.create_table(
        "prompts",
        _seq(),
        _seq_key("prompts"),
        sa.Column("id", ID, nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.UniqueConstraint("id", name="uq_prompts_id"),
        **CURSOR,
    )
    op.create_table(
        "completions",
        sa.Column("id", ID, nullable=False),
        sa.Column("prompt_id", ID, nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("finish_reason", sa.String(16), nullable=False),
        sa.Column("policy", sa.String(64), nullable=False),
        sa.Column("sampling", sa.JSON(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_completions"),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name="fk_completions_prompt_id_prompts"
        ),
    )
    op.create_table(
        "rankings",
        _seq(),
        _seq_key("rankings"),
        sa.Column("id", ID, nullable=False),
        sa.Column("prompt_id", ID, nullable=False),
        sa.Column("labeler", KEY, nullable=False),
        sa.Column("idempotency_key", KEY, nullable=False),
        sa.Column("pairs", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.UniqueConstraint("id", name="uq_rankings_id"),
        sa.UniqueConstraint("idempotency_key", name="uq_rankings_idempotency_key"),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name="fk_rankings_prompt_id_prompts"
        ),
        **CURSOR,
    )
    op.create_table(
        "ranking_items",
        sa.Column("ranking_id", ID, nullable=False),
        sa.Column("completion_id", ID, nullable=False),
        sa.Column("tier", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("ranking_id", "completion_id", name="pk_ranking_items"),
        sa.ForeignKeyConstraint(
            ["ranking_id"], ["rankings.id"], name="fk_ranking_items_ranking_id_rankings"
        ),
        sa.ForeignKeyConstraint(
            ["completion_id"], ["completions.id"], name="fk_ranking_items_completion_id_completions"
        ),
    )
    op.create_table(
        "demonstrations",
        _seq(),
        _seq_key("demonstrations"),
        sa.Column("id", ID, nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("response", sa.Text(), nullable=False),
        sa.Column("labeler", KEY, nullable=False),
        sa.Column("idempotency_key", KEY, nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.UniqueConstraint("id", name="uq_demonstrations_id"),
        sa.UniqueConstraint("idempotency_key", name="uq_demonstrations_idempotency_key"),
        **CURSOR,
    )
    op.create_table(
        "adapter_versions",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("base_model", sa.Text(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("name", "version", name="pk_adapter_versions"),
        sa.CheckConstraint(
            "state IN ('ready', 'live', 'retired', 'refused')", name="ck_adapter_versions_state"
        ),
    )
    op.create_index(
        "uq_adapter_versions_live",
        "adapter_versions",
        ["name"],
        unique=True,
        sqlite_where=sa.text("state = 'live'"),
        postgresql_where=sa.text("state = 'live'"),
    )
    op.create_table(
        "promotions",
        _seq(),
        _seq_key("promotions"),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("rolled_back", sa.Boolean(), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["name", "version"],
            ["adapter_versions.name", "adapter_versions.version"],
            name="fk_promotions_name_adapter_versions",
        ),
        **CURSOR,
    )


def downgrade() -> None:
    for table in (
        "promotions",
        "adapter_versions",
        "demonstrations",
        "ranking_items",
        "rankings",
        "completions",
        "prompts",
    ):
        op.drop_table(table)
