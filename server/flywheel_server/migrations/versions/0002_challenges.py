"""Champion / challenger: the challenges and the prompts of their blind comparisons.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "challenges",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("challenger", sa.Integer(), nullable=False),
        sa.Column("champion", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("started_at", sa.Double(), nullable=False),
        sa.Column("ended_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("seq", name="pk_challenges"),
        sa.CheckConstraint(
            "outcome IN ('running', 'promoted', 'retired', 'stopped')",
            name="ck_challenges_outcome",
        ),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "uq_challenges_running",
        "challenges",
        ["outcome"],
        unique=True,
        sqlite_where=sa.text("outcome = 'running'"),
        postgresql_where=sa.text("outcome = 'running'"),
    )
    op.create_table(
        "challenge_prompts",
        sa.Column("prompt_id", sa.String(128), nullable=False),
        sa.Column("challenge", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("prompt_id", name="pk_challenge_prompts"),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name="fk_challenge_prompts_prompt_id_prompts"
        ),
        sa.ForeignKeyConstraint(
            ["challenge"], ["challenges.seq"], name="fk_challenge_prompts_challenge_challenges"
        ),
    )
    op.create_index("ix_challenge_prompts_challenge", "challenge_prompts", ["challenge"])


def downgrade() -> None:
    op.drop_table("challenge_prompts")
    op.drop_table("challenges")
