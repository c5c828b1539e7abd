"""Moderation, as a room plugin: entry control, the lobby, host actions and what hosts see.

Hosts (the ``moderate`` grant) choose how a room is entered (open, lobby, locked), admit or
deny lobby members, remove or ban members with a reason shown to them, mute a member's audio
on the server (the member can only ask to be unmuted), change roles and grants, and end the
session. Hosts are told who waits in the lobby, who stepped out and who asks to be unmuted.
"""

from __future__ import annotations

from dataclasses import replace

from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import (
    ChangeRole,
    Grants,
    Lobby,
    MemberInfo,
    MemberState,
    Message,
    Moderate,
    RequestUnmute,
    RoomState,
)

from .auth import ROLE_GRANTS, Identity
from .plugins import WAIT, MemberView, RoomContext, RoomPlugin, Wait

#: Entry modes a host may set, by action.
_ENTRY = {"lock": "locked", "unlock": "open", "lobby": "lobby", "open": "open"}


def _is_host(m: MemberView) -> bool:
    return m.can("moderate")


def _named(ctx: RoomContext, member_id: int) -> MemberView:
    """The member a host's message names. A hidden member (an observer) is answered exactly
    as an id nobody has, so trying ids cannot find observers."""
    m = ctx.members.get(member_id)
    if m is None or m.hidden:
        raise ProtocolError(ErrorCode.NOT_FOUND, "no such member")
    return m


def _to_hosts(ctx: RoomContext, msg: Message) -> None:
    """Tell every connected host, stepped out or not (they act on it when they come back)."""
    for m in ctx.members.values():
        if _is_host(m):
            ctx.send(m, msg)


