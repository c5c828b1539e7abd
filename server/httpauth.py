"""Who is asking over HTTP: the asset routes take a member's join token for the room, the admin
routes an operator's admin token. Every refusal is a typed error (the WebSocket's codes, as
JSON) and is recorded in the audit log; both fail closed.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import ROOM_NAME_RE

from .auth import ROLE_GRANTS, Identity, TokenVerifier
from .roomaccess import Access, RoomAccess, is_access_credential

_HTTP_STATUS = {
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.TOKEN_EXPIRED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.BANNED: 403,
    ErrorCode.REMOVED: 403,
    ErrorCode.SESSION_ENDED: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.OVERSIZED: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.ROOM_FULL: 409,
    ErrorCode.ROOM_MOVING: 503,
}


def http_error(err: ProtocolError, status: int | None = None) -> web.HTTPException:
    """A typed error as an HTTP response: the same codes as on the WebSocket, in JSON."""
    body = json.dumps({"error": {"code": err.code.value, "message": err.message}})
    exc = web.HTTPException(text=body, content_type="application/json")
    exc.set_status(status or _HTTP_STATUS.get(err.code, 400))
    return exc


class UploadSlots:
    """At most two uploads at a time from one address: an upload takes a slot before its body
    is read and gives it back (in a ``finally``) once it is stored or refused."""

    PER_ADDRESS = 2

    def __init__(self) -> None:
        self._busy: dict[str, int] = {}

    def take(self, request: web.Request) -> str:
        """Take one of the asking address's slots and return the address (for :meth:`give`);
        with none free, refuse with ``rate_limited`` (429)."""
        addr = request.remote or "?"
        busy = self._busy.get(addr, 0)
        if busy >= self.PER_ADDRESS:
            raise http_error(
                ProtocolError(ErrorCode.RATE_LIMITED, "two uploads at a time per address")
            )
        self._busy[addr] = busy + 1
        return addr

    def give(self, addr: str) -> None:
        """Give back a slot :meth:`take` returned ``addr`` for."""
        left = self._busy.get(addr, 1) - 1
        if left > 0:
            self._busy[addr] = left
        else:
            self._busy.pop(addr, None)


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class HttpAuth:
    """Checks the bearer tokens of HTTP requests."""

    def __init__(
        self,
        verifier: TokenVerifier | None,
        audit: Callable[..., None],
        count_refusal: Callable[[str], None],
        resolve: Callable[[Identity], Awaitable[Identity]],
        access: RoomAccess | None = None,
        holder: Callable[[Access], Identity] | None = None,
    ) -> None:
        self.verifier = verifier
        self._audit = audit
        self._count = count_refusal
        #: The identity as the room's session sees it (grants a host changed); raises a
        #: ProtocolError for a removed token or a banned identity (it may read the store).
        self._resolve = resolve
        #: Room access credentials (a moved member's, ``server/roomaccess.py``) and the live
        #: member one names (raises ``unauthorized`` once no member of the room holds it).
        self.access = access
        self._holder = holder

    def _refused(self, request: web.Request, err: ProtocolError, room: str | None) -> Exception:
        self._count(err.code.value)
        self._audit(
            "http_refused", room=room, peer=request.remote, path=request.path, code=err.code.value
        )
        return http_error(err)

    async def room_member(
        self, request: web.Request, ended: Callable[[str], bool]
    ) -> tuple[str, Identity]:
        """The room a request names and who asks (:meth:`room_identity`), refused with
        ``session_ended`` while ``ended(room)``: nothing of an ended session is listed,
        served or taken."""
        room = request.match_info["room"]
        identity = await self.room_identity(request, room)
        if ended(room):
            raise http_error(ProtocolError(ErrorCode.SESSION_ENDED, "this session has ended"))
        return room, identity

    async def room_identity(self, request: web.Request, room: str) -> Identity:
        """Who is asking, from the bearer token for ``room`` (a join token, or the room access
        credential of a member moved into ``room``); fails closed with a typed error.

        A server running without authentication treats every caller as an anonymous
        participant who may also upload (there is nobody to grant it on such a server).
        """
        if not ROOM_NAME_RE.fullmatch(room):
            raise http_error(ProtocolError(ErrorCode.OUT_OF_RANGE, "bad room name"))
        if self.verifier is None:
            grants = ROLE_GRANTS["participant"] | {"upload_assets"}
            return Identity(f"anonymous:{request.remote}", "anonymous", room, "participant", grants)
        try:
            token = _bearer(request)
            if token is None:
                raise ProtocolError(
                    ErrorCode.UNAUTHORIZED, "an Authorization: Bearer token is needed"
                )
            if self.access is not None and self._holder is not None and is_access_credential(token):
                # A member moved here: its join token names another room. The credential
                # holds only while that member is in this room, with the grants it has now.
                identity = self._holder(self.access.verify(token, room))
            else:
                identity = self.verifier.verify(token, room)
            # Every channel decides from the member's grants now, not the token's role.
            return await self._resolve(identity)
        except ProtocolError as err:
            raise self._refused(request, err, room) from None

    def admin(self, request: web.Request) -> str:
        """The operator's subject from an admin token, or a typed refusal. The admin API is
        off on a server without authentication: nobody could prove who they are."""
        try:
            if self.verifier is None:
                raise ProtocolError(
                    ErrorCode.FORBIDDEN, "the admin API is off on a server without authentication"
                )
            token = _bearer(request)
            if token is None:
                raise ProtocolError(ErrorCode.UNAUTHORIZED, "an admin bearer token is needed")
            return self.verifier.verify_admin(token)
        except ProtocolError as err:
            raise self._refused(request, err, None) from None
