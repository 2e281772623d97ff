"""Web tests: the app built by `create_app` with a recording `enqueue` and a HubClient pointed at the Hub double.

The Hub double is shared by the whole session (users, tokens and a few seeded repos); tests that create repos use
names of their own. Databases: a SQLite file per test; API and webhook tests also run on a fresh PostgreSQL
database (skipped loudly when PostgreSQL is unreachable, unless LORAFOLD_REQUIRE_SERVICES is set).
"""

from __future__ import annotations

import pytest

from hubdouble import HubDouble
from web import create_app
from worker.hub import HubClient
from worker.jobs import Database
from worker.settings import Settings

from .helpers import PUBLIC_URL, SECRET_KEY
from .seeding import ALICE, BOB, CAROL, READER, write_adapter, write_model


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """alice (org acme: write, org lab: read), bob, carol (no orgs), reader (read-only token); a LoRA adapter
    alice/ad for alice/base, a plain model alice/base, a private adapter alice/secret-ad, a non-LoRA adapter."""
    double = HubDouble().start()
    double.add_user("alice", token=ALICE, orgs={"acme": "write", "lab": "read"})
    double.add_user("bob", token=BOB)
    double.add_user("carol", token=CAROL)
    double.add_user("reader", token=READER, token_role="read")
    root = tmp_path_factory.mktemp("seed")
    for repo, folder, private in (
        ("alice/base", write_model(root / "base"), False),
        ("alice/ad", write_adapter(root / "ad", base="alice/base"), False),
        ("alice/secret-ad", write_adapter(root / "secret", base="alice/base"), True),
        ("alice/ia3", write_adapter(root / "ia3", base="alice/base", peft_type="IA3"), False),
        ("alice/nobase-ad", write_adapter(root / "nobase", base="/home/alice/local-model"), False),
    ):
        double.create_repo(repo, private=private)
        double.upload_folder(repo, folder, message="seed")
    yield double
    double.stop()


@pytest.fixture
def recipe_repos(hub, tmp_path_factory):
    """For merge recipes: a second model of alice/base's shapes, one of other shapes and a private one (once)."""
    import numpy as np
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("recipe")
    for repo, shape, private in (("alice/recipe-ft", (8, 8), False), ("alice/recipe-wide", (16, 8), False),
                                 ("alice/recipe-secret", (8, 8), True)):
        if hub.has_repo(repo):
            continue
        folder = write_model(root / repo.split("/")[1])
        save_file({"model.layers.0.self_attn.q_proj.weight": np.ones(shape, dtype=np.float32)},
                  str(folder / "model.safetensors"))
        hub.create_repo(repo, private=private)
        hub.upload_folder(repo, folder, message="seed")


@pytest.fixture
def database_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'web.db'}"


@pytest.fixture
def db(database_url) -> Database:
    """SQLite: the models' tables; PostgreSQL: the Alembic migrations, as production builds it."""
    if database_url.startswith("sqlite"):
        database = Database(database_url)
        database.create_all()
        return database
    from worker import migrate

    migrate.upgrade(database_url)
    return Database(database_url)


@pytest.fixture
def settings_for(tmp_path, hub, database_url):
    def make(**overrides) -> Settings:
        values = dict(
            data_dir=str(tmp_path / "var"), database_url=database_url, broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
            secret_key=SECRET_KEY, hf_endpoint=hub.url, public_url=PUBLIC_URL, rate_limit="10000/minute",
            whoami_ttl=60, hook_rate_limit="10000/minute", public_rate_limit="10000/minute",
            max_queued_per_owner=1000,  # the caps and limits have tests of their own (test_api.py)
        )
        values.update(overrides)
        return Settings(**values).resolved()

    return make


@pytest.fixture
def enqueued() -> list[str]:
    return []


@pytest.fixture
def make_app(db, settings_for, enqueued, hub):
    def make(hub_url: str | None = None, **overrides):
        endpoint = hub_url or hub.url
        app = create_app(settings_for(**overrides), enqueue=enqueued.append,
                         hub_factory=lambda token: HubClient(endpoint, token))
        app.testing = True
        return app

    return make


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()
