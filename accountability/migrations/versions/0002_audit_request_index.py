"""Index audit records by request id: a result is audited before it is published, once per request.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_audit_log_request_action", "audit_log", ["request_id", "action"])


def downgrade() -> None:
    op.drop_index("ix_audit_log_request_action", table_name="audit_log")
