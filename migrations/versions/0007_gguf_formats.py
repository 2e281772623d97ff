"""jobs.formats, jobs.gguf_outtype, rules.formats, rules.gguf_outtype: a merge may be written as safetensors, as
GGUF for llama.cpp, or both in one commit, GGUF in F16, BF16 or Q8_0 (issue 14); old rows read as safetensors only;
jobs.gguf_files: the GGUF files a job published (name, type, size), for the job page

Revision ID: 0007_gguf_formats
Revises: 0006_job_recipe
"""
from alembic import op
import sqlalchemy as sa


revision = '0007_gguf_formats'
down_revision = '0006_job_recipe'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('jobs', 'rules'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('formats', sa.String(length=32), nullable=False,
                                          server_default='safetensors'))
            batch_op.add_column(sa.Column('gguf_outtype', sa.String(length=8), nullable=False, server_default='f16'))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('gguf_files', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('gguf_files')
    for table in ('rules', 'jobs'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('gguf_outtype')
            batch_op.drop_column('formats')
