"""Accountability: registry (agencies, users, offences, purposes), audit chain, case holds, dispositions.

Revision ID: 0001
Revises:
Create Date: 2026-01-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Purposes known from the start. Refused ones stay in the registry so a refusal can say why.
SEED_PURPOSES = [
    ("criminal-investigation", True, "a search for a lead in an open criminal investigation"),
    ("missing-person", True, "identifying a reported missing person"),
    ("victim-identification", True, "identifying a deceased or incapacitated victim"),
    ("general-identification", False, "identifying someone with no investigation open: not allowed"),
    ("non-member-request", False, "a search on behalf of an agency outside the consortium: not allowed"),
    ("live-scanning", False, "live or real-time video surveillance: not allowed"),
    ("crowd-scanning", False, "scanning crowds, protests or public gatherings: not allowed"),
]


def upgrade() -> None:
    op.create_table(
        "agencies",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="active"),
        sa.Column("member", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("daily_quota", sa.Integer, nullable=False, server_default="0"),
        sa.Column("secret", sa.Text, nullable=False),
        sa.Column("redis_password_sha256", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("agency_id", sa.String(128), nullable=False, index=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("cert_id", sa.Text, nullable=True),
        sa.Column("cert_expires", sa.Date, nullable=True),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "offences",
        sa.Column("code", sa.String(32), primary_key=True),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
    )
    purposes = op.create_table(
        "purposes",
        sa.Column("code", sa.String(64), primary_key=True),
        sa.Column("allowed", sa.Boolean, nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
    )
    meta = op.create_table(
        "registry_meta",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("ts", sa.String(32), nullable=False, index=True),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("agency", sa.Text, nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("case_number", sa.Text, nullable=False),
        sa.Column("offence_code", sa.Text, nullable=False),
        sa.Column("purpose", sa.Text, nullable=False),
        sa.Column("probe_sha256", sa.Text, nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("details", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_log_request_id", "audit_log", ["request_id"])
    op.create_index("ix_audit_log_probe_sha256", "audit_log", ["probe_sha256"])
    op.create_index("ix_audit_log_agency_action", "audit_log", ["agency", "action"])
    op.create_table(
        "case_holds",
        sa.Column("agency_id", sa.String(128), primary_key=True),
        sa.Column("case_number", sa.String(64), primary_key=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("held_by", sa.Text, nullable=False),
        sa.Column("held_at", sa.String(32), nullable=False),
    )
    op.create_table(
        "dispositions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(128), nullable=False, index=True),
        sa.Column("agency_id", sa.String(128), nullable=False),
        sa.Column("case_number", sa.Text, nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("candidate", sa.Text, nullable=False, server_default=""),
        sa.Column("note", sa.Text, nullable=False, server_default=""),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("recorded_at", sa.String(32), nullable=False),
        sa.Column("confirmed_by", sa.Text, nullable=False, server_default=""),
        sa.Column("confirmed_at", sa.String(32), nullable=False, server_default=""),
    )
    op.bulk_insert(purposes, [{"code": c, "allowed": a, "description": d} for c, a, d in SEED_PURPOSES])
    op.bulk_insert(meta, [{"id": 1, "version": 1}])


def downgrade() -> None:
    for name in ("dispositions", "case_holds", "audit_log", "registry_meta", "purposes", "offences", "users",
                 "agencies"):
        op.drop_table(name)
