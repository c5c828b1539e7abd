"""The state machine of one medverse connection, sans-I/O, for both ends.

Like ``h11.Connection`` or aioquic's ``QuicConnection``, a :class:`Connection` does no I/O and
knows no clock: the caller feeds it each WebSocket message it reads (:meth:`Connection.receive`
returns one event) and asks it for the bytes of each control message it wants to write
(:meth:`Connection.send` returns the frame and applies the transition). It decides only what the
protocol itself decides: which input is allowed in which state, which refusal a wrong input
gets and whether it is fatal, and which sends move the connection to which state. Everything
that needs the world (tokens, rooms, lobbies, grants, rate limits, pose sequence numbers) stays
with the caller. ``protocol/SPEC.md`` ("Connection states") is the same table in prose, and
``protocol/vectors/connection.json`` replays it step by step.

Server end::

    conn = Connection(Role.SERVER)
    ev = conn.receive(data, text=is_text)  # every WebSocket message, in order
    if isinstance(ev, Refused):
        ws.send(conn.send(Error.of(ev.error, ev.fatal)))  # fatal: close right after
    elif isinstance(ev, MessageReceived) and isinstance(ev.message, Hello):
        ws.send(conn.send(Welcome(...)))  # or ConsentRequired, Waiting, a fatal Error
    elif isinstance(ev, PoseReceived):
        world.submit_pose(member, ev.frame)
    if conn.state is State.CLOSING:
        ws.close()

Client end::

    conn = Connection(Role.CLIENT)
    ws.send(conn.send(Hello(PROTOCOL_VERSION, "ward-3", "Dr Who", 3, None, token)))
    while conn.state is not State.JOINED:
        ev = conn.receive(ws.recv())
        if isinstance(ev, MessageReceived) and isinstance(ev.message, ConsentRequired):
            ws.send(conn.send(Consent(ev.message.version, True)))
        elif conn.state is State.CLOSING:
            raise JoinRefused(ev)
    ev = conn.receive(ws.recv())  # StateReceived(frame) for state frames from now on
    ws.send(conn.send(Pause(True)))  # state PAUSED until Pause(False)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeAlias

from .catalog import CLIENT_MESSAGES, SERVER_MESSAGES
from .clinic import Moved
from .errors import ErrorCode, ProtocolError
from .messages import (
    FRAME_CONTROL,
    FRAME_POSE,
    MAX_CONTROL_BYTES,
    PROTOCOL_VERSION,
    Consent,
    ConsentRequired,
    Error,
    Hello,
    Leave,
    Message,
    Pause,
    Ping,
    Pong,
    Redirect,
    Waiting,
    Welcome,
    check_pose_frame,
    decode_message,
    encode_message,
)
from .snapshot import FRAME_STATE

_CONTROL_KIND = bytes((FRAME_CONTROL,))

#: Largest control frame a client accepts from the server: welcomes list every member.
MAX_SERVER_CONTROL_BYTES = 1 << 24


class Role(enum.Enum):
    """Which end of the connection this state machine runs."""

    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """Where a connection is. Both ends move through the same states, each on its own sends
    and receipts, so they agree once the frames in flight have arrived."""

    HELLO = "hello"  # server: open, no hello answered yet; client: hello not answered yet
    CONSENT = "consent"  # consent_required sent/received: the member's answer pending
    LOBBY = "lobby"  # waiting sent/received: until welcome or a fatal error
    JOINED = "joined"  # welcome sent/received
    PAUSED = "paused"  # the member stepped out (pause true)
    CLOSING = "closing"  # leave, a fatal error or a consent withdrawal: only the close follows
    CLOSED = "closed"  # the transport is gone


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A control message that is allowed in the state it arrived in."""

    message: Message


@dataclass(frozen=True, slots=True)
class PoseReceived:
    """Server end: a pose frame of the right size for the hello's ``slots`` (values are not
    checked here; the tick's batch does that)."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class StateReceived:
    """Client end: a state frame (kind ``0x02``), whole and not decoded."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class FrameReceived:
    """A binary frame of another kind (a feature's, e.g. ``0x04`` object moves), whole."""

    kind: int
    frame: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    """The input is refused with ``error``. A server end answers with the error (``Error.of``);
    when ``fatal`` it sends it as fatal and closes (the connection is already CLOSING). A client
    end, which has no error message to send, reports it and carries on."""

    error: ProtocolError
    fatal: bool


@dataclass(frozen=True, slots=True)
class Ignored:
    """Input the rules drop without an answer (poses while paused, anything while closing)."""

    reason: str


