"""The labeling queue: tasks (prompts waiting for labelers) and each labeler's claim on one;
and a chat prompt's messages, kept so rankings leave as chat datasets.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("prompts", sa.Column("messages", sa.JSON(), nullable=True))
    op.create_table(
        "tasks",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("copies", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.CheckConstraint("source IN ('traffic', 'file', 'typed')", name="ck_tasks_source"),
        sa.CheckConstraint("kind IN ('text', 'chat')", name="ck_tasks_kind"),
        sa.PrimaryKeyConstraint("seq", name="pk_tasks"),
        sa.UniqueConstraint("id", name="uq_tasks_id"),
        sa.UniqueConstraint("digest", name="uq_tasks_digest"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "task_claims",
        sa.Column("task_id", sa.String(128), nullable=False),
        sa.Column("labeler", sa.String(256), nullable=False),
        sa.Column("prompt_id", sa.String(128), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reserved_until", sa.Double(), nullable=False),
        sa.Column("ranking_id", sa.String(128), nullable=True),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.CheckConstraint(
            "state IN ('reserved', 'ranked', 'skipped', 'all_bad')", name="ck_task_claims_state"
        ),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_task_claims_task_id_tasks"),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name="fk_task_claims_prompt_id_prompts"
        ),
        sa.PrimaryKeyConstraint("task_id", "labeler", name="pk_task_claims"),
    )
    op.create_index("ix_task_claims_prompt_id", "task_claims", ["prompt_id"])


def downgrade() -> None:
    op.drop_column("prompts", "messages")
    op.drop_index("ix_task_claims_prompt_id", table_name="task_claims")
    op.drop_table("task_claims")
    op.drop_table("tasks")
