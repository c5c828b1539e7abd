"""Signed join tokens (JWT): verification, identities, the deployment secret.

A token names who joins (``sub``), how others see them (``name``), the room, a role and
optionally an explicit grant list, and expires (``exp``); its claims, the roles and grants and
minting are in ``medverse.protocol.tokens`` (part of the wire contract; re-exported here).
HS256 with a deployment secret by default; EdDSA (Ed25519) or RS256 with a public key for
deployments whose identity provider signs the tokens. The server refuses, with a typed error,
anything missing, expired, forged or made for another room.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.tokens import (
    ADMIN_ROLE,
    ADMIN_ROOM,
    GRANTS,
    ROLE_GRANTS,
    mint_admin_token,
    mint_token,
)

ALGORITHMS_HS = ["HS256"]
SECRET_FILE = "auth_secret"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a member is, as the token says (or as an unauthenticated server assumes)."""

    subject: str
    name: str
    room: str
    role: str
    grants: frozenset[str]
    pseudonym: str | None = None
    #: Names the token this identity came from (its ``jti``, else a hash of it): a removal
    #: refuses that token for the rest of the session. Empty without a token.
    token_id: str = ""

    @property
    def hidden(self) -> bool:
        return "hidden" in self.grants

    def can(self, grant: str) -> bool:
        return grant in self.grants

    def require(self, grant: str) -> None:
        """Raise a ``forbidden`` error unless this identity holds ``grant``."""
        if grant not in self.grants:
            raise ProtocolError(ErrorCode.FORBIDDEN, f"role {self.role} may not {grant}")


def anonymous(name: str, room: str, subject: str) -> Identity:
    """The identity of a member on a server running without authentication."""
    return Identity(subject, name, room, "participant", ROLE_GRANTS["participant"])


class TokenVerifier:
    """Checks join tokens against a shared secret or an identity provider's public key."""

    def __init__(self, secret: bytes | None = None, public_key_pem: bytes | None = None) -> None:
        if (secret is None) == (public_key_pem is None):
            raise ValueError("give exactly one of a secret or a public key")
        if secret is not None:
            if len(secret) < 32:
                raise ValueError("the token secret must be at least 32 bytes")
            self._key: Any = secret
            self._algorithms = ALGORITHMS_HS
        else:
            assert public_key_pem is not None
            try:
                key = load_pem_public_key(public_key_pem)
            except (ValueError, TypeError):
                raise ValueError("auth_public_key: not a PEM public key") from None
            if isinstance(key, ed25519.Ed25519PublicKey):
                self._algorithms = ["EdDSA"]
            elif isinstance(key, rsa.RSAPublicKey):
                self._algorithms = ["RS256"]
            else:
                raise ValueError("auth_public_key: the key must be Ed25519 or RSA")
            self._key = key

    @property
    def shared_secret(self) -> bytes | None:
        """The HS256 secret, if tokens are checked with one (None with a public key)."""
        return self._key if isinstance(self._key, bytes) else None

    def _claims(self, token: str, kind: str) -> dict[str, Any]:
        """The verified claims of a signed, unexpired token; typed errors otherwise."""
        try:
            return jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                options={"require": ["exp", "sub", "room", "role"]},
                leeway=5,
            )
        except jwt.ExpiredSignatureError:
            raise ProtocolError(ErrorCode.TOKEN_EXPIRED, f"{kind} token expired") from None
        except jwt.InvalidTokenError as exc:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, f"invalid {kind} token: {exc}") from None

    def verify(self, token: str, room: str) -> Identity:
        """The identity a valid token grants for ``room``; a typed ProtocolError otherwise."""
        claims = self._claims(token, "join")
        if claims["room"] != room:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "join token is for another room")
        jti = claims.get("jti")
        token_id = (
            jti if isinstance(jti, str) and jti else hashlib.sha256(token.encode()).hexdigest()
        )
        return replace(identity_from_claims(claims), token_id=token_id)

    def verify_any_room(self, token: str) -> Identity:
        """The identity of a valid join token, for the room the token names (a member moved
        to another room resumes there with the token of the room it first entered)."""
        claims = self._claims(token, "join")
        room = claims["room"]
        if not isinstance(room, str) or room == ADMIN_ROOM:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "not a join token")
        return self.verify(token, room)

    def verify_admin(self, token: str) -> str:
        """The subject of a valid admin token (role ``admin``, room ``*``); typed error else.

        Admin tokens are for the operators' HTTP API only: no room accepts them for a join.
        """
        claims = self._claims(token, "admin")
        if claims["role"] != ADMIN_ROLE or claims["room"] != ADMIN_ROOM:
            raise ProtocolError(ErrorCode.FORBIDDEN, "not an admin token")
        sub = claims["sub"]
        if not isinstance(sub, str) or not 0 < len(sub) <= 128:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "token sub must be a short string")
        return sub


def identity_from_claims(claims: dict[str, Any]) -> Identity:
    role = claims["role"]
    if role not in ROLE_GRANTS:
        raise ProtocolError(ErrorCode.UNAUTHORIZED, f"unknown role {str(role)[:32]!r}")
    sub = claims["sub"]
    name = claims.get("name", sub)
    if not isinstance(sub, str) or not isinstance(name, str) or not 0 < len(name) <= 64:
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "token sub and name must be short strings")
    grants = claims.get("grants")
    if grants is None:
        granted = ROLE_GRANTS[role]
    else:
        if not isinstance(grants, list) or not all(isinstance(g, str) for g in grants):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "token grants must be a list of names")
        unknown = set(grants) - GRANTS
        if unknown:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, f"unknown grant {sorted(unknown)[0]!r}")
        granted = frozenset(grants)
    pseudonym = claims.get("pseudonym")
    if pseudonym is not None and (not isinstance(pseudonym, str) or not 0 < len(pseudonym) <= 64):
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "token pseudonym must be a short string")
    return Identity(sub, name, claims["room"], role, granted, pseudonym)


def parse_ttl(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``1h``, ``2d`` to seconds (more than zero)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError(f"bad duration {text!r} (examples: 90s, 30m, 1h)")
    seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if seconds <= 0:
        raise ValueError(f"duration {text!r} is not positive: the token would be born expired")
    return seconds


def load_secret(data_dir: str | Path) -> bytes | None:
    """The deployment secret kept in the data directory, or None if there is none. Never
    creates one: a secret made by anything but the server would sign tokens it refuses."""
    path = Path(data_dir) / SECRET_FILE
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        return None


def load_or_create_secret(data_dir: str | Path) -> tuple[bytes, bool]:
    """The deployment secret kept in the data directory (mode 0600); created on first use.

    Returns the secret and whether it was just created.
    """
    path = Path(data_dir) / SECRET_FILE
    if path.exists():
        return path.read_bytes().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")
    return secret, True


__all__ = [
    "ADMIN_ROLE",
    "ADMIN_ROOM",
    "ALGORITHMS_HS",
    "GRANTS",
    "ROLE_GRANTS",
    "SECRET_FILE",
    "Identity",
    "TokenVerifier",
    "anonymous",
    "identity_from_claims",
    "load_or_create_secret",
    "load_secret",
    "mint_admin_token",
    "mint_token",
    "parse_ttl",
]
