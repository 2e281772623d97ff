"""Users, organisations, tokens and the Hub's permission rules, as the double applies them.

Rules (brief + hub-test-server.md "Client behaviour" item 6):
* ``Authorization: Bearer <token>`` names a user; an unknown or missing token is anonymous.
* Public repos are readable by anyone. Private repos only by the owner or members of the owning org; others
  get 404 ``RepoNotFound`` (401 when anonymous), exactly like a repo that does not exist.
* Gated repos: metadata is public, file contents (resolve) need a grant (``HubDouble.grant_gated``), else 403
  ``GatedRepo`` (401 anonymous). Owners and org members always have access.
* Writes: own namespace, or an org where the role is admin/write/contributor, and a token with role "write".
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from .storage import HubError, Repo, iso, new_object_id

WRITE_ROLES = ("admin", "write", "contributor")
ROLES = ("admin", "write", "contributor", "read")


@dataclass
class Account:
    name: str
    uid: str = field(default_factory=new_object_id)
    is_org: bool = False
    fullname: str = ""
    email: str = ""
    orgs: dict = field(default_factory=dict)  # org name -> role (users only)


@dataclass
class Token:
    value: str
    user: str
    role: str = "write"  # "read" | "write"
    kind: str = "access_token"  # "access_token" | "oauth"
    expires_at: float | None = None
    scope: str = ""
    display_name: str = ""
    created: float = field(default_factory=time.time)

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and time.time() > self.expires_at


class Accounts:
    def __init__(self):
        self.lock = threading.RLock()
        self.accounts: dict[str, Account] = {}
        self.tokens: dict[str, Token] = {}

    def add_user(self, name: str, token: str | None = None, orgs: dict | None = None, *, token_role="write",
                 fullname: str | None = None, email: str | None = None) -> Account:
        with self.lock:
            acct = self.accounts.get(name)
            if acct is None or acct.is_org:
                acct = Account(name, fullname=fullname or name.title(), email=email or f"{name}@example.test")
                self.accounts[name] = acct
            for org, role in (orgs or {}).items():
                if role not in ROLES:
                    raise ValueError(f"role must be one of {ROLES}, not {role!r}")
                self.add_org(org)
                acct.orgs[org] = role
            if token:
                self.add_token(name, token, role=token_role)
            return acct

    def add_org(self, name: str) -> Account:
        with self.lock:
            acct = self.accounts.get(name)
            if acct is None:
                acct = self.accounts[name] = Account(name, is_org=True, fullname=name)
            elif not acct.is_org:
                raise ValueError(f"{name} is a user, not an org")
            return acct

    def add_token(self, user: str, token: str, *, role="write", kind="access_token", expires_in=None,
                  scope="") -> Token:
        if role not in ("read", "write"):
            raise ValueError("token role is 'read' or 'write'")
        with self.lock:
            if user not in self.accounts:
                raise KeyError(f"unknown user {user}")
            t = Token(token, user, role, kind, time.time() + expires_in if expires_in else None, scope,
                      display_name=f"{kind}-{user}")
            self.tokens[token] = t
            return t

    def rename(self, old: str, new: str) -> Account:
        """A user or org renamed on the Hub: same stable id (`uid`), tokens and memberships, new name. The old name
        is free again (a newcomer may take it, with a new id)."""
        with self.lock:
            if new in self.accounts:
                raise ValueError(f"{new} is taken")
            acct = self.accounts.pop(old)
            acct.name = new
            self.accounts[new] = acct
            for tok in self.tokens.values():
                if tok.user == old:
                    tok.user = new
            if acct.is_org:
                for other in self.accounts.values():
                    if old in other.orgs:
                        other.orgs[new] = other.orgs.pop(old)
            return acct

    def revoke(self, token: str) -> None:
        self.tokens.pop(token, None)

    # ----- identification ------------------------------------------------------------------------------------
    def identify(self, authorization: str | None) -> tuple[Account | None, Token | None]:
        if not authorization or not authorization.lower().startswith("bearer "):
            return None, None
        tok = self.tokens.get(authorization[7:].strip())
        if tok is None or tok.expired:
            return None, None
        return self.accounts[tok.user], tok

    def role_in(self, user: Account | None, namespace: str) -> str | None:
        """'owner' for one's own namespace, the org role for a member, else None."""
        if user is None:
            return None
        if user.name == namespace:
            return "owner"
        return user.orgs.get(namespace)

    # ----- permissions ---------------------------------------------------------------------------------------
    def check_read(self, user: Account | None, repo: Repo | None, repo_label: str) -> Repo:
        """Raise the Hub's RepoNotFound for missing repos and for private repos the caller may not see."""
        if repo is None or (repo.private and self.role_in(user, repo.namespace) is None):
            status = 401 if user is None else 404
            raise HubError(status, f"Repository Not Found for url: {repo_label}.", "RepoNotFound")
        return repo

    def check_content(self, user: Account | None, repo: Repo) -> None:
        """Gated repos: downloading files needs a grant (or membership)."""
        if not repo.gated or self.role_in(user, repo.namespace) is not None:
            return
        if user is None or user.name not in repo.grants:
            msg = (f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                   "authenticated to access it. Please log in." if user is None else
                   f"Access to model {repo.repo_id} is restricted and you are not in the authorized list. "
                   f"Visit {repo.repo_id} to ask for access.")
            raise HubError(401 if user is None else 403, msg, "GatedRepo")

    def check_write_namespace(self, user: Account | None, token: Token | None, namespace: str, what: str) -> None:
        if user is None:
            raise HubError(401, "You must be authenticated to access this resource.")
        role = self.role_in(user, namespace)
        if role != "owner" and role not in WRITE_ROLES:
            raise HubError(403, f'You don\'t have the rights to {what} under the namespace "{namespace}"')
        if token is not None and token.role != "write":
            raise HubError(403, "This token does not have write access. Use a token with the 'write' role.")

    def check_write(self, user: Account | None, token: Token | None, repo: Repo | None, repo_label: str,
                    what: str = "write to this repo") -> Repo:
        repo = self.check_read(user, repo, repo_label)
        self.check_write_namespace(user, token, repo.namespace, what)
        return repo

    # ----- JSON views ----------------------------------------------------------------------------------------
    def whoami(self, user: Account, token: Token) -> dict:
        orgs = [
            {"type": "org", "id": self.accounts[o].uid, "name": o, "fullname": o, "roleInOrg": role,
             "isEnterprise": False, "canPay": False, "avatarUrl": "", "periodEnd": None}
            for o, role in sorted(user.orgs.items())
        ]
        access = {"displayName": token.display_name, "role": token.role, "createdAt": iso(token.created)}
        auth: dict = {"type": token.kind, "accessToken": access}
        if token.kind == "oauth":
            auth["expiresAt"] = iso(token.expires_at) if token.expires_at else None
            access["scope"] = token.scope
        return {
            "type": "user", "id": user.uid, "name": user.name, "fullname": user.fullname, "email": user.email,
            "emailVerified": True, "canPay": False, "isPro": False, "periodEnd": None, "avatarUrl": "",
            "orgs": orgs, "auth": auth,
        }
