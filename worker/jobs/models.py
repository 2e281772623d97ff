"""The job record (SQLAlchemy 2 only). The job row is the truth about a merge, not the Celery result backend.

Tables: jobs (one merge request and everything that happened to it), job_logs (its log lines), job_samples (its
memory over time, for the chart), credentials (Hub tokens, encrypted, kept only while needed), rules (webhook
automation) and deliveries (every webhook call a rule received and what came of it).
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    skipped = "skipped"  # a webhook push that was not a LoRA adapter, or an older commit than one already merged

    @classmethod
    def terminal(cls) -> frozenset[str]:
        return frozenset({cls.succeeded.value, cls.failed.value, cls.cancelled.value, cls.skipped.value})


DOORS = ("form", "api", "webhook", "cli")


class Credential(Base):
    """A Hub token, Fernet-encrypted with a key derived from LORAFOLD_SECRET_KEY. Never shown again."""

    __tablename__ = "credentials"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(96), index=True)  # the Hub user name when stored (display only)
    owner_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # the Hub's stable user id
    purpose: Mapped[str] = mapped_column(String(16))  # job | rule | session
    token_encrypted: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(96), index=True)  # the Hub user who asked (name: display only)
    # The Hub's stable ids of the owner and of the target's namespace: access is decided on these, never on names,
    # because Hub users and orgs can be renamed and a newcomer can then take the old name. NULL only on rows
    # written before migration 0002.
    owner_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    namespace: Mapped[str] = mapped_column(String(96), index=True)  # the target's namespace (user or org)
    namespace_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    door: Mapped[str] = mapped_column(String(16))
    adapter_repo: Mapped[str] = mapped_column(String(200))
    adapter_revision: Mapped[str | None] = mapped_column(String(200), nullable=True)
    adapter_sha: Mapped[str | None] = mapped_column(String(64), nullable=True)
    base_repo: Mapped[str | None] = mapped_column(String(200), nullable=True)
    base_revision: Mapped[str | None] = mapped_column(String(200), nullable=True)
    base_sha: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # A rule's allow-list of bases (webhook jobs of a rule without one fixed base): the adapter config's base
    # must be one of these, and the job reads only that one. NULL: base_repo (or, for the form/API, the config).
    base_allowed: Mapped[list | None] = mapped_column(JSON, nullable=True)
    target_repo: Mapped[str] = mapped_column(String(200), index=True)
    private: Mapped[bool] = mapped_column(Boolean, default=False)
    dtype: Mapped[str] = mapped_column(String(16), default="auto")
    max_shard_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    overwrite: Mapped[bool] = mapped_column(Boolean, default=False)
    create_pr: Mapped[bool] = mapped_column(Boolean, default=False)
    # A merge recipe (worker/jobs/recipe.py: normalised YAML): the job runs it instead of folding `adapter_repo`,
    # which is then "" (or, for a rule's job, the pushed adapter: one of the recipe's inputs).
    recipe: Mapped[str | None] = mapped_column(Text, nullable=True)
    recipe_seed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # a bitsandbytes base: merge into its 16-bit original or its dequantized weights; an FP8 base: write FP8 back
    from_quantized: Mapped[str] = mapped_column(String(16), default="original", server_default="original")
    keep_quantization: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # the output formats, comma-joined ("safetensors", "gguf", "safetensors,gguf") and the GGUF type (issue 14)
    formats: Mapped[str] = mapped_column(String(32), default="safetensors", server_default="safetensors")
    gguf_outtype: Mapped[str] = mapped_column(String(8), default="f16", server_default="f16")
    # how the base was read, once the worker knows (one line for the job page: original / dequantized / kept FP8)
    base_quantization: Mapped[str | None] = mapped_column(String(500), nullable=True)

    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    phase: Mapped[str | None] = mapped_column(String(16), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    progress_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    tensors_done: Mapped[int] = mapped_column(Integer, default=0)
    tensors_total: Mapped[int] = mapped_column(Integer, default=0)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)

    peak_rss_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    peak_vram_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    bytes_read: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    bytes_written: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    timings: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # the GGUF files the job published, once it has: [{"name", "type", "size"}] (the job page; issue 14)
    gguf_files: Mapped[list | None] = mapped_column(JSON, nullable=True)
    queue_wait_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)  # enqueued → a worker took it
    startup_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)  # worker took it → first log line

    result_repo: Mapped[str | None] = mapped_column(String(200), nullable=True)
    result_commit: Mapped[str | None] = mapped_column(String(64), nullable=True)
    result_url: Mapped[str | None] = mapped_column(String(500), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    credential_id: Mapped[str | None] = mapped_column(ForeignKey("credentials.id", ondelete="SET NULL"), nullable=True)
    rule_id: Mapped[str | None] = mapped_column(ForeignKey("rules.id", ondelete="SET NULL"), nullable=True, index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    dedupe_key: Mapped[str | None] = mapped_column(String(300), nullable=True, unique=True)
    adapter_committed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    __table_args__ = (
        Index("uq_jobs_owner_idempotency_key", "owner", "idempotency_key", unique=True),
    )

    @property
    def is_terminal(self) -> bool:
        return self.status in JobStatus.terminal()


class JobLog(Base):
    __tablename__ = "job_logs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    level: Mapped[str] = mapped_column(String(8))
    message: Mapped[str] = mapped_column(Text)


class JobSample(Base):
    __tablename__ = "job_samples"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    t: Mapped[float] = mapped_column(Float)  # seconds since the attempt started
    rss_bytes: Mapped[int] = mapped_column(BigInteger)
    vram_bytes: Mapped[int] = mapped_column(BigInteger)


class Rule(Base):
    """Webhook automation: merge every new commit of watched adapter repos."""

    __tablename__ = "rules"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(96), index=True)  # display only; access goes by owner_id
    owner_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    watch: Mapped[str] = mapped_column(String(200))  # "owner/name" or "owner/<glob>"
    target: Mapped[str] = mapped_column(String(200))  # template, e.g. "{namespace}/{name}-merged"
    target_namespace_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The owner's choice of base: one fixed repo (+ revision), or an allow-list (`bases`). A pushed
    # adapter_config.json never picks a base the owner did not name (issue 10 §2).
    base: Mapped[str | None] = mapped_column(String(200), nullable=True)
    base_revision: Mapped[str | None] = mapped_column(String(200), nullable=True)
    bases: Mapped[list | None] = mapped_column(JSON, nullable=True)
    private: Mapped[bool] = mapped_column(Boolean, default=False)
    dtype: Mapped[str] = mapped_column(String(16), default="auto")
    # A recipe rule (issue 13): a push of one of this recipe's adapters reruns the recipe (normalised YAML,
    # worker/jobs/recipe.py) into `target`, a plain repo id; `watch` then lists those adapters (display only).
    recipe: Mapped[str | None] = mapped_column(Text, nullable=True)
    # the jobs' quantized-base options (a rule's job dequantizes a bitsandbytes base: it never looks for originals)
    from_quantized: Mapped[str] = mapped_column(String(16), default="original", server_default="original")
    keep_quantization: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # the jobs' output formats and GGUF type (comma-joined, as Job.formats)
    formats: Mapped[str] = mapped_column(String(32), default="safetensors", server_default="safetensors")
    gguf_outtype: Mapped[str] = mapped_column(String(8), default="f16", server_default="f16")
    secret_encrypted: Mapped[str] = mapped_column(Text)
    credential_id: Mapped[str | None] = mapped_column(ForeignKey("credentials.id", ondelete="SET NULL"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)


class Delivery(Base):
    """One webhook call received for a rule, and what it led to (run history)."""

    __tablename__ = "deliveries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rule_id: Mapped[str] = mapped_column(ForeignKey("rules.id", ondelete="CASCADE"), index=True)
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    repo: Mapped[str | None] = mapped_column(String(200), nullable=True)
    new_sha: Mapped[str | None] = mapped_column(String(64), nullable=True)
    old_sha: Mapped[str | None] = mapped_column(String(64), nullable=True)  # where the push moved main from
    outcome: Mapped[str] = mapped_column(String(16))  # queued | duplicate | ignored | refused (the owner's queue was full: 429)
    reason: Mapped[str | None] = mapped_column(String(300), nullable=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
