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
(every server of a cluster sharing the secret accepts the others' credentials); a server that
checks tokens with a public key (it cannot sign with it) derives it from the cluster's shared
secret in a cluster, and alone uses a random key for the life of the process.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

import jwt

from medverse.protocol.errors import ErrorCode, ProtocolError

from .auth import Identity, identity_from_claims

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

    def rekey(self, key: bytes) -> None:
        """Sign and verify with ``key`` from now on (credentials signed before are refused)."""
        self._key = key

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


# --------------------------------------------------------------------------- transfer grants

#: The JWT header ``kid`` of transfer grants.
TRANSFER_KID = "medverse-transfer"
#: How long a transfer grant lives, seconds: the moved member reconnects at once.
TRANSFER_TTL = 60.0
#: Grants redeemed here, remembered (by ``jti``) until they expire: each joins once.
MAX_REDEEMED = 65_536
_TRANSFER_LABEL = b"medverse transfer grant v1"


def is_transfer_grant(token: str) -> bool:
    """Whether ``token`` claims to be a transfer grant (its header names
    :data:`TRANSFER_KID`); nothing is verified here."""
    try:
        return jwt.get_unverified_header(token).get("kid") == TRANSFER_KID
    except jwt.InvalidTokenError:
        return False


@dataclass(frozen=True, slots=True)
class Arrival:
    """A redeemed transfer grant: who enters which room, skipping its lobby or not, moved by
    ``actor`` from ``origin``."""

    identity: Identity
    admit: bool
    actor: str
    origin: str
    reason: str
    #: The grant's ``jti`` and expiry (Unix seconds): what single use is checked by.
    jti: str = ""
    expires: float = 0.0
    #: The room the member's join token names ("" if the grant does not say).
    home: str = ""


class TransferGrants:
    """Transfer grants: what a member moved to a room another server of the cluster runs
    presents there, in its ``hello``, in place of its join token (which names its first
    room). Signed with a key derived from the secret every server of the cluster shares, for
    one room, expiring after :data:`TRANSFER_TTL` seconds, redeemed once: :meth:`redeem`
    checks single use in this process; a server of a cluster verifies a grant (:meth:`verify`) and
    claims its ``jti`` in the cluster's Redis (``Cluster.redeem_grant``), so a grant joins once
    across every server, and remembers it here (:meth:`used`, :meth:`remember`)."""

    def __init__(self, cluster_secret: bytes, ttl: float = TRANSFER_TTL) -> None:
        self._key = hmac.new(cluster_secret, _TRANSFER_LABEL, hashlib.sha256).digest()
        self.ttl = ttl
        self._redeemed: dict[str, float] = {}

    def issue(
        self,
        identity: Identity,
        room: str,
        admit: bool,
        actor: str,
        origin: str,
        reason: str,
        home: str = "",
    ) -> str:
        """A grant for ``identity`` (the member's, from its join token, whose room is
        ``home``) to enter ``room``."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "typ": "transfer",
            "room": room,
            "sub": identity.subject,
            "name": identity.name,
            "role": identity.role,
            "grants": sorted(identity.grants),
            "tid": identity.token_id,
            "admit": admit,
            "by": actor,
            "from": origin,
            "why": reason,
            "iat": now,
            "exp": now + int(self.ttl),
            "jti": secrets.token_urlsafe(12),
        }
        if identity.pseudonym is not None:
            claims["pseudonym"] = identity.pseudonym
        if home:
            claims["home"] = home
        return jwt.encode(claims, self._key, algorithm="HS256", headers={"kid": TRANSFER_KID})

    def redeem(self, token: str, room: str) -> Arrival:
        """The arrival a grant for ``room`` admits, once in this process; typed
        ``unauthorized`` (forged, for another room, already used) or ``token_expired``
        otherwise."""
        arrival = self.verify(token, room)
        if self.used(arrival.jti):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "transfer grant already used")
        self.remember(arrival.jti, arrival.expires)
        return arrival

    def used(self, jti: str) -> bool:
        """Whether the grant named ``jti`` was redeemed here."""
        return jti in self._redeemed

    def remember(self, jti: str, expires: float) -> None:
        """The grant named ``jti`` (expiring at ``expires``, Unix seconds) was redeemed: kept
        until it has expired, at most :data:`MAX_REDEEMED` of them."""
        now = time.time()
        for old in [j for j, until in self._redeemed.items() if until < now]:
            del self._redeemed[old]
        if len(self._redeemed) >= MAX_REDEEMED:
            self._redeemed.pop(next(iter(self._redeemed)))
        self._redeemed[jti] = expires + 5

    def verify(self, token: str, room: str) -> Arrival:
        """The arrival a grant for ``room`` names, if it is genuine and unexpired (whether it
        was used is not checked here); typed ``unauthorized`` or ``token_expired`` otherwise."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
                options={"require": ["exp", "sub", "room", "role", "jti", "typ"]},
                leeway=5,
            )
        except jwt.ExpiredSignatureError:
            raise ProtocolError(ErrorCode.TOKEN_EXPIRED, "transfer grant expired") from None
        except jwt.InvalidTokenError as exc:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, f"invalid transfer grant: {exc}") from None
        if claims["typ"] != "transfer" or claims["room"] != room:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "transfer grant is for another room")
        identity = identity_from_claims(claims)
        tid = claims.get("tid")
        jti = claims["jti"]
        if not isinstance(jti, str) or not 1 <= len(jti) <= 64:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "transfer grant without a valid jti")
        return Arrival(
            replace(identity, token_id=tid if isinstance(tid, str) else ""),
            bool(claims.get("admit")),
            str(claims.get("by", "")),
            str(claims.get("from", "")),
            str(claims.get("why", ""))[:256],
            jti,
            float(claims["exp"]),
            str(claims.get("home", ""))[:128],
        )


__all__ = [
    "ACCESS_TTL",
    "KID",
    "TRANSFER_KID",
    "TRANSFER_TTL",
    "Access",
    "Arrival",
    "RoomAccess",
    "TransferGrants",
    "derive_key",
    "is_access_credential",
    "is_transfer_grant",
]
