"""jobs.recipe, jobs.recipe_seed: a job may run a merge recipe (normalised YAML, worker/jobs/recipe.py) instead of
folding one adapter, with DARE's seed; rules.recipe: a rule may rerun a recipe when one of its adapters gets a
commit (issue 13)

Revision ID: 0006_job_recipe
Revises: 0005_quant_options
"""
from alembic import op
import sqlalchemy as sa


revision = '0006_job_recipe'
down_revision = '0005_quant_options'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('recipe', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('recipe_seed', sa.Integer(), nullable=True))
    with op.batch_alter_table('rules', schema=None) as batch_op:
        batch_op.add_column(sa.Column('recipe', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('rules', schema=None) as batch_op:
        batch_op.drop_column('recipe')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('recipe_seed')
        batch_op.drop_column('recipe')