#: What :meth:`Connection.receive` returns.
Event: TypeAlias = (
    MessageReceived | PoseReceived | StateReceived | FrameReceived | Refused | Ignored
)


class LocalProtocolError(Exception):
    """This end tried to send something its state does not allow: a bug in the caller."""


# --------------------------------------------------------------------------- the machine

_BEFORE_CLOSING = frozenset((State.HELLO, State.CONSENT, State.LOBBY, State.JOINED, State.PAUSED))
_IN_ROOM = frozenset((State.JOINED, State.PAUSED))
_WELCOME_FROM = frozenset((State.CONSENT, State.LOBBY, State.JOINED, State.PAUSED))
_PING_IN = frozenset((State.CONSENT, State.LOBBY, State.JOINED, State.PAUSED))
_ENDED = frozenset((State.CLOSING, State.CLOSED))


class Connection:
    """One medverse connection as seen from ``role``'s end.

    ``max_control_bytes`` bounds the control frames a server accepts from its client (the
    client end always accepts server control frames up to :data:`MAX_SERVER_CONTROL_BYTES`).
    ``client_messages`` and ``server_messages`` are the registries of the messages each side
    may send (by default every family of :mod:`.catalog`; a server passes the core's and its
    room plugins', a client those it knows).
    """

    def __init__(
        self,
        role: Role,
        *,
        max_control_bytes: int = MAX_CONTROL_BYTES,
        client_messages: Mapping[str, type[Message]] = CLIENT_MESSAGES,
        server_messages: Mapping[str, type[Message]] = SERVER_MESSAGES,
    ) -> None:
        self.role: Role = role
        self.state: State = State.HELLO
        #: Pose slots from the hello (server: received; client: sent).
        self.slots: int | None = None
        #: The hello received (server) or sent (client); None before.
        self.hello: Hello | None = None
        self.max_control_bytes = max_control_bytes
        #: A ``moved`` was sent (server) or received (client) and the target room's
        #: ``welcome`` has not followed yet: the member is between rooms.
        self.moving = False
        self.client_messages = client_messages
        self.server_messages = server_messages

    def __repr__(self) -> str:
        return f"<Connection {self.role.value} {self.state.value}>"

    # ----------------------------------------------------------------- input

    def receive(self, data: bytes | bytearray | memoryview, *, text: bool = False) -> Event:
        """Handle one whole WebSocket message from the peer (``text``: it was a text message)
        and say what it is. Never raises on bad input: a refusal is a :class:`Refused` event."""
        if self.state in _ENDED:
            return Ignored(self.state.value)
        frame = data if isinstance(data, bytes) else bytes(data)
        if self.role is Role.SERVER:
            event = self._server_receive(frame, text)
        else:
            event = self._client_receive(frame, text)
        if isinstance(event, Refused) and event.fatal:
            # Nothing more is read once the fatal error is due; sending it stays allowed.
            self.state = State.CLOSING
        return event

    def _server_receive(self, frame: bytes, text: bool) -> Event:
        state = self.state
        if text:
            # Before the member is in the room a text message ends the connection, as a bad
            # handshake does; in the room it is one more refused input.
            return _refuse(ErrorCode.MALFORMED, "binary frames only", state not in _IN_ROOM)
        if self.moving and frame[:1] != _CONTROL_KIND:
            # Poses and plugin frames sent in the old room before the member learnt it was
            # moved: they belong to no room now, and are not the member's fault.
            return Ignored("moving")
        if state is State.HELLO:
            return self._server_hello(frame)
        if state is State.CONSENT:
            msg = self._client_control(frame)
            if isinstance(msg, Consent | Ping | Leave):
                return self._accept(msg)
            return _refuse(ErrorCode.CONSENT_REQUIRED, "answer the consent first")
        if state is State.LOBBY:
            msg = self._client_control(frame)
            if isinstance(msg, Ping | Leave):
                return self._accept(msg)
            return _refuse(ErrorCode.FORBIDDEN, "waiting in the lobby")
        return self._server_in_room(frame)

    def _server_hello(self, frame: bytes) -> Event:
        msg = decode_message(frame, self.client_messages, self.max_control_bytes)
        if self.hello is None:
            # The first frame: anything but a valid hello of our version ends the connection.
            if isinstance(msg, ProtocolError):
                return Refused(msg, True)
            if not isinstance(msg, Hello):
                return _refuse(
                    ErrorCode.HANDSHAKE_REQUIRED, "the first message must be hello", True
                )
            if msg.version != PROTOCOL_VERSION:
                return _refuse(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"server speaks protocol {PROTOCOL_VERSION}, client {msg.version}",
                    True,
                )
            self.hello = msg
            self.slots = msg.slots
            return MessageReceived(msg)
        # Hello received, answer not sent yet: a client that follows the rules sends nothing
        # but leave here, and nothing here is worth closing the connection over.
        if isinstance(msg, ProtocolError):
            return Refused(msg, False)
        if isinstance(msg, Hello):
            return _refuse(ErrorCode.ALREADY_JOINED, "hello already received")
        if isinstance(msg, Leave):
            return self._accept(msg)
        return _refuse(ErrorCode.HANDSHAKE_REQUIRED, "wait for the answer to hello")

    def _server_in_room(self, frame: bytes) -> Event:
        if not frame:
            return Ignored("empty frame")
        kind = frame[0]
        if kind == FRAME_POSE:
            if self.state is State.PAUSED:
                return Ignored("paused")  # stepped out: nothing of the member reaches the room
            assert self.slots is not None  # set with the hello, before any welcome
            err = check_pose_frame(frame, self.slots)
            return PoseReceived(frame) if err is None else Refused(err, False)
        if kind == FRAME_CONTROL:
            msg = decode_message(frame, self.client_messages, self.max_control_bytes)
            if isinstance(msg, ProtocolError):
                return Refused(msg, False)
            if isinstance(msg, Hello):
                return _refuse(ErrorCode.ALREADY_JOINED, "already joined")
            return self._accept(msg)
        if kind == FRAME_STATE:
            return _refuse(ErrorCode.MALFORMED, "unknown frame kind 0x02")
        return FrameReceived(kind, frame)

    def _client_receive(self, frame: bytes, text: bool) -> Event:
        if text:
            return _refuse(ErrorCode.MALFORMED, "binary frames only")
        if not frame:
            return _refuse(ErrorCode.MALFORMED, "empty frame")
        kind = frame[0]
        if kind == FRAME_CONTROL:
            msg = decode_message(frame, self.server_messages, MAX_SERVER_CONTROL_BYTES)
            if isinstance(msg, ProtocolError):
                return Refused(msg, False)
            after = self._send_rule(msg, Role.SERVER)
            if after is None:
                return _refuse(_CLIENT_REFUSAL[self.state], f"{msg.TYPE} not expected now")
            if self.state is State.PAUSED and after is State.JOINED:
                # Only our own pause(false) ends a pause: a welcome that crossed our
                # pause(true) on the wire must not leave us JOINED while the server is PAUSED.
                after = State.PAUSED
            self._note_move(msg)
            self.state = after
            return MessageReceived(msg)
        if self.state not in _IN_ROOM:
            return _refuse(ErrorCode.MALFORMED, f"frame kind 0x{kind:02x} before welcome")
        if kind == FRAME_STATE:
            return StateReceived(frame)
        return FrameReceived(kind, frame)

    def _client_control(self, frame: bytes) -> Message | ProtocolError | None:
        """Decode a client's control frame (None for a frame of another kind)."""
        if frame[:1] != _CONTROL_KIND:
            return None
        return decode_message(frame, self.client_messages, self.max_control_bytes)

    def _accept(self, msg: Message) -> MessageReceived:
        """A client message the server end takes: apply its transition."""
        if isinstance(msg, Leave):
            self.state = State.CLOSING
        elif isinstance(msg, Pause) and self.state in _IN_ROOM:
            self.state = State.PAUSED if msg.paused else State.JOINED
        elif isinstance(msg, Consent) and not msg.accept and self.state in _IN_ROOM:
            self.state = State.CLOSING  # withdrawing consent leaves the room
        return MessageReceived(msg)

    # ----------------------------------------------------------------- output

    def send(self, msg: Message) -> bytes:
        """The control frame for ``msg`` (``encode_message``), after moving to the state it
        leads to. Raises :class:`LocalProtocolError` (and changes nothing) if this end may not
        send ``msg`` now."""
        after = self._send_rule(msg)
        if after is None:
            raise LocalProtocolError(
                f"{self.role.value} may not send {msg.TYPE!r} in state {self.state.value}"
            )
        frame = encode_message(msg)
        if isinstance(msg, Hello):
            self.hello = msg
            self.slots = msg.slots
        self._note_move(msg)
        self.state = after
        return frame

    def _note_move(self, msg: Message) -> None:
        """A ``moved`` starts a move between rooms; the target room's ``welcome`` ends it."""
        if isinstance(msg, Moved):
            self.moving = True
        elif isinstance(msg, Welcome):
            self.moving = False

    def closed(self) -> None:
        """The transport is gone (either side closed it, or it broke)."""
        self.state = State.CLOSED

    def accepts(self, msg_type: type[Message] | Message) -> bool:
        """May this end send ``msg_type`` now? Changes nothing.

        Given a type, the answer is True if some message of that type may be sent; for
        ``Error`` (fatal or not), ``Pause`` and ``Consent`` the fields decide, so pass the
        message itself for the exact answer :meth:`send` would give.
        """
        if isinstance(msg_type, Message):
            return self._send_rule(msg_type) is not None
        if msg_type is Error:
            samples: tuple[Message, ...] = (Error("", "", True), Error("", "", False))
        elif msg_type is Pause:
            samples = (Pause(True), Pause(False))
        elif msg_type is Consent:
            samples = (Consent("", True), Consent("", False))
        else:
            return self._type_rule(msg_type, self.role) is not None
        return any(self._send_rule(m) is not None for m in samples)

    def _send_rule(self, msg: Message, role: Role | None = None) -> State | None:
        """The state that ``role`` (this end by default) sending ``msg`` leads to, or None if
        it may not send ``msg`` now. The client end also uses the server's rules to judge
        what it receives."""
        role = self.role if role is None else role
        state = self.state
        if role is Role.SERVER and isinstance(msg, Error) and msg.fatal:
            return State.CLOSING if state is not State.CLOSED else None
        if role is Role.CLIENT and isinstance(msg, Consent):
            if state is State.CONSENT:
                return State.CONSENT  # the server's welcome, waiting or fatal error moves on
            if state in _IN_ROOM and not msg.accept:
                return State.CLOSING  # a withdrawal: the server removes us and closes
            return None
        if role is Role.CLIENT and isinstance(msg, Pause):
            if state is State.JOINED and msg.paused:
                return State.PAUSED
            if state is State.PAUSED and not msg.paused:
                return State.JOINED
            return None
        return self._type_rule(type(msg), role)

    def _type_rule(self, msg_type: type[Message], role: Role) -> State | None:
        """:meth:`_send_rule` for the types whose fields do not matter to the rules."""
        state = self.state
        hello = self.hello is not None
        if role is Role.SERVER:
            if self.server_messages.get(msg_type.TYPE) is not msg_type:
                return None
            if msg_type is Moved:
                # The member leaves its room; the target room's entry follows as after a
                # hello (consent_required, waiting or welcome). A member that declines the
                # consent of the room it was moved to is moved back (still moving).
                back = state is State.CONSENT and self.moving
                return State.HELLO if state in _IN_ROOM or back else None
            if msg_type is ConsentRequired:
                return State.CONSENT if state is State.HELLO and hello else None
            if msg_type is Waiting:
                ok = (state is State.HELLO and hello) or state is State.CONSENT
                return State.LOBBY if ok else None
            if msg_type is Welcome:
                ok = (state is State.HELLO and hello) or state in _WELCOME_FROM
                return State.JOINED if ok else None
            if msg_type is Redirect:
                # The room lives elsewhere: only the close follows, from any state the hello
                # has been read in.
                ok = (state is State.HELLO and hello) or state in _BEFORE_CLOSING - {State.HELLO}
                return State.CLOSING if ok else None
            if msg_type is Pong or msg_type is Error:  # Error here: a non-fatal one
                return state if state in _BEFORE_CLOSING else None
            return state if state in _IN_ROOM else None
        if self.client_messages.get(msg_type.TYPE) is not msg_type:
            return None
        if msg_type is Hello:
            return state if state is State.HELLO and not hello else None
        if msg_type is Leave:
            # Before its hello a client just closes: the server refuses anything but hello.
            return State.CLOSING if state in _BEFORE_CLOSING and hello else None
        if msg_type is Ping:
            return state if state in _PING_IN else None
        return state if state in _IN_ROOM else None


def _refuse(code: ErrorCode, message: str, fatal: bool = False) -> Refused:
    return Refused(ProtocolError(code, message), fatal)


# The code a client end refuses an out-of-place server message with: the one the server uses
# for out-of-place input in the same state.
_CLIENT_REFUSAL = {
    State.HELLO: ErrorCode.HANDSHAKE_REQUIRED,
    State.CONSENT: ErrorCode.CONSENT_REQUIRED,
    State.LOBBY: ErrorCode.FORBIDDEN,
    State.JOINED: ErrorCode.ALREADY_JOINED,
    State.PAUSED: ErrorCode.ALREADY_JOINED,
}

__all__ = [
    "MAX_SERVER_CONTROL_BYTES",
    "Connection",
    "Event",
    "FrameReceived",
    "Ignored",
    "LocalProtocolError",
    "MessageReceived",
    "PoseReceived",
    "Refused",
    "Role",
    "State",
    "StateReceived",
]
