"""All configuration, read once from the environment at an entry point (never at import time).

Each setting has a default that works on a fresh machine (SQLite under ./var, an embedded broker) and a line of
help; README.md's environment table lists the same names (tests/test_docs.py keeps them in step).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path


def _setting(env: str, default, help: str, **kw):
    return field(default=default, metadata={"env": env, "help": help, **kw})


@dataclass(frozen=True)
class Settings:
    data_dir: str = _setting("LORAFOLD_DATA_DIR", "var", "Folder for the embedded defaults (SQLite files, secret key).")
    database_url: str = _setting("DATABASE_URL", "", "SQLAlchemy URL of the job database (default: SQLite file in the data dir).")
    broker_url: str = _setting("CELERY_BROKER_URL", "", "Celery broker (default: an embedded SQLite-backed broker, no server).")
    hf_endpoint: str = _setting("HF_ENDPOINT", "https://huggingface.co", "The Hugging Face Hub every request goes to; never taken from user input.")
    secret_key: str = _setting("LORAFOLD_SECRET_KEY", "", "Signs sessions and encrypts stored Hub tokens (default: generated once into the data dir).")
    port: int = _setting("PORT", 5000, "Port `make run` / `lorafold serve` listens on.")
    host: str = _setting("LORAFOLD_HOST", "127.0.0.1", "Address `lorafold serve` binds.")
    public_url: str = _setting("LORAFOLD_PUBLIC_URL", "", "External base URL, used in webhook URLs (default http://HOST:PORT).")
    work_dir: str = _setting("LORAFOLD_WORK_DIR", "", "Temporary folder for shards being uploaded (default: the system temp dir).")
    hub_timeout: int = _setting("LORAFOLD_HUB_TIMEOUT", 30, "Seconds without an answer before a Hub read is retried (5 tries).")
    device: str = _setting("LORAFOLD_DEVICE", "auto", "Merge device for workers: auto, cpu or cuda.")
    oauth_client_id: str = _setting("OAUTH_CLIENT_ID", "", "Hugging Face OAuth app id; enables 'Sign in with Hugging Face'.")
    oauth_client_secret: str = _setting("OAUTH_CLIENT_SECRET", "", "Hugging Face OAuth app secret.", secret=True)
    oauth_scopes: str = _setting("OAUTH_SCOPES", "openid profile read-repos gated-repos contribute-repos", "OAuth scopes asked for.")
    max_adapter_bytes: int = _setting("LORAFOLD_MAX_ADAPTER_BYTES", 8 * 10**9, "Refuse adapters larger than this (before downloading).")
    max_base_bytes: int = _setting("LORAFOLD_MAX_BASE_BYTES", 2 * 10**12, "Refuse bases larger than this (before reading).")
    job_time_limit: int = _setting("LORAFOLD_JOB_TIME_LIMIT", 6 * 3600, "Hard time limit of one merge, seconds (the soft limit is 60 s earlier).")
    stuck_after: int = _setting("LORAFOLD_STUCK_AFTER", 900, "A running job with no progress for this many seconds is failed or retried.")
    requeue_after: int = _setting("LORAFOLD_REQUEUE_AFTER", 600, "A job still queued after this many seconds is sent to the broker again (lost messages).")
    reconcile_every: int = _setting("LORAFOLD_RECONCILE_EVERY", 30, "Seconds between the worker's checks for dead, stuck or lost jobs.")
    max_attempts: int = _setting("LORAFOLD_MAX_ATTEMPTS", 3, "Deliveries of one job before it is failed for good.")
    rate_limit: str = _setting("LORAFOLD_RATE_LIMIT", "120/minute", "Requests per caller on the JSON API and forms.")
    rate_limit_storage: str = _setting("LORAFOLD_RATE_LIMIT_STORAGE", "memory://", "Where rate-limit counters live (redis://... in production).")
    secure_cookies: str = _setting("LORAFOLD_SECURE_COOKIES", "auto", "Mark cookies Secure: auto (when PUBLIC_URL is https), 1 or 0.")
    max_queued_per_owner: int = _setting("LORAFOLD_MAX_QUEUED_PER_OWNER", 10, "Jobs one user may have waiting at once; more are refused (429) until some start.")
    max_running_per_owner: int = _setting("LORAFOLD_MAX_RUNNING_PER_OWNER", 2, "Jobs of one user that run at once; the rest wait while other users' jobs start first.")
    hook_rate_limit: str = _setting("LORAFOLD_HOOK_RATE_LIMIT", "30/minute", "Webhook deliveries per rule (wrong secrets count per address instead).")
    public_rate_limit: str = _setting("LORAFOLD_PUBLIC_RATE_LIMIT", "120/minute", "Requests per address on the endpoints without sign-in (/healthz, failed webhook calls).")
    whoami_ttl: int = _setting("LORAFOLD_WHOAMI_TTL", 60, "Seconds a Hub whoami answer is cached (keyed by a hash of the token).")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = int(raw) if isinstance(f.default, int) else raw
        values.update(overrides)
        return cls(**values).resolved()

    def resolved(self) -> Settings:
        """Fill the defaults that depend on other settings (paths under data_dir, generated secret key)."""
        data = Path(self.data_dir).expanduser()
        changes: dict[str, object] = {}
        if not self.database_url:
            changes["database_url"] = f"sqlite:///{(data / 'lorafold.db').resolve()}"
        if not self.broker_url:
            changes["broker_url"] = f"sqla+sqlite:///{(data / 'broker.db').resolve()}"
        if not self.public_url:
            changes["public_url"] = f"http://{self.host}:{self.port}"
        if not self.secret_key:
            changes["secret_key"] = _dev_secret(data)
        if not changes:
            return self
        from dataclasses import replace

        return replace(self, **changes)

    @property
    def cookies_secure(self) -> bool:
        if self.secure_cookies == "auto":
            return self.public_url.startswith("https://")
        return self.secure_cookies.lower() in ("1", "true", "yes")

    @classmethod
    def documented(cls) -> list[tuple[str, str, str]]:
        """(variable, default, help) for every setting: the README table."""
        return [(f.metadata["env"], str(f.default), f.metadata["help"]) for f in fields(cls)]


def _dev_secret(data: Path) -> str:
    """A per-installation random key kept in the data dir, so sessions and stored tokens survive restarts."""
    path = data / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        data.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(48)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process won the race
            return path.read_text().strip()
        with os.fdopen(fd, "w") as f:
            f.write(key)
        return key
