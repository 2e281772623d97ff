"""rules act only within what their owner chose: stable Hub ids of owners and namespaces, a rule's base allow-list

Revision ID: 0002
Revises: 0001

Names stay (display); access is decided on the Hub's stable user/org ids, which survive renames. Rows written
before this revision keep NULL ids (the Hub cannot be asked from a migration): a rule is given its owner's id when
the token it keeps still belongs to the caller (web/rules.py); older jobs are matched by name, as before.
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('credentials', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner_id', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_credentials_owner_id'), ['owner_id'], unique=False)

    with op.batch_alter_table('rules', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('target_namespace_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('bases', sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f('ix_rules_owner_id'), ['owner_id'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('namespace_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('base_allowed', sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_owner_id'), ['owner_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_namespace_id'), ['namespace_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_namespace_id'))
        batch_op.drop_index(batch_op.f('ix_jobs_owner_id'))
        batch_op.drop_column('base_allowed')
        batch_op.drop_column('namespace_id')
        batch_op.drop_column('owner_id')

    with op.batch_alter_table('rules', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rules_owner_id'))
        batch_op.drop_column('bases')
        batch_op.drop_column('target_namespace_id')
        batch_op.drop_column('owner_id')

    with op.batch_alter_table('credentials', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_credentials_owner_id'))
        batch_op.drop_column('owner_id')
