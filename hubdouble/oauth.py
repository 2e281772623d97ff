"""A minimal "Sign in with Hugging Face" provider (service-anchors.md, "Step 0′").

* ``/.well-known/openid-configuration`` with issuer = the double's URL.
* ``/oauth/authorize`` logs in nobody interactively: it redirects at once to ``redirect_uri`` with ``code`` and
  ``state`` for the user named by ``hub.oauth_login_as`` (or ``error=access_denied`` when it is None).
* ``/oauth/token``: ``authorization_code`` and ``refresh_token`` grants; client authentication by HTTP Basic or
  form fields (public apps registered without a secret must use PKCE); PKCE S256/plain checked when the
  authorize request carried a ``code_challenge``. Access tokens are ``hf_oauth_…``, valid 8 h, and work as
  Bearer tokens on every API route; refresh tokens rotate on use.
* ``/oauth/userinfo`` returns ``sub``, ``name``, ``preferred_username``, ``orgs[]`` …
* With scope ``openid`` an RS256 ``id_token`` is issued (keys at ``/oauth/jwks``) when ``cryptography`` is
  importable, so OIDC clients such as Authlib can validate it; otherwise it is left out.

Scopes are recorded but only mapped coarsely: a token gets role "write" when the scope holds write-repos,
contribute-repos or manage-repos, else "read".
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass
from urllib.parse import unquote_plus, urlencode, urlsplit

from .server import Req, Resp, json_resp
from .storage import HubError

ACCESS_TTL = 28800
CODE_TTL = 600
WRITE_SCOPES = {"write-repos", "contribute-repos", "manage-repos"}


@dataclass
class OAuthApp:
    client_id: str
    client_secret: str | None
    redirect_uris: list
    scopes: str = "openid profile"


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class OAuth:
    def __init__(self, hub):
        self.hub = hub
        self.apps: dict[str, OAuthApp] = {}
        self._codes: dict[str, dict] = {}
        self._refresh: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._key = None
        self._kid = secrets.token_hex(8)

    def add_app(self, client_id, client_secret, redirect_uris, scopes="openid profile") -> OAuthApp:
        app = OAuthApp(client_id, client_secret, list(redirect_uris), scopes)
        self.apps[client_id] = app
        return app

    # ----- metadata ------------------------------------------------------------------------------------------
    def discovery(self, req: Req):
        u = self.hub.url
        return json_resp({
            "issuer": u, "authorization_endpoint": f"{u}/oauth/authorize", "token_endpoint": f"{u}/oauth/token",
            "userinfo_endpoint": f"{u}/oauth/userinfo", "jwks_uri": f"{u}/oauth/jwks",
            "response_types_supported": ["code"], "grant_types_supported": ["authorization_code", "refresh_token"],
            "subject_types_supported": ["public"], "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256", "plain"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "scopes_supported": ["openid", "profile", "email", "read-repos", "write-repos", "contribute-repos",
                                 "manage-repos", "gated-repos", "read-billing", "inference-api", "webhooks"],
            "claims_supported": ["sub", "name", "preferred_username", "profile", "picture", "email", "orgs"],
        })

    def jwks(self, req: Req):
        key = self._signing_key()
        if key is None:
            return json_resp({"keys": []})
        nums = key.public_key().public_numbers()
        n = nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")
        e = nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")
        return json_resp({"keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self._kid,
                                    "n": _b64u(n), "e": _b64u(e)}]})

    # ----- authorize -----------------------------------------------------------------------------------------
    def authorize(self, req: Req):
        app = self.apps.get(req.q("client_id") or "")
        redirect_uri = req.q("redirect_uri") or (app.redirect_uris[0] if app and app.redirect_uris else "")
        if app is None or not self._redirect_ok(app, redirect_uri):
            raise HubError(400, "Invalid client_id or redirect_uri")  # never redirect to an unknown URI
        params = {"state": req.q("state")} if req.q("state") is not None else {}
        user = self.hub.oauth_login_as
        if req.q("response_type", "code") != "code":
            params["error"] = "unsupported_response_type"
        elif not user or user not in self.hub.accounts.accounts:
            params["error"] = "access_denied"
        else:
            code = secrets.token_urlsafe(24)
            with self._lock:
                self._codes[code] = {
                    "client_id": app.client_id, "redirect_uri": req.q("redirect_uri"), "user": user,
                    "scope": req.q("scope") or app.scopes, "challenge": req.q("code_challenge"),
                    "method": req.q("code_challenge_method") or "plain", "nonce": req.q("nonce"),
                    "expires": time.time() + CODE_TTL,
                }
            params = {"code": code, **params}
        sep = "&" if "?" in redirect_uri else "?"
        return Resp(302, [("Location", f"{redirect_uri}{sep}{urlencode(params)}"), ("Cache-Control", "no-store")])

    @staticmethod
    def _redirect_ok(app: OAuthApp, uri: str) -> bool:
        if uri in app.redirect_uris:
            return True
        # RFC 8252: for http loopback redirect URIs only the port may vary
        u = urlsplit(uri)
        return u.scheme == "http" and u.hostname in ("127.0.0.1", "localhost", "::1") and any(
            (r.scheme, r.hostname, r.path) == (u.scheme, u.hostname, u.path) for r in map(urlsplit, app.redirect_uris)
        )

    # ----- token ---------------------------------------------------------------------------------------------
    def token(self, req: Req):
        form = {k: v[0] for k, v in req.form().items()}
        app = self._client(req, form)
        if app is None:
            return _oauth_error("invalid_client", "Unknown client or wrong client secret", 401)
        grant = form.get("grant_type")
        with self._lock:
            if grant == "authorization_code":
                g = self._codes.pop(form.get("code") or "", None)
                if g is None or g["expires"] < time.time() or g["client_id"] != app.client_id:
                    return _oauth_error("invalid_grant", "Invalid or expired authorization code")
                if g["redirect_uri"] is not None and form.get("redirect_uri") != g["redirect_uri"]:
                    return _oauth_error("invalid_grant", "redirect_uri does not match the authorize request")
                if not _pkce_ok(g["challenge"], g["method"], form.get("code_verifier")):
                    return _oauth_error("invalid_grant", "PKCE verification failed")
                if app.client_secret is None and not g["challenge"]:
                    return _oauth_error("invalid_request", "Public clients must use PKCE")
            elif grant == "refresh_token":
                g = self._refresh.pop(form.get("refresh_token") or "", None)
                if g is None or g["client_id"] != app.client_id:
                    return _oauth_error("invalid_grant", "Invalid refresh token")
            else:
                return _oauth_error("unsupported_grant_type", f"Unsupported grant_type {grant!r}")
            access = "hf_oauth_" + secrets.token_urlsafe(32)
            refresh = "hf_oauth_refresh_" + secrets.token_urlsafe(32)
            self._refresh[refresh] = {"client_id": app.client_id, "user": g["user"], "scope": g["scope"]}
        role = "write" if WRITE_SCOPES & set(g["scope"].split()) else "read"
        self.hub.accounts.add_token(g["user"], access, role=role, kind="oauth", expires_in=ACCESS_TTL,
                                    scope=g["scope"])
        out = {"access_token": access, "token_type": "Bearer", "expires_in": ACCESS_TTL, "scope": g["scope"],
               "refresh_token": refresh}
        if "openid" in g["scope"].split():
            id_token = self._id_token(g, app.client_id, access)
            if id_token:
                out["id_token"] = id_token
        return json_resp(out, headers=[("Cache-Control", "no-store")])

    def _client(self, req: Req, form: dict) -> OAuthApp | None:
        cid, secret = form.get("client_id"), form.get("client_secret")
        auth = req.header("Authorization") or ""
        if auth.lower().startswith("basic "):
            try:
                cid, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                return None
            cid, secret = unquote_plus(cid), unquote_plus(secret)  # RFC 6749 2.3.1: form-encoded then Basic
        app = self.apps.get(cid or "")
        if app is None or (app.client_secret is not None and not secrets.compare_digest(
                (secret or "").encode(), app.client_secret.encode())):
            return None
        return app

    def _signing_key(self):
        if self._key is None:
            try:
                from cryptography.hazmat.primitives.asymmetric import rsa
            except ImportError:  # pragma: no cover
                return None
            self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self._key

    def _id_token(self, g: dict, client_id: str, access: str) -> str | None:
        key = self._signing_key()
        if key is None:
            return None
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        user = self.hub.accounts.accounts[g["user"]]
        now = int(time.time())
        claims = {"iss": self.hub.url, "sub": user.uid, "aud": client_id, "iat": now, "auth_time": now,
                  "exp": now + ACCESS_TTL, "name": user.fullname, "preferred_username": user.name,
                  "profile": f"{self.hub.url}/{user.name}", "picture": "",
                  "at_hash": _b64u(hashlib.sha256(access.encode()).digest()[:16])}
        if g.get("nonce"):
            claims["nonce"] = g["nonce"]
        header = {"alg": "RS256", "typ": "JWT", "kid": self._kid}
        signing_input = f"{_b64u(json.dumps(header).encode())}.{_b64u(json.dumps(claims).encode())}"
        sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64u(sig)}"

    # ----- userinfo ------------------------------------------------------------------------------------------
    def userinfo(self, req: Req):
        if req.user is None:
            raise HubError(401, "invalid_token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        u, scope = req.user, req.token.scope.split()
        orgs = [{"sub": self.hub._namespace_id(o), "name": o, "preferred_username": o, "picture": "",
                 "isEnterprise": False, "canPay": False, "roleInOrg": role} for o, role in sorted(u.orgs.items())]
        out = {"sub": u.uid, "name": u.fullname, "preferred_username": u.name, "profile": f"{self.hub.url}/{u.name}",
               "picture": "", "website": "", "isPro": False, "canPay": False, "orgs": orgs}
        if "email" in scope or req.token.kind != "oauth":
            out.update(email=u.email, email_verified=True)
        return json_resp(out)

    def routes(self):
        return [
            ("GET", r"^/\.well-known/openid-configuration$", self.discovery),
            ("GET", r"^/oauth/jwks$", self.jwks),
            ("GET", r"^/oauth/authorize$", self.authorize),
            ("POST", r"^/oauth/token$", self.token),
            ("GET POST", r"^/oauth/userinfo$", self.userinfo),
        ]


def _pkce_ok(challenge: str | None, method: str, verifier: str | None) -> bool:
    if not challenge:
        return True
    if not verifier:
        return False
    if method == "S256":
        return secrets.compare_digest(_b64u(hashlib.sha256(verifier.encode()).digest()), challenge)
    return method == "plain" and secrets.compare_digest(verifier, challenge)


def _oauth_error(error: str, description: str, status: int = 400) -> Resp:
    return json_resp({"error": error, "error_description": description}, status,
                     headers=[("Cache-Control", "no-store")])
