"""Domains get a network and an address record (issue 6 + 7).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('domains', schema=None) as batch_op:
        batch_op.add_column(sa.Column('network', sa.String(length=63), nullable=True))
        batch_op.add_column(sa.Column('address_record_id', sa.Integer(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('domains', schema=None) as batch_op:
        batch_op.drop_column('address_record_id')
        batch_op.drop_column('network')

