"""Join tokens: the signed JWT a member presents in ``hello.token``.

A token is part of the wire contract (``protocol/SPEC.md``, section "Handshake", step 3): the
server admits a ``hello`` only with a valid one, unless it runs without authentication. Its
claims:

=============  ==========================================================================
``sub``        the identity: who joins (the audit log names it)
``name``       the display name the others see (not ``hello.name``)
``room``       the room it admits to; must equal ``hello.room``
``role``       ``host``, ``participant``, ``observer`` or ``receptionist``; the member gets
               the role's grants (:data:`ROLE_GRANTS`)
``grants``     optional: a list of :data:`GRANTS` replacing the role's
``pseudonym``  optional: in rooms the server marks pseudonymous, the only name shown
``iat``        issued at, Unix seconds
``exp``        expiry, Unix seconds
``jti``        optional: names this token (a removal refuses it for the rest of the session;
               without it the server names a token by its hash)
=============  ==========================================================================

An admin token, for the operators' HTTP API (SPEC.md "Admin"), has role :data:`ADMIN_ROLE`
and room :data:`ADMIN_ROOM`; no room accepts it for a join.

Minting here signs with HS256 and a shared secret: what ``medverse token``, the load generator
and test clients do. Deployments whose identity provider signs tokens (EdDSA, RS256) mint them
there. Verifying is the server's job (``server/auth.py``). Pure computation (PyJWT), no I/O.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import jwt

#: Every grant the server checks.
GRANTS = frozenset(
    {
        "publish_audio",
        "manipulate_objects",
        "annotate",
        "upload_assets",
        "moderate",
        "hidden",
        "transfer",
    }
)
#: What each role may do unless the token lists its grants explicitly.
ROLE_GRANTS: dict[str, frozenset[str]] = {
    "host": frozenset(
        {"publish_audio", "manipulate_objects", "annotate", "upload_assets", "moderate"}
    ),
    "participant": frozenset({"publish_audio", "manipulate_objects", "annotate"}),
    "observer": frozenset({"hidden"}),
    # A clinic's front desk: moves patients between rooms (SPEC.md, "Transfers").
    "receptionist": frozenset({"publish_audio", "transfer"}),
}
#: The role of operators' tokens for the admin HTTP API (never valid for joining a room).
ADMIN_ROLE = "admin"
#: The room claim of admin tokens.
ADMIN_ROOM = "*"


def mint_token(
    secret: bytes,
    *,
    room: str,
    identity: str,
    name: str | None = None,
    role: str = "participant",
    ttl: float = 3600.0,
    grants: list[str] | None = None,
    pseudonym: str | None = None,
) -> str:
    """An HS256 join token (what ``medverse token`` prints)."""
    if role not in ROLE_GRANTS:
        raise ValueError(f"role must be one of {sorted(ROLE_GRANTS)}")
    if grants is not None and set(grants) - GRANTS:
        raise ValueError(f"grants must be among {sorted(GRANTS)}")
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": identity,
        "name": name or identity,
        "room": room,
        "role": role,
        "iat": now,
        "exp": now + int(ttl),
        # Every token minted is a new one, even for the same person within the same second:
        # a token refused after a removal must not come back as a byte-identical twin.
        "jti": secrets.token_urlsafe(12),
    }
    if grants is not None:
        claims["grants"] = grants
    if pseudonym is not None:
        claims["pseudonym"] = pseudonym
    return jwt.encode(claims, secret, algorithm="HS256")


def mint_admin_token(secret: bytes, *, identity: str, ttl: float = 3600.0) -> str:
    """An HS256 token for the admin HTTP API (``medverse token --admin``)."""
    now = int(time.time())
    claims = {
        "sub": identity,
        "room": ADMIN_ROOM,
        "role": ADMIN_ROLE,
        "iat": now,
        "exp": now + int(ttl),
    }
    return jwt.encode(claims, secret, algorithm="HS256")


__all__ = ["ADMIN_ROLE", "ADMIN_ROOM", "GRANTS", "ROLE_GRANTS", "mint_admin_token", "mint_token"]
