"""release lineage: releases.parent_ids (the releases merged into a release)

Rows made before this revision are no merges: an empty list.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    if "parent_ids" in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("releases")}:
        return  # adopted from a pre-Alembic database whose tables were made from today's models
    with op.batch_alter_table("releases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parent_ids", sa.JSON(), nullable=False, server_default=sa.text("'[]'")))


def downgrade() -> None:
    with op.batch_alter_table("releases", schema=None) as batch_op:
        batch_op.drop_column("parent_ids")
