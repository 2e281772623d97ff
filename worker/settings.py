"""All configuration, read once from the environment at an entry point (never at import time).

Each setting has a default that works on a fresh machine (SQLite under ./var, an embedded broker) and a line of
help; README.md's environment table lists the same names (tests/test_docs.py keeps them in step).

The data dir holds the generated secret key (it decrypts every stored Hub token) and the SQLite files (which hold
them encrypted): lorafold makes it 0700 and those files 0600, whatever the umask, and writes the key atomically
(a process that starts while another writes it must never read half a key, or an empty one, and keep it).
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

#: The shortest LORAFOLD_SECRET_KEY accepted: 32 characters of `secrets.token_urlsafe` are 192 bits, and a short,
#: typed key (a word, a date) could be guessed offline from one signed session cookie.
MIN_SECRET_KEY_CHARS = 32
_KEY_ADVICE = "python3 -c 'import secrets; print(secrets.token_urlsafe(48))'"


class SettingsError(ValueError):
    """A setting lorafold cannot start with; `user_message` is the one line shown (worker.errors.describe)."""

    @property
    def user_message(self) -> str:
        return str(self)


def _setting(env: str, default, help: str, **kw):
    return field(default=default, metadata={"env": env, "help": help, **kw})


@dataclass(frozen=True)
class Settings:
    data_dir: str = _setting("LORAFOLD_DATA_DIR", "var", "Folder for the embedded defaults (SQLite files, secret key); made 0700, its files 0600.")
    database_url: str = _setting("DATABASE_URL", "", "SQLAlchemy URL of the job database (default: SQLite file in the data dir).")
    broker_url: str = _setting("CELERY_BROKER_URL", "", "Celery broker (default: an embedded SQLite-backed broker, no server).")
    hf_endpoint: str = _setting("HF_ENDPOINT", "https://huggingface.co", "The Hugging Face Hub every request goes to; never taken from user input.")
    secret_key: str = _setting("LORAFOLD_SECRET_KEY", "", "Signs sessions and encrypts stored Hub tokens; at least 32 random characters (default: generated once into the data dir).")
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
    proxy_hops: int = _setting("LORAFOLD_PROXY_HOPS", 0, "Reverse proxies in front of gunicorn whose X-Forwarded-For/-Proto are trusted (deploy/gunicorn.conf.py; compose: 1).")
    max_queued_per_owner: int = _setting("LORAFOLD_MAX_QUEUED_PER_OWNER", 10, "Jobs one user may have waiting at once; more are refused (429) until some start.")
    max_running_per_owner: int = _setting("LORAFOLD_MAX_RUNNING_PER_OWNER", 2, "Jobs of one user that run at once; the rest wait while other users' jobs start first.")
    hook_rate_limit: str = _setting("LORAFOLD_HOOK_RATE_LIMIT", "30/minute", "Webhook deliveries per rule (wrong secrets count per address instead).")
    public_rate_limit: str = _setting("LORAFOLD_PUBLIC_RATE_LIMIT", "120/minute", "Requests per address on the endpoints without sign-in (/healthz, failed webhook calls).")
    whoami_ttl: int = _setting("LORAFOLD_WHOAMI_TTL", 60, "Seconds a Hub whoami answer is cached (keyed by a hash of the token).")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, resolve: bool = True, **overrides) -> Settings:
        """The settings of this process. `resolve=False` leaves the data-dir defaults (database, broker, secret
        key) unset and touches no disk: for a command that needs none of them (`lorafold merge`)."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            name = f.metadata["env"]
            raw = environ.get(name)
            if raw is None or raw == "":
                continue
            if isinstance(f.default, int):
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise SettingsError(f"{name} must be a whole number, got {raw[:40]!r}") from None
            else:
                values[f.name] = raw
        values.update(overrides)
        settings = cls(**values)
        if not 0 < settings.port < 65536:
            raise SettingsError(f"PORT (or --port) must be between 1 and 65535, got {settings.port}")
        return settings.resolved() if resolve else settings

    def resolved(self) -> Settings:
        """Fill the defaults that depend on other settings (paths under data_dir, generated secret key); the data
        dir and the SQLite files lorafold puts there are made private to this user."""
        data = Path(self.data_dir).expanduser()
        changes: dict[str, object] = {}
        if self.secret_key:
            check_secret_key(self.secret_key, "LORAFOLD_SECRET_KEY")
        in_data_dir = [name for name, value in (("lorafold.db", self.database_url), ("broker.db", self.broker_url),
                                                ("secret_key", self.secret_key)) if not value]
        if in_data_dir:
            private_dir(data)
        if not self.database_url:
            changes["database_url"] = f"sqlite:///{private_file(data / 'lorafold.db').resolve()}"
        if not self.broker_url:
            changes["broker_url"] = f"sqla+sqlite:///{private_file(data / 'broker.db').resolve()}"
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


