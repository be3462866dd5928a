"""initial schema: users, convs, members, messages, events

Revision ID: 0001
Revises:
Create Date: 2024-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("last_cur", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_users"),
    )
    op.create_table(
        "convs",
        sa.Column("conv", sa.String(32), nullable=False),
        sa.Column("user_a", sa.String(64), nullable=False),
        sa.Column("user_b", sa.String(64), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("last_ts", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("last_mid", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("conv", name="pk_convs"),
    )
    op.create_table(
        "members",
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("conv", sa.String(32), nullable=False),
        sa.Column("peer", sa.String(64), nullable=False),
        sa.Column("delivered", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("read", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("last_recv_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("unread", sa.BigInteger(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(["conv"], ["convs.conv"], name="fk_members_conv_convs"),
        sa.PrimaryKeyConstraint("user_id", "conv", name="pk_members"),
    )
    op.create_table(
        "messages",
        sa.Column("mid", BigId, autoincrement=True, nullable=False),
        sa.Column("conv", sa.String(32), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("sender", sa.String(64), nullable=False),
        sa.Column("recipient", sa.String(64), nullable=False),
        sa.Column("cmid", sa.String(64), nullable=False),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("is_text", sa.Boolean(), nullable=False),
        sa.Column("sender_cur", sa.BigInteger(), nullable=False),
        sa.Column("recipient_cur", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["conv"], ["convs.conv"], name="fk_messages_conv_convs"),
        sa.PrimaryKeyConstraint("mid", name="pk_messages"),
        sa.UniqueConstraint("conv", "seq", name="uq_messages_conv_seq"),
        sa.UniqueConstraint("sender", "cmid", name="uq_messages_sender_cmid"),
    )
    op.create_table(
        "events",
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("cur", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("conv", sa.String(32), nullable=False),
        sa.Column("mid", sa.BigInteger(), nullable=True),
        sa.Column("upto", sa.BigInteger(), nullable=True),
        sa.Column("by_user", sa.String(64), nullable=True),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["mid"], ["messages.mid"], name="fk_events_mid_messages"),
        sa.PrimaryKeyConstraint("user_id", "cur", name="pk_events"),
    )


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("messages")
    op.drop_table("members")
    op.drop_table("convs")
    op.drop_table("users")
