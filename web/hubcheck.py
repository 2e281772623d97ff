"""Checks a door makes against the Hub before it queues a merge: who the caller is, may they write there, is the
adapter readable and really a LoRA adapter, is the base readable.

The form and the JSON API call the same functions, so a request is refused for the same reason, with the same
words, whichever door it came through. Errors carry the form/API field they are about, which is why this lives in
web/ (it moved here from worker/hub: only the doors use it); the Hub client stays in worker/hub, and this module
does not import huggingface_hub. Nothing here downloads weights: the adapter's `adapter_config.json` is read with
one ranged GET at the resolved commit, everything else is repo metadata (the shape check in preflight.py reads
safetensors headers the same way). The config is read and checked by the engine's own torch-free reader
(worker/engine/adapter_config.py), as the CLI and the worker read it; importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from worker.engine.adapter_config import load_spec
from worker.engine.errors import EngineError, SourceError
from worker.engine.spec import AdapterSpec
from worker.hub import HubClient, RevisionMissing
from worker.locations import check_revision, is_repo_id

WRITE_ROLES = frozenset({"admin", "write", "contributor"})


class InspectError(Exception):
    """A request that cannot be queued, with the form/API field it is about and a one-line reason."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message

    def __reduce__(self):
        return (type(self), (self.field, self.message))


@dataclass(frozen=True)
class Identity:
    """Who a Hub token belongs to, as the Hub's whoami says: the user's stable id and name, their orgs (ids, names,
    roles), the token's role and kind.

    `id` (and `org_ids`) are the Hub's stable object ids: names can change (renames) and a newcomer can take a
    freed name, so access to stored rules, jobs and tokens is decided on ids; names are for display and for the
    Hub's own URLs only.
    """

    name: str
    id: str = ""
    orgs: Mapping[str, str] = field(default_factory=dict)  # org name -> roleInOrg (admin/write/contributor/read)
    org_ids: Mapping[str, str] = field(default_factory=dict)  # org name -> the org's stable id
    token_role: str | None = None  # read | write | fineGrained (None when the Hub did not say)
    scoped: Mapping[str, frozenset[str]] = field(default_factory=dict)  # fine-grained: entity -> permissions
    token_kind: str | None = None  # "access_token" (a personal token) | "oauth" (expires, see web/rules.py)
    token_expires_at: str | None = None  # ISO time, when the Hub says the token expires

    @classmethod
    def from_whoami(cls, info: Mapping) -> Identity:
        name = info.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("whoami answer without a user name")
        uid = info.get("id")
        if not isinstance(uid, str) or not uid:
            raise ValueError("whoami answer without the user's id")  # never fall back to the name (renames)
        orgs, org_ids = {}, {}
        for org in info.get("orgs") or []:
            if isinstance(org, Mapping) and isinstance(org.get("name"), str) and isinstance(org.get("id"), str):
                orgs[org["name"]] = str(org.get("roleInOrg") or "read")
                org_ids[org["name"]] = org["id"]
        auth = info.get("auth") if isinstance(info.get("auth"), Mapping) else {}
        access = auth.get("accessToken") or {}
        role = access.get("role") if isinstance(access, Mapping) else None
        scoped: dict[str, frozenset[str]] = {}
        fine = access.get("fineGrained") if isinstance(access, Mapping) else None
        if isinstance(fine, Mapping):
            for item in fine.get("scoped") or []:
                entity = (item or {}).get("entity") or {}
                if isinstance(entity.get("name"), str):
                    scoped[entity["name"]] = frozenset(p for p in item.get("permissions") or [] if isinstance(p, str))
        kind = auth.get("type")
        expires = auth.get("expiresAt") or (access.get("expiresAt") if isinstance(access, Mapping) else None)
        return cls(name=name, id=uid, orgs=orgs, org_ids=org_ids, token_role=role if isinstance(role, str) else None,
                   scoped=scoped, token_kind=kind if isinstance(kind, str) else None,
                   token_expires_at=expires if isinstance(expires, str) else None)

    @property
    def namespaces(self) -> frozenset[str]:
        """Every namespace whose jobs this caller may see: their own and their orgs'."""
        return frozenset({self.name, *self.orgs})

    @property
    def namespace_ids(self) -> frozenset[str]:
        """The stable ids of the same namespaces (what access checks compare)."""
        return frozenset({i for i in (self.id, *self.org_ids.values()) if i})

    def namespace_id(self, namespace: str) -> str | None:
        """The stable id of `namespace` when it is this user or one of their orgs, else None."""
        if namespace == self.name:
            return self.id or None
        return self.org_ids.get(namespace)


