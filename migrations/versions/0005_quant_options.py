"""quantized-base options on jobs and rules (issue 12): from_quantized (a bitsandbytes base: its 16-bit original or
its dequantized weights), keep_quantization (an FP8 base written back in FP8), and the job's base_quantization (how
the worker read the base, for the job page)

Revision ID: 0005_quant_options
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa


revision = '0005_quant_options'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('jobs', 'rules'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('from_quantized', sa.String(length=16), nullable=False,
                                          server_default='original'))
            batch_op.add_column(sa.Column('keep_quantization', sa.Boolean(), nullable=False,
                                          server_default=sa.false()))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('base_quantization', sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('base_quantization')
    for table in ('rules', 'jobs'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('keep_quantization')
            batch_op.drop_column('from_quantized')