class Moderation(RoomPlugin):
    """Entry control and host actions for one room."""

    name = "moderation"
    messages = (Moderate, ChangeRole, RequestUnmute)
    server_messages = (Lobby, MemberState, RoomState, Grants)

    def __init__(self, ctx: RoomContext) -> None:
        super().__init__(ctx)
        self.entry = "open"  # open | lobby | locked
        self.banned: set[str] = set()  # token subjects barred for this session
        self.unmute_requested: set[int] = set()  # member ids

    # ----------------------------------------------------------------- entry

    def on_enter(self, identity: Identity) -> Wait | ProtocolError | None:
        if identity.subject in self.banned:
            return ProtocolError(ErrorCode.BANNED, "you were removed from this session")
        host = identity.can("moderate")
        if self.entry == "locked" and not host:
            return ProtocolError(ErrorCode.ROOM_LOCKED, "the room is locked")
        if self.entry == "lobby" and not host:
            return WAIT
        return None

    def on_lobby_changed(self) -> None:
        waiting = tuple(MemberInfo(lid, ident.name) for lid, ident in self.ctx.lobby.items())
        _to_hosts(self.ctx, Lobby(waiting))

    def describe(self) -> dict[str, object]:
        return {"entry": self.entry}

    def is_banned(self, subject: str) -> bool:
        """Whether ``subject`` was banned from this room for the session (the asset routes
        ask)."""
        return subject in self.banned

    # ----------------------------------------------------------------- member state

    def _state(self, m: MemberView) -> MemberState:
        return MemberState(m.id, m.paused, m.muted, m.id in self.unmute_requested)

    def on_pause(self, member: MemberView, paused: bool) -> None:
        if not member.hidden:  # nothing names an observer, not even to hosts
            _to_hosts(self.ctx, self._state(member))

    def on_leave(self, member: MemberView, reason: str) -> None:
        self.unmute_requested.discard(member.id)

    # ----------------------------------------------------------------- messages

    def on_message(self, member: MemberView, msg: Message) -> None:
        if isinstance(msg, RequestUnmute):
            if member.muted:
                self.unmute_requested.add(member.id)
                _to_hosts(self.ctx, self._state(member))
            return
        if not member.can("moderate"):
            raise ProtocolError(
                ErrorCode.FORBIDDEN, f"role {member.identity.role} may not moderate"
            )
        if isinstance(msg, Moderate):
            self._moderate(member, msg)
        elif isinstance(msg, ChangeRole):
            self._change_role(member, msg)

    def _moderate(self, host: MemberView, msg: Moderate) -> None:
        ctx = self.ctx
        action = msg.action
        actor = host.identity.subject
        if action in _ENTRY:
            self.entry = _ENTRY[action]
            ctx.audit("entry_mode", actor=actor, mode=self.entry)
            ctx.broadcast(RoomState(self.entry))
            if self.entry == "open":  # opening the room lets the lobby in
                for lid in list(ctx.lobby):
                    self._admit(lid, actor)
            return
        if action == "end":
            ctx.end(actor, msg.reason or "the host ended the session")
            return
        if msg.member_id is None:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"{action} needs member_id")
        if action in ("admit", "deny"):
            if msg.member_id not in ctx.lobby:
                raise ProtocolError(ErrorCode.NOT_FOUND, "nobody with that id is waiting")
            if action == "admit":
                self._admit(msg.member_id, actor)
            else:
                ctx.audit("denied", actor=actor, subject=ctx.lobby[msg.member_id].subject)
                ctx.deny(
                    msg.member_id, ProtocolError(ErrorCode.DENIED, msg.reason or "entry denied")
                )
            return
        target = _named(ctx, msg.member_id)
        if action in ("remove", "ban"):
            if action == "ban":
                self.banned.add(target.identity.subject)
            ctx.audit(
                "removed",
                actor=actor,
                subject=target.identity.subject,
                member=target.id,
                ban=action == "ban",
                reason=msg.reason or "",
            )
            code = ErrorCode.BANNED if action == "ban" else ErrorCode.REMOVED
            text = msg.reason or "a host removed you from the room"
            ctx.remove(target, ProtocolError(code, text), "removed")
        elif action in ("mute", "allow_unmute"):
            muted = action == "mute"
            self.unmute_requested.discard(target.id)
            ctx.audit(
                "muted" if muted else "unmute_allowed", actor=actor, subject=target.identity.subject
            )
            ctx.set_muted(target, muted)
            ctx.broadcast(self._state(target))

    def _admit(self, lobby_id: int, actor: str) -> None:
        subject = self.ctx.lobby[lobby_id].subject
        self.ctx.admit(lobby_id)  # raises room_full (the waiter is turned away)
        self.ctx.audit("admitted", actor=actor, subject=subject)

    def _change_role(self, host: MemberView, msg: ChangeRole) -> None:
        """A host changes a member's role, or gives or takes one grant; the member and the hosts
        are told, the change is audited, and every plugin re-checks what the member may do.

        Being hidden is decided at join (an observer has no avatar in the state), so ``hidden``
        and moves to or from the observer role are refused for a member already in the room.
        """
        ctx = self.ctx
        target = _named(ctx, msg.member_id)
        ident = target.identity
        if (msg.role is None) == (msg.grant is None) or (
            msg.grant is not None and msg.allow is None
        ):
            raise ProtocolError(ErrorCode.BAD_FIELD, "give either role, or grant and allow")
        if msg.role is not None:
            if "observer" in (msg.role, ident.role):
                raise ProtocolError(ErrorCode.FORBIDDEN, "observers are chosen at join")
            new = replace(ident, role=msg.role, grants=ROLE_GRANTS[msg.role])
            change: dict[str, object] = {"role": msg.role}
        else:
            assert msg.grant is not None
            if msg.grant == "hidden":
                raise ProtocolError(ErrorCode.FORBIDDEN, "hidden is chosen at join")
            grants = ident.grants | {msg.grant} if msg.allow else ident.grants - {msg.grant}
            new = replace(ident, grants=frozenset(grants))
            change = {"grant": msg.grant, "allow": bool(msg.allow)}
        if new == ident:
            return
        ctx.audit(
            "role_changed",
            actor=host.identity.subject,
            subject=ident.subject,
            member=target.id,
            **change,
        )
        ctx.set_identity(target, new)
        update = Grants(target.id, new.role, tuple(sorted(new.grants)))
        for m in ctx.members.values():  # the member and the hosts, stepped out or not
            if m.id == target.id or _is_host(m):
                ctx.send(m, update)