@dataclass(frozen=True)
class AdapterInfo:
    sha: str  # the commit the revision resolved to
    spec: AdapterSpec
    base: str | None  # the config's base_model_name_or_path when it is a Hub repo id (else None: a local path)
    private: bool = False
    base_revision: str | None = None  # a revision pinned in the config (`owner/name@rev`)


@dataclass(frozen=True)
class RepoInfo:
    sha: str
    files: tuple[str, ...]
    private: bool
    gated: bool = False


def can_write(caller: Identity, namespace: str) -> bool:
    """Whether `caller` may create a repo in `namespace`: their own, or an org where they are admin/write/contributor,
    with a token that may write (create_repo on the Hub stays the final arbiter)."""
    if caller.token_role == "read":
        return False
    if namespace == caller.name:
        member = True
    else:
        member = caller.orgs.get(namespace) in WRITE_ROLES
    if not member:
        return False
    if caller.token_role == "fineGrained" and caller.scoped:
        return "repo.write" in caller.scoped.get(namespace, frozenset())
    return True


def check_repo_id(text: object, field: str, what: str) -> str:
    if not isinstance(text, str) or not is_repo_id(text):
        raise InspectError(field, f"{what}: {str(text)[:100]!r} is not a Hub repo id (owner/name)")
    return text


def check_rev(revision: object, field: str, what: str) -> str | None:
    if revision is None or revision == "":
        return None
    try:
        return check_revision(str(revision), what)
    except SourceError as exc:
        raise InspectError(field, str(exc)) from None


def inspect_repo(client: HubClient, repo: str, revision: str | None = None, *, field: str = "base",
                 revision_field: str | None = None) -> RepoInfo:
    """The repo exists and this token can read it (at `revision`); its resolved sha and file names."""
    try:
        meta = client.repo_meta(repo, revision)
    except SourceError as exc:
        where = revision_field if revision_field and isinstance(exc, RevisionMissing) else field
        raise InspectError(where, str(exc)) from None
    return RepoInfo(sha=meta.sha, files=meta.files, private=meta.private, gated=meta.gated)


def inspect_adapter(client: HubClient, repo: str, revision: str | None = None, *, field: str = "adapter",
                    revision_field: str = "adapter_revision", max_bytes: int | None = None) -> AdapterInfo:
    """The adapter is readable with this token and really a LoRA adapter lorafold can merge.

    Pins `revision` to its commit (a missing revision is an error on `revision_field`), reads only
    `adapter_config.json` there with the engine's `load_spec` (a missing file, a non-LORA peft_type or an
    unmergeable variant is an InspectError on `field`, in the engine's words). Adapters over `max_bytes` are
    refused before any download.
    """
    pinned = inspect_repo(client, repo, revision, field=field, revision_field=revision_field)
    try:
        source = client.source(repo, pinned.sha or revision, max_total_bytes=max_bytes)
    except EngineError as exc:
        raise InspectError(field, str(exc)) from None
    try:
        spec, _ = load_spec(source)
    except EngineError as exc:  # AdapterSpecError (not an adapter, not LoRA, unmergeable), SourceError (read failed)
        raise InspectError(field, str(exc)) from None
    finally:
        source.close()
    base = spec.base_model_name_or_path
    base, _, at = (base or "").partition("@")
    return AdapterInfo(sha=source.revision, spec=spec, base=base if is_repo_id(base) else None,
                       private=pinned.private, base_revision=at or None)
