"""one accepted correction per text (and so per document), enforced by a partial unique index

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

Corrections get the SHA-256 of their text; of the accepted corrections of one text only the latest
stays accepted (the others become superseded, as the service meant them to be), then a unique index
over the accepted ones makes a second accepted correction of the same text impossible, whatever
the concurrency.
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

ACCEPTED = sa.text("status = 'accepted'")


def upgrade() -> None:
    with op.batch_alter_table('annotations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('text_sha256', sa.String(length=64), nullable=True))
    op.execute("UPDATE annotations SET text_sha256 = (SELECT d.text_sha256 FROM documents d WHERE d.id = annotations.document_id)")
    # keep the latest accepted correction of each text
    op.execute(
        "UPDATE annotations SET status = 'superseded' WHERE status = 'accepted' AND id < "
        "(SELECT MAX(a.id) FROM annotations a WHERE a.status = 'accepted' AND a.text_sha256 = annotations.text_sha256)"
    )
    with op.batch_alter_table('annotations', schema=None) as batch_op:
        batch_op.alter_column('text_sha256', existing_type=sa.String(length=64), nullable=False)
        batch_op.create_index('uq_annotations_accepted_text', ['text_sha256'], unique=True, postgresql_where=ACCEPTED, sqlite_where=ACCEPTED)


def downgrade() -> None:
    with op.batch_alter_table('annotations', schema=None) as batch_op:
        batch_op.drop_index('uq_annotations_accepted_text', postgresql_where=ACCEPTED, sqlite_where=ACCEPTED)
        batch_op.drop_column('text_sha256')
