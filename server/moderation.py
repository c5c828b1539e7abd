"""Moderation, as a room plugin: entry control, the lobby, host actions and what hosts see.

Hosts (the ``moderate`` grant) choose how a room is entered (open, lobby, locked), admit or
deny lobby members, remove members or ban identities with a reason shown to them, mute a
member's audio on the server (the member can only ask to be unmuted), change roles and
grants, and end the session. Hosts are told who waits in the lobby, who stepped out, who asks
to be unmuted and which bans are in force.

Moderation state belongs to the identity (the token's subject), not to a member object, so
leaving and joining again undoes nothing:

* **remove** ends that member's session for good: the token it joined with is refused for the
  rest of the session (until the room closes); a new token from the organiser is the way back.
* **ban** bars the identity from the room *name*, in this session and every later one, for a
  chosen time or until a host lifts it (``unban``); bans are stored (:mod:`.bans`) before the
  host is answered, and both are in the audit log.
* a server **mute** and a host's **role or grant changes** hold for the identity for the rest
  of the session: a member who rejoins gets them back at once.

Removals, mutes and role or grant changes are stored (:mod:`.standing`, next to the bans)
before the host is answered, and read again when the room opens: a room that moves to another
server of a cluster (a drain, or its server killed), or whose server restarts within the
session, keeps them. They end with the session, when the room closes after staying empty.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import (
    BanInfo,
    Bans,
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
from .bans import Ban, BanBackend, BanStore
from .config import ServerConfig
from .plugins import (
    WAIT,
    MemberView,
    RoomContext,
    RoomPlugin,
    ServerContext,
    ServerPlugin,
    Wait,
)
from .standing import (
    TOUCH_INTERVAL,
    SessionState,
    SQLiteStandingStore,
    Standing,
    StandingBackend,
)

log = logging.getLogger("medverse.moderation")

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


def ban_refusal(ban: Ban) -> ProtocolError:
    """The error a banned identity gets on every channel."""
    if ban.until is None:
        until = "until a host lifts the ban"
    else:
        until = "until " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ban.until))
    why = f": {ban.reason}" if ban.reason else ""
    return ProtocolError(ErrorCode.BANNED, f"you are banned from this room {until}{why}")


def removal_refusal(why: str) -> ProtocolError:
    """The error a removed token gets on every channel."""
    return ProtocolError(
        ErrorCode.REMOVED,
        "a host removed you from this session"
        + (f" ({why})" if why else "")
        + "; ask the organiser for a new invitation",
    )


def alive_since(cfg: ServerConfig) -> float:
    """The oldest mark of a stored session a room continues: its members may take the resume
    grace to come back and the room lingers as long before it closes; a killed server's rooms
    wait out their lease before another takes them; plus two marks' interval (a server killed
    just before its next mark)."""
    wait = cfg.resume_grace + cfg.room_linger + cfg.cluster_lease_ttl + 2 * TOUCH_INTERVAL
    return time.time() - wait


class Moderation(RoomPlugin):
    """Entry control and host actions for one room."""

    name = "moderation"
    messages = (Moderate, ChangeRole, RequestUnmute)
    server_messages = (Lobby, MemberState, RoomState, Grants, Bans)

    def __init__(
        self,
        ctx: RoomContext,
        bans: BanBackend | None = None,
        standing: StandingBackend | None = None,
        ends: dict[str, asyncio.Task[None]] | None = None,
    ) -> None:
        super().__init__(ctx)
        self.entry = ctx.settings.entry  # open | lobby | locked (the room type's, at first)
        #: Durable bans (a room plugin made without the server plugin keeps them in memory).
        self.bans = bans if bans is not None else BanStore(":memory:")
        #: Where this session's removals and standing are stored (None: in memory only).
        self.store = standing
        #: This session's id in the store (another if the room continues a stored session).
        self.session = secrets.token_hex(8)
        self.removed_tokens: dict[str, str] = {}  # token id -> the reason, for this session
        self.standing: dict[str, Standing] = {}  # token subject -> its moderation state
        #: Done once the stored session has been read (joins wait for it); None: not reading.
        self._loading: asyncio.Future[None] | None = None
        #: The stored session could not be read: entries are refused (removals would not hold).
        self._unread = False
        self._touching: asyncio.TimerHandle | None = None
        #: Rooms whose ended session's rows are being deleted (shared by the rooms of a
        #: server): a room that opens again reads its stored session after that.
        self._ends = ends if ends is not None else {}
        self.unmute_requested: set[int] = set()  # member ids
        # Lobby entries show hosts who is waiting; in pseudonymous rooms a handle derived from
        # the identity with a key of this session only, so it tells people apart without
        # naming them.
        self._handle_key = secrets.token_bytes(16)
        #: Done when the last host action that waits for the database has ended: host
        #: actions apply in the order they came, so the ones after it wait for it.
        self._tail: asyncio.Future[None] | None = None

    # ----------------------------------------------------------------- entry

    def refusal(self, identity: Identity) -> ProtocolError | None:
        """Why ``identity`` may not use this room now (a removed token, a ban), or None."""
        if self._unread:
            return ProtocolError(
                ErrorCode.INTERNAL, "the room's moderation state could not be read; try again"
            )
        if identity.token_id and identity.token_id in self.removed_tokens:
            return removal_refusal(self.removed_tokens[identity.token_id])
        bans = self.bans.active(self.ctx.name, identity.subject)
        return ban_refusal(bans[0]) if bans else None

    def effective(self, identity: Identity) -> Identity:
        """``identity`` as this session sees it: with the role and grants a host gave the
        identity (every channel decides from these, not from the token)."""
        standing = self.standing.get(identity.subject)
        if standing is None or standing.role is None or identity.hidden:
            return identity
        role, grants = standing.role
        if "hidden" in grants:
            return identity
        return replace(identity, role=role, grants=grants)

    # ----------------------------------------------------------------- the stored session

    def _alive_since(self) -> float:
        return alive_since(self.ctx.config)

    def on_create(self) -> None:
        """Read the room's stored session, if it is still alive (the room moved here, or this
        server restarted): at once from a local file, else in a thread while joins wait."""
        store = self.store
        if store is None:
            return
        since = self._alive_since()
        if store.local:
            try:
                self._adopt(store.load(self.ctx.name, since))
            except Exception:
                log.exception("room %s: its moderation state could not be read", self.ctx.name)
                self._unread = True
            return
        fut = asyncio.get_running_loop().create_future()
        self._loading = fut

        async def load() -> None:
            try:
                ending = self._ends.get(self.ctx.name)
                if ending is not None:
                    await asyncio.wait([ending])
                state = await asyncio.to_thread(store.load, self.ctx.name, since)
            except Exception:
                log.exception("room %s: its moderation state could not be read", self.ctx.name)
                self._unread = True
            else:
                self._adopt(state)
            finally:
                if not fut.done():
                    fut.set_result(None)

        self.ctx.spawn(load())

    def _adopt(self, state: SessionState | None) -> None:
        """Continue a stored session: its removals and standing hold here too."""
        if state is None:
            return
        self.session = state.session
        self.removed_tokens.update(state.removed)
        for subject, standing in state.standing.items():
            self.standing.setdefault(subject, standing)
        self._keep_alive()
        log.info(
            "room %s continues its session: %d removal(s), %d identities' standing",
            self.ctx.name,
            len(state.removed),
            len(state.standing),
        )

    def entry_pending(self) -> asyncio.Future[None] | None:
        return self._loading

    @property
    def reading(self) -> bool:
        """Whether the room's stored session is still being read (until then its removals
        and standing are not known here)."""
        return self._loading is not None and not self._loading.done()

    def _keep_alive(self) -> None:
        """Mark the stored session alive every TOUCH_INTERVAL seconds from now on (a room
        with nothing stored marks nothing)."""
        if self._touching is not None or self.store is None:
            return
        store, name = self.store, self.ctx.name

        busy = False

        async def touch() -> None:
            nonlocal busy
            busy = True
            try:
                await asyncio.to_thread(store.touch, name, self.session)
            except Exception as exc:  # the next mark may make it; the session lasts a while
                log.warning("room %s: its session could not be marked alive: %s", name, exc)
            finally:
                busy = False

        def tick() -> None:
            self._touching = self.ctx.call_later(TOUCH_INTERVAL, tick)
            if not busy:  # a slow database gets one mark at a time, not a pile of them
                self.ctx.spawn(touch())

        self._touching = self.ctx.call_later(TOUCH_INTERVAL, tick)

    def _stored(
        self, write: Callable[[StandingBackend], None], apply: Callable[[], None]
    ) -> Coroutine[Any, Any, None] | None:
        """A host's change: stored first (in a thread: a slow database delays this host's
        answer, never a tick), then applied; the host is answered once both are done. A
        change that cannot be stored raises (the host's typed answer) and is not applied."""
        store = self.store
        if store is None:
            apply()
            return None

        async def run() -> None:
            await asyncio.to_thread(write, store)
            self._keep_alive()
            apply()

        return run()

    def on_session_end(self) -> None:
        """The room closed after staying empty: its stored session's rows go (in a thread;
        a failure leaves rows that the next opening finds too old and deletes)."""
        store, name, session = self.store, self.ctx.name, self.session
        if store is None or self._touching is None:
            return  # nothing stored

        def end() -> None:
            try:
                store.end(name, session)
            except Exception as exc:
                log.warning("room %s: its ended session's rows stay: %s", name, exc)

        if store.local:
            end()
            return
        # The room opening here again reads the store only after this (_ends).
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(end))
        self._ends[name] = task
        task.add_done_callback(lambda t: self._forget_end(name, t))

    def _forget_end(self, name: str, task: asyncio.Task[None]) -> None:
        if self._ends.get(name) is task:
            del self._ends[name]

    def on_close(self) -> None:
        if self._touching is not None:
            self._touching.cancel()
        if self._loading is not None and not self._loading.done():
            self._loading.set_result(None)  # joins that waited try the room anew

    def on_enter(self, identity: Identity) -> Wait | ProtocolError | None:
        refusal = self.refusal(identity)
        if refusal is not None:
            return refusal
        host = self.effective(identity).can("moderate")
        if self.entry == "locked" and not host:
            return ProtocolError(ErrorCode.ROOM_LOCKED, "the room is locked")
        if self.entry == "lobby" and not host:
            return WAIT
        return None

    def _lobby_identity(self, identity: Identity) -> str:
        """What tells a waiting person apart for hosts: the verified identity, or in
        pseudonymous rooms its pseudonym (else a handle that names nobody)."""
        if not self.ctx.pseudonymous:
            return identity.subject
        if identity.pseudonym:
            return identity.pseudonym
        digest = hmac.new(self._handle_key, identity.subject.encode(), hashlib.sha256)
        return "anon-" + digest.hexdigest()[:8]

    def _lobby_name(self, lobby_id: int, identity: Identity) -> str:
        if not self.ctx.pseudonymous:
            return identity.name
        return identity.pseudonym or f"Waiting {lobby_id}"

    def on_lobby_changed(self) -> None:
        waiting = tuple(
            MemberInfo(lid, self._lobby_name(lid, ident), self._lobby_identity(ident))
            for lid, ident in self.ctx.lobby.items()
        )
        _to_hosts(self.ctx, Lobby(waiting))

    def describe(self) -> dict[str, object]:
        return {"entry": self.entry}

    # ----------------------------------------------------------------- member state

    def _state(self, m: MemberView) -> MemberState:
        return MemberState(m.id, m.paused, m.muted, m.id in self.unmute_requested)

    def on_join(self, member: MemberView) -> None:
        """Give a member who comes back what the session holds for its identity: the role and
        grants a host gave it and a server mute (rejoining undoes nothing)."""
        standing = self.standing.get(member.identity.subject)
        ctx = self.ctx
        if standing is not None and not member.hidden:
            new = self.effective(member.identity)
            if new != member.identity:
                ctx.set_identity(member, new)
                self._tell_grants(member, new)
            if standing.muted:
                ctx.set_muted(member, True)
                ctx.broadcast(self._state(member))
        if _is_host(member):
            self._send_bans(member)

    def on_resume(self, member: MemberView) -> None:
        if _is_host(member):
            self._send_bans(member)

    def on_pause(self, member: MemberView, paused: bool) -> None:
        if not member.hidden:  # nothing names an observer, not even to hosts
            _to_hosts(self.ctx, self._state(member))

    def on_leave(self, member: MemberView, reason: str) -> None:
        self.unmute_requested.discard(member.id)

    def _send_bans(self, host: MemberView | None = None) -> None:
        """The bans in force, to one host (when it joins) or to every host (on a change)."""
        now = time.time()
        active = [b for b in self.bans.active(self.ctx.name) if b.active(now)]
        if host is not None and not active:
            return
        msg = Bans(
            tuple(
                BanInfo(b.id, b.name, int(b.until) if b.until is not None else 0, b.reason)
                for b in active
            )
        )
        if host is not None:
            self.ctx.send(host, msg)
        else:
            _to_hosts(self.ctx, msg)

    # ----------------------------------------------------------------- messages

    def on_message(self, member: MemberView, msg: Message) -> Coroutine[Any, Any, None] | None:
        if isinstance(msg, RequestUnmute):
            if member.muted:
                self.unmute_requested.add(member.id)
                _to_hosts(self.ctx, self._state(member))
            return None
        if not member.can("moderate"):
            raise ProtocolError(
                ErrorCode.FORBIDDEN, f"role {member.identity.role} may not moderate"
            )
        if isinstance(msg, Moderate):
            return self._in_order(lambda: self._moderate(member, msg))
        if isinstance(msg, ChangeRole):
            return self._in_order(lambda: self._change_role(member, msg))
        return None

    def _in_order(
        self, act: Callable[[], Coroutine[Any, Any, None] | None]
    ) -> Coroutine[Any, Any, None] | None:
        """Apply a host action now, unless one that waits for the database is still under
        way: then after it (a ban and then ``end`` bans first, as the host asked)."""
        prev = self._tail
        if prev is None or prev.done():
            later = act()
            if later is None:
                return None
            mine = asyncio.get_running_loop().create_future()
            self._tail = mine
            return self._then(None, lambda: later, mine)
        mine = asyncio.get_running_loop().create_future()
        self._tail = mine
        return self._then(prev, act, mine)

    async def _then(
        self,
        prev: asyncio.Future[None] | None,
        act: Callable[[], Coroutine[Any, Any, None] | None],
        mine: asyncio.Future[None],
    ) -> None:
        try:
            if prev is not None:
                await prev
            later = act()
            if later is not None:
                await later
        finally:
            if not mine.done():
                mine.set_result(None)

    def _members_of(self, subject: str) -> list[MemberView]:
        """Every member (device) of one identity now in the room."""
        return [m for m in self.ctx.members.values() if m.identity.subject == subject]

    def _moderate(self, host: MemberView, msg: Moderate) -> Coroutine[Any, Any, None] | None:
        """Apply a host's action; a ban, unban, removal or mute is stored first (off the event
        loop: a slow or unreachable database delays this host's answer, never a tick), so it
        comes back as a coroutine the room runs and answers when done."""
        ctx = self.ctx
        action = msg.action
        actor = host.identity.subject
        if msg.duration is not None and action != "ban":
            raise ProtocolError(ErrorCode.BAD_FIELD, "only a ban takes a duration")
        if action in _ENTRY:
            self.entry = _ENTRY[action]
            ctx.audit("entry_mode", actor=actor, mode=self.entry)
            ctx.broadcast(RoomState(self.entry))
            if self.entry == "open":  # opening the room lets the lobby in
                for lid in list(ctx.lobby):
                    self._admit(lid, actor)
            return None
        if action == "end":
            ctx.end(actor, msg.reason or "the host ended the session")
            return None
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
            return None
        if action == "unban":
            return self._unban(msg.member_id, actor)
        target = _named(ctx, msg.member_id)
        subject = target.identity.subject
        if action == "ban":
            until = time.time() + msg.duration if msg.duration is not None else None
            return self._ban(target, msg.reason or "", actor, until)
        name, session = ctx.name, self.session
        if action == "remove":
            reason = msg.reason or ""
            token = target.identity.token_id

            def removed() -> None:
                if token:
                    self.removed_tokens[token] = reason
                ctx.audit(
                    "removed",
                    actor=actor,
                    subject=subject,
                    member=target.id,
                    ban=False,
                    reason=reason,
                )
                # Every member holding that token now: the target, unless it left meanwhile,
                # and whoever rejoined with the token while the removal was being stored.
                for m in list(ctx.members.values()):
                    if m is target or (token and m.identity.token_id == token):
                        err = ProtocolError(ErrorCode.REMOVED, reason or "a host removed you")
                        ctx.remove(m, err)

            if not token:  # nothing to refuse later: nothing to store
                removed()
                return None
            return self._stored(lambda st: st.remove(name, session, token, reason), removed)
        if action in ("mute", "allow_unmute"):
            muted = action == "mute"
            new = replace(self.standing.get(subject, Standing()), muted=muted)

            def applied() -> None:
                self.standing[subject] = new
                ctx.audit("muted" if muted else "unmute_allowed", actor=actor, subject=subject)
                for m in self._members_of(subject):
                    self.unmute_requested.discard(m.id)
                    ctx.set_muted(m, muted)
                    ctx.broadcast(self._state(m))

            return self._stored(lambda st: st.set_standing(name, session, subject, new), applied)
        return None

    async def _ban(self, target: MemberView, reason: str, actor: str, until: float | None) -> None:
        """A host's ban: stored (in a thread), then audited and every device of the identity
        removed; a ban that cannot be stored raises (the host's typed answer) and removes
        nobody."""
        ctx = self.ctx
        subject = target.identity.subject
        ban = await asyncio.to_thread(
            self.bans.add, ctx.name, subject, target.name, reason, actor, until
        )
        ctx.audit(
            "banned",
            actor=actor,
            subject=subject,
            member=target.id,
            ban=ban.id,
            until=int(until) if until is not None else None,
            reason=reason,
        )
        self._remove_banned(ban, actor)

    async def _unban(self, ban_id: int, actor: str) -> None:
        lifted = await asyncio.to_thread(self.bans.lift, self.ctx.name, ban_id, actor)
        if lifted is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, "no ban in force with that id")
        self.ctx.audit("unbanned", actor=actor, subject=lifted.subject, ban=lifted.id)
        self._send_bans()

    def _remove_banned(self, ban: Ban, actor: str) -> None:
        """Remove every device of a banned identity now in the room (each audited), and tell
        the hosts the bans in force."""
        err = ban_refusal(ban)
        err = ProtocolError(err.code, ban.reason or err.message)
        for m in self._members_of(ban.subject):  # a ban takes every device of the identity
            self.ctx.audit(
                "removed",
                actor=actor,
                subject=ban.subject,
                member=m.id,
                ban=True,
                reason=ban.reason,
            )
            self.ctx.remove(m, err, "removed")
        self._send_bans()

    async def ban_identity(
        self, subject: str, reason: str, actor: str, until: float | None, record: bool = True
    ) -> None:
        """An operator bans ``subject`` from this room (the admin API, on every server of a
        cluster): recorded (unless another server recorded it in a store they share; stored in
        a thread, so the event loop never waits for the database), every device of the
        identity removed, the hosts told. A ban that cannot be stored raises ProtocolError."""
        ctx = self.ctx
        present = self._members_of(subject)
        name = present[0].name if present else subject
        if record:
            ban = await asyncio.to_thread(
                self.bans.add, ctx.name, subject, name, reason, actor, until
            )
            ctx.audit(
                "banned",
                actor=actor,
                subject=subject,
                ban=ban.id,
                until=int(until) if until is not None else None,
                reason=reason,
            )
        else:
            ban = Ban(0, ctx.name, subject, name, reason, actor, time.time(), until)
        self._remove_banned(ban, actor)

    def _admit(self, lobby_id: int, actor: str) -> None:
        subject = self.ctx.lobby[lobby_id].subject
        self.ctx.admit(lobby_id)  # raises room_full (the waiter is turned away)
        self.ctx.audit("admitted", actor=actor, subject=subject)

    def _tell_grants(self, target: MemberView, new: Identity) -> None:
        update = Grants(target.id, new.role, tuple(sorted(new.grants)))
        for m in self.ctx.members.values():  # the member and the hosts, stepped out or not
            if m.id == target.id or _is_host(m):
                self.ctx.send(m, update)

    def _change_role(self, host: MemberView, msg: ChangeRole) -> Coroutine[Any, Any, None] | None:
        """A host changes a member's role, or gives or takes one grant; the member and the hosts
        are told, the change is audited, every plugin re-checks what the member may do, and
        the identity keeps the change for the rest of the session.

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
            return None
        subject = ident.subject
        standing = replace(self.standing.get(subject, Standing()), role=(new.role, new.grants))

        def applied() -> None:
            ctx.audit(
                "role_changed",
                actor=host.identity.subject,
                subject=subject,
                member=target.id,
                **change,
            )
            self.standing[subject] = standing
            for m in self._members_of(subject):
                if m.hidden:
                    continue
                changed = replace(m.identity, role=new.role, grants=new.grants)
                ctx.set_identity(m, changed)
                self._tell_grants(m, changed)

        name, session = ctx.name, self.session
        return self._stored(lambda st: st.set_standing(name, session, subject, standing), applied)


class ModerationService(ServerPlugin):
    """Moderation for every room: the store of bans, shared by the rooms' :class:`Moderation`
    instances, and the answer to whether an identity is barred from a room that is not open
    now (the asset routes ask)."""

    room_plugin = Moderation

    def __init__(
        self, store: BanBackend | None = None, standing: StandingBackend | None = None
    ) -> None:
        self._store = store
        self._own = store is None
        self._standing = standing
        self._own_standing = standing is None
        self._ends: dict[str, asyncio.Task[None]] = {}

    def use_store(self, store: BanBackend) -> None:
        """Keep bans in ``store`` instead of the data directory's SQLite file (unless a store
        was given when the plugin was made); before :meth:`start`."""
        if self._store is None:
            self._store = store

    def use_standing_store(self, store: StandingBackend) -> None:
        """Keep rooms' removals and standing in ``store`` instead of the data directory's
        SQLite file (unless one was given when the plugin was made); before :meth:`start`."""
        if self._standing is None:
            self._standing = store

    @property
    def store(self) -> BanBackend:
        if self._store is None:  # not started (a room made in a test): bans in memory
            self._store = BanStore(":memory:")
        return self._store

    def create(self, ctx: RoomContext) -> RoomPlugin:
        return Moderation(ctx, self.store, self._standing, self._ends)

    async def start(self, server: ServerContext) -> None:
        if self._store is None:
            self._store = BanStore.in_dir(server.config.data_dir)
        if self._standing is None:
            self._standing = SQLiteStandingStore.in_dir(server.config.data_dir)

    async def stop(self) -> None:
        if self._own and self._store is not None:
            self._store.close()
            self._store = None
        if self._own_standing and self._standing is not None:
            self._standing.close()
            self._standing = None

    def refusal(self, room: str, identity: Identity) -> ProtocolError | None:
        """A ban of ``identity`` from ``room`` in force now, as the error it gets."""
        bans = self.store.active(room, identity.subject)
        return ban_refusal(bans[0]) if bans else None

    async def stored_refusal(
        self, room: str, identity: Identity, config: ServerConfig
    ) -> ProtocolError | None:
        """Like :meth:`refusal`, for a room that is not open on this server: a ban, or the
        removal of the identity's token from the room's session while that session lives on
        (on another server of the cluster, or until this one opens the room again). The
        stored removals are read in a thread."""
        refused = self.refusal(room, identity)
        if refused is not None or self._standing is None or not identity.token_id:
            return refused
        why = await asyncio.to_thread(
            self._standing.removal, room, identity.token_id, alive_since(config)
        )
        return None if why is None else removal_refusal(why)