def check_secret_key(key: str, where: str) -> str:
    if len(key) < MIN_SECRET_KEY_CHARS:
        raise SettingsError(
            f"{where} is {len(key)} characters long; it must have at least {MIN_SECRET_KEY_CHARS} random characters "
            f"(make one with {_KEY_ADVICE})"
        )
    return key


def _owned_by_me(st: os.stat_result) -> bool:
    return not hasattr(os, "getuid") or st.st_uid == os.getuid()


def private_dir(path: Path) -> Path:
    """`path` as a folder only this user can enter: created 0700; an existing one that already holds lorafold's
    files (an older install's `var/`) is tightened to 0700. Any other existing folder is left as it is (the files
    lorafold puts there are 0600 anyway), so pointing LORAFOLD_DATA_DIR at a shared folder never chmods it."""
    try:
        path.mkdir(mode=0o700, parents=True)
        return path
    except FileExistsError:
        pass
    st = path.stat()
    ours = any((path / name).exists() for name in ("secret_key", "lorafold.db", "broker.db"))
    if ours and _owned_by_me(st) and stat.S_IMODE(st.st_mode) & 0o077:
        path.chmod(0o700)
    return path


def private_file(path: Path) -> Path:
    """An SQLite file lorafold keeps in the data dir, created (empty: a valid empty database) or tightened to 0600
    before SQLite opens it; SQLite gives its -journal/-wal/-shm files the database file's permissions."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)  # never truncates; works on a read-only file too
    try:
        st = os.fstat(fd)
        if _owned_by_me(st) and stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-journal", "-wal", "-shm"):
        _tighten(path.with_name(path.name + suffix))
    return path


def _tighten(path: Path) -> None:
    """An existing file of ours that others can read becomes 0600 (an older install's, or a copied one)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if _owned_by_me(st) and stat.S_IMODE(st.st_mode) & 0o077:
        path.chmod(0o600)


def _dev_secret(data: Path) -> str:
    """A per-installation random key kept in the data dir, so sessions and stored tokens survive restarts.

    Written atomically: the key goes into a private temporary file, is flushed to disk, and is then hard-linked to
    its name, which either appears complete or fails because another process won the race (then its key is
    used). A plain create-then-write let a second process read an empty key in between (and keep using it)."""
    path = data / "secret_key"
    data.mkdir(mode=0o700, parents=True, exist_ok=True)  # resolved() made it private before any file was added
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        pass
    else:
        _tighten(path)
        return check_secret_key(key, f"{path} (remove it to generate a new key; tokens stored with the old one can "
                                "no longer be decrypted)")
    key = secrets.token_urlsafe(48)
    tmp = data / f".secret_key.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process won the race: its key, complete (it was linked only when written)
            key = path.read_text().strip()
        except OSError:  # a file system without hard links: create-if-absent by rename's check, slightly racy
            if path.exists():
                key = path.read_text().strip()
            else:
                os.replace(tmp, path)
        _fsync_dir(data)
    finally:
        tmp.unlink(missing_ok=True)
    return check_secret_key(key, str(path))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
