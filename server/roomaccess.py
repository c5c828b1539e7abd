"""Room access credentials: what a member moved to another room presents to the HTTP asset and
image APIs of that room.

A join token names the room its member first entered; a host may move the member to another
room on the same connection (``protocol/clinic.py``), and the organiser mints no token for it.
The server gives the member, in ``moved``, a bearer credential for the target room instead: a
JWT signed by the server (HS256, header ``kid`` :data:`KID`) naming the room, the member's
subject and its join token (``tid``), expiring after :data:`ACCESS_TTL` seconds. HTTP accepts
it for that room only, and only while a member of that room holds that subject and join token
now, with that member's current grants: leaving the room (moved on, removed, gone) revokes it
at once, before it expires.

The signing key is the server's own, derived from the token secret when the server has one
(every server of a cluster sharing the secret accepts the others' credentials), else random
for the life of the process (a server checking tokens with a public key cannot sign with it).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt

from medverse.protocol.errors import ErrorCode, ProtocolError

#: The JWT header ``kid`` of room access credentials (join tokens never carry it).
KID = "medverse-room-access"
#: How long a credential lives, seconds: long enough for a consultation's downloads, short
#: enough that a copy taken from a log is soon worthless (and it dies with the membership).
ACCESS_TTL = 3600.0
_LABEL = b"medverse room access credential v1"


def derive_key(secret: bytes) -> bytes:
    """The credential key derived from a deployment's token secret (never the secret itself:
    a credential must not be usable as a join token, nor the other way round)."""
    return hmac.new(secret, _LABEL, hashlib.sha256).digest()


def is_access_credential(token: str) -> bool:
    """Whether ``token`` claims to be a room access credential (its header names :data:`KID`);
    nothing is verified here."""
    try:
        return jwt.get_unverified_header(token).get("kid") == KID
    except jwt.InvalidTokenError:
        return False


@dataclass(frozen=True, slots=True)
class Access:
    """What a verified credential names: the room, the member's subject and join token."""

    room: str
    subject: str
    token_id: str


class RoomAccess:
    """Issues and verifies room access credentials with one key."""

    def __init__(self, key: bytes | None = None, ttl: float = ACCESS_TTL) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)
        self.ttl = ttl

    def issue(self, room: str, subject: str, token_id: str) -> str:
        """A credential for ``room``, for the member with ``subject`` joined with the token
        named ``token_id``."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "typ": "room_access",
            "room": room,
            "sub": subject,
            "tid": token_id,
            "iat": now,
            "exp": now + int(self.ttl),
            "jti": secrets.token_urlsafe(12),
        }
        return jwt.encode(claims, self._key, algorithm="HS256", headers={"kid": KID})

    def verify(self, token: str, room: str) -> Access:
        """What a credential for ``room`` names; a typed ``unauthorized`` (forged, for another
        room, malformed) or ``token_expired`` otherwise."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
                options={"require": ["exp", "sub", "room", "tid", "typ"]},
                leeway=5,
            )
        except jwt.ExpiredSignatureError:
            raise ProtocolError(ErrorCode.TOKEN_EXPIRED, "room access credential expired") from None
        except jwt.InvalidTokenError as exc:
            raise ProtocolError(
                ErrorCode.UNAUTHORIZED, f"invalid room access credential: {exc}"
            ) from None
        if claims["typ"] != "room_access":
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "not a room access credential")
        if claims["room"] != room:
            raise ProtocolError(
                ErrorCode.UNAUTHORIZED, "room access credential is for another room"
            )
        sub, tid = claims["sub"], claims["tid"]
        if not isinstance(sub, str) or not isinstance(tid, str) or not sub or not tid:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "room access credential names nobody")
        return Access(room, sub, tid)


__all__ = ["ACCESS_TTL", "KID", "Access", "RoomAccess", "derive_key", "is_access_credential"]
