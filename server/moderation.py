"""Entry control, moderation and patient controls: the lobby, host actions and pausing.

Hosts (the ``moderate`` grant) choose how a room is entered (open, lobby, locked), admit or
deny lobby members, remove or ban members with a reason shown to them, mute a member's audio
on the server (the member can only ask to be unmuted) and end the session. Any member can
pause: their avatar disappears for others and they receive nothing until they come back.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import (
    ChangeRole,
    Grants,
    Lobby,
    MemberInfo,
    MemberState,
    Moderate,
    RoomState,
)

from .auth import ROLE_GRANTS

if TYPE_CHECKING:
    from .auth import Identity
    from .room import Member, Room
    from .session import Session

CLOSE_MODERATION = 4010


def entry_refusal(room: Room | None, identity: Identity) -> ProtocolError | None:
    """Why ``identity`` may not enter ``room`` now (None: it may, possibly via the lobby)."""
    if room is None:
        return None
    if identity.subject in room.banned:
        return ProtocolError(ErrorCode.BANNED, "you were removed from this session")
    if room.ended:
        return ProtocolError(ErrorCode.SESSION_ENDED, "this session has ended")
    if room.entry == "locked" and not identity.can("moderate"):
        return ProtocolError(ErrorCode.ROOM_LOCKED, "the room is locked")
    return None


def must_wait(room: Room | None, identity: Identity) -> bool:
    return room is not None and room.entry == "lobby" and not identity.can("moderate")


def hosts(room: Room) -> list[Member]:
    return [m for m in room.members.values() if m.identity.can("moderate")]


def notify_hosts(room: Room, msg: object) -> None:
    for h in hosts(room):
        if h.session is not None:
            h.session.send(msg)  # type: ignore[arg-type]


def lobby_changed(room: Room) -> None:
    waiting = tuple(
        MemberInfo(lid, s.waiting.name) for lid, s in room.lobby.items() if s.waiting is not None
    )
    notify_hosts(room, Lobby(waiting))


def state_of(m: Member) -> MemberState:
    return MemberState(m.id, m.paused, m.muted, m.unmute_requested)


def handle(session: Session, msg: Moderate) -> None:
    """A host's moderation action; refused with ``forbidden`` for everyone else."""
    member = session.member
    assert member is not None
    member.identity.require("moderate")
    room = member.room
    world = session.world
    action = msg.action
    actor = member.identity.subject
    if action in ("lock", "unlock", "lobby", "open"):
        room.entry = {"lock": "locked", "unlock": "open", "lobby": "lobby", "open": "open"}[action]
        world.record("entry_mode", room=room.name, actor=actor, mode=room.entry)
        room.broadcast(RoomState(room.entry))
        if room.entry == "open":  # opening the room lets the lobby in
            for lid in list(room.lobby):
                admit(room, lid, actor)
        return
    if action == "end":
        end_session(room, actor, msg.reason or "the host ended the session")
        return
    if msg.member_id is None:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"{action} needs member_id")
    if action in ("admit", "deny"):
        if msg.member_id not in room.lobby:
            raise ProtocolError(ErrorCode.NOT_FOUND, "nobody with that id is waiting")
        if action == "admit":
            admit(room, msg.member_id, actor)
        else:
            s = room.lobby.pop(msg.member_id)
            world.record(
                "denied",
                room=room.name,
                actor=actor,
                subject=s.waiting.subject if s.waiting else None,
            )
            s.send_error(ProtocolError(ErrorCode.DENIED, msg.reason or "entry denied"), True)
            s.close(CLOSE_MODERATION, b"denied")
            lobby_changed(room)
        return
    target = room.members.get(msg.member_id)
    if target is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, "no such member")
    if action in ("remove", "ban"):
        if action == "ban":
            room.banned.add(target.identity.subject)
        world.record(
            "removed",
            room=room.name,
            actor=actor,
            subject=target.identity.subject,
            member=target.id,
            ban=action == "ban",
            reason=msg.reason or "",
        )
        code = ErrorCode.BANNED if action == "ban" else ErrorCode.REMOVED
        text = msg.reason or "a host removed you from the room"
        if target.session is not None:
            target.session.send_error(ProtocolError(code, text), True)
            target.session.close(CLOSE_MODERATION, action.encode())
            target.session.member = None
        world.leave(target, "removed")
    elif action == "mute":
        target.muted = True
        target.unmute_requested = False
        world.record("muted", room=room.name, actor=actor, subject=target.identity.subject)
        room.broadcast(state_of(target))
        world.notify("member_muted", target, True)
    elif action == "allow_unmute":
        target.muted = False
        target.unmute_requested = False
        world.record("unmute_allowed", room=room.name, actor=actor, subject=target.identity.subject)
        room.broadcast(state_of(target))
        world.notify("member_muted", target, False)


def end_session(room: Room, actor: str, reason: str) -> None:
    """End the session for everyone in the room and its lobby; nobody may enter again."""
    world = room.world
    world.record("session_ended", room=room.name, actor=actor)
    room.ended = True
    err = ProtocolError(ErrorCode.SESSION_ENDED, reason)
    for lid in list(room.lobby):
        s = room.lobby.pop(lid)
        s.send_error(err, True)
        s.close(CLOSE_MODERATION, b"session ended")
    for m in list(room.members.values()):
        if m.session is not None:
            m.session.send_error(err, True)
            m.session.close(CLOSE_MODERATION, b"session ended")
            m.session.member = None
        world.leave(m, "session ended")


def admit(room: Room, lobby_id: int, actor: str) -> None:
    s = room.lobby.pop(lobby_id)
    ident = s.waiting
    if ident is None:
        return
    room.world.record("admitted", room=room.name, actor=actor, subject=ident.subject)
    s.complete_join(ident)
    lobby_changed(room)


def request_unmute(session: Session) -> None:
    m = session.member
    assert m is not None
    if not m.muted:
        return
    m.unmute_requested = True
    notify_hosts(m.room, state_of(m))


def set_paused(session: Session, paused: bool) -> None:
    """Step out of the room or back in (patient control)."""
    m = session.member
    assert m is not None
    if m.paused == paused:
        return
    m.paused = paused
    if paused:
        session.world.hide_avatar(m)
    else:
        m.needs_keyframe = True
        m.room.keyframe_wanted = True
        session.send_welcome(resumed=True)  # the member list may have changed meanwhile
    notify_hosts(m.room, state_of(m))
    session.world.notify("member_paused", m, paused)


def change_role(session: Session, msg: ChangeRole) -> None:
    """A host changes a member's role, or gives or takes one grant; the member and the hosts
    are told, the change is audited, and features re-check what the member may do.

    Being hidden is decided at join (an observer has no avatar in the state), so ``hidden`` and
    moves to or from the observer role are refused for a member already in the room.
    """
    member = session.member
    assert member is not None
    member.identity.require("moderate")
    room = member.room
    target = room.members.get(msg.member_id)
    if target is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, "no such member")
    ident = target.identity
    if (msg.role is None) == (msg.grant is None) or (msg.grant is not None and msg.allow is None):
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
    target.identity = new
    world = session.world
    world.record(
        "role_changed",
        room=room.name,
        actor=member.identity.subject,
        subject=ident.subject,
        member=target.id,
        **change,
    )
    update = Grants(target.id, new.role, tuple(sorted(new.grants)))
    if target.session is not None:
        target.session.send(update)
    for h in hosts(room):
        if h is not target and h.session is not None:
            h.session.send(update)
    world.notify("member_grants_changed", target)
