"""Encryption at rest for Hub tokens and webhook secrets (Fernet: AES-128-CBC + HMAC-SHA256).

The key is derived from LORAFOLD_SECRET_KEY with HKDF, with a distinct `info` per purpose, so the Flask session
signing key and the token encryption key are never the same bytes.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


class SecretBox:
    def __init__(self, secret_key: str, purpose: bytes = b"lorafold token encryption v1"):
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret_key.encode())
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def seal(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken:
            raise ValueError("stored secret cannot be decrypted (was LORAFOLD_SECRET_KEY changed?)") from None


def fingerprint(secret: str) -> str:
    """A stable, non-reversible name for a secret (cache keys): never the secret itself."""
    return hashlib.sha256(b"lorafold:" + secret.encode()).hexdigest()[:32]
