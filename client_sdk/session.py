"""The client session: connect, join, send poses, read avatars, reconnect by itself."""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import json
import logging
import math
import os
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import aiohttp
import numpy as np

from medverse.protocol.catalog import CLIENT_MESSAGES, SERVER_MESSAGES
from medverse.protocol.clinic import Access as AccessMsg
from medverse.protocol.clinic import Called, CallNext, MoveDeclined, SendBack, Transfer
from medverse.protocol.clinic import Moved as MovedMsg
from medverse.protocol.clinic import Queue as QueueMsg
from medverse.protocol.connection import (
    Connection,
    MessageReceived,
    Refused,
    Role,
    State,
    StateReceived,
)
from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Bans,
    ChangeRole,
    ConsentRequired,
    Error,
    Grants,
    Hello,
    Joined,
    Leave,
    Left,
    Lobby,
    MemberState,
    Message,
    Moderate,
    Pause,
    Ping,
    Pong,
    Redirect,
    RequestRefused,
    RequestUnmute,
    RoomState,
    Waiting,
    Welcome,
    encode_pose,
)
from medverse.protocol.messages import (
    Consent as ConsentMsg,
)
from medverse.protocol.quant import dequantize_positions, dequantize_rotations
from medverse.protocol.snapshot import FRAME_STATE, OBJECT_ID_BASE, Snapshot, SnapshotDecoder

from .assets import AssetClient, AssetInfo
from .audio import AudioClient
from .images import ImagesAPI, PanelsClient
from .objects import ObjectsAPI, ObjectsClient
from .types import (
    Arrived,
    Avatar,
    BanEntry,
    BansChanged,
    Closed,
    EntryChanged,
    Event,
    GrantsChanged,
    LobbyChanged,
    LobbyEntry,
    Moved,
    Pose,
    QueueChanged,
    Reconnecting,
    RefusedError,
    Resumed,
    from_message,
)

log = logging.getLogger("medverse.client")

_STATE_KIND = bytes((FRAME_STATE,))

#: Errors after which reconnecting cannot help.
_FINAL_CODES = {
    ErrorCode.UNSUPPORTED_VERSION.value,
    ErrorCode.ROOM_FULL.value,
    ErrorCode.HANDSHAKE_REQUIRED.value,
    ErrorCode.BAD_FIELD.value,
    ErrorCode.OUT_OF_RANGE.value,
    ErrorCode.UNAUTHORIZED.value,
    ErrorCode.TOKEN_EXPIRED.value,
    ErrorCode.TOO_MANY_CONNECTIONS.value,
    ErrorCode.CONSENT_REQUIRED.value,
    ErrorCode.BANNED.value,
    ErrorCode.SESSION_ENDED.value,
    ErrorCode.DENIED.value,
    ErrorCode.REMOVED.value,
}
#: Close code of a connection the server closed after a consent withdrawal.
CLOSE_CONSENT = 4011
#: Redirects followed in a row before a join counts as failed (servers that keep sending a
#: client elsewhere disagree about where the room lives; reconnecting later may help).
MAX_REDIRECTS = 5


class _Redirected(Exception):
    """The server answered our hello with ``redirect``: the room lives at ``url``."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


class JoinError(Exception):
    """The server refused the join; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _token_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (the server verifies; we only read our own name)."""
    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _display_name(name: str | None, token: str | None) -> str:
    """The name others will see: with a token, the token's ``name`` wins over ``name``."""
    claimed = _token_claims(token).get("name") if token else None
    if isinstance(claimed, str) and claimed:
        if name is not None and name != claimed:
            log.warning(
                "connect(name=%r) is not what others see: the join token's name %r wins",
                name,
                claimed,
            )
        return claimed
    return name or "member"


def _ws_url(url: str) -> str:
    base = url.rstrip("/")
    scheme_end = base.find("://")
    path_start = base.find("/", scheme_end + 3 if scheme_end >= 0 else 0)
    return base if path_start >= 0 else base + "/ws"


def _poses(pos: np.ndarray, rot: np.ndarray, present: np.ndarray) -> tuple[Pose | None, ...]:
    """Rows of metres and quaternions as Pose values (None where a slot is absent)."""
    return tuple(
        Pose((p[0], p[1], p[2]), (q[0], q[1], q[2], q[3])) if ok else None
        for p, q, ok in zip(pos.tolist(), rot.tolist(), present.tolist(), strict=True)
    )


def _slerp(q0: np.ndarray, q1: np.ndarray, a: float) -> np.ndarray:
    """Spherical interpolation of quaternion rows (k, 4), shortest path."""
    dot = np.sum(q0 * q1, axis=-1, keepdims=True)
    q1 = np.where(dot < 0, -q1, q1)
    dot = np.abs(dot)
    theta = np.arccos(np.clip(dot, -1.0, 1.0))
    sin = np.sin(theta)
    small = sin < 1e-6
    w0 = np.where(small, 1.0 - a, np.sin((1.0 - a) * theta) / np.where(small, 1.0, sin))
    w1 = np.where(small, a, np.sin(a * theta) / np.where(small, 1.0, sin))
    out = w0 * q0 + w1 * q1
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


class Session(ObjectsAPI, ImagesAPI):
    """A member's connection to a room. Create it with :func:`connect`.

    Attributes kept current while connected: ``member_id``, ``room``, ``rate`` (ticks per
    second), ``rtt`` (last measured round trip, seconds), ``members`` ({id: name} of the others).
    """

    def __init__(
        self,
        url: str,
        room: str,
        name: str | None = None,
        *,
        slots: int = 3,
        reconnect: bool = True,
        max_backoff: float = 5.0,
        interpolation_delay: float | None = None,
        history: int = 64,
        connect_timeout: float = 10.0,
        ping_interval: float = 2.0,
        token: str | None = None,
        ssl: Any = None,
        consent: Callable[[str, str], bool] | None = None,
        messages: Sequence[type[Message]] = (),
        receive_state: bool = True,
        on_waiting: Callable[[Waiting], None] | None = None,
        lobby_timeout: float | None = None,
        fallback_urls: Sequence[str] = (),
    ) -> None:
        self.url = _ws_url(url)
        #: Other servers of the cluster, tried in turn after the given URL when reconnecting
        #: fails (the server we knew may be the one that died).
        self.fallback_urls = [_ws_url(u) for u in fallback_urls]
        self._fallback = 0
        #: The URL the application gave: where reconnecting goes back to when the server a
        #: redirect named cannot be reached (it may have died; another takes its rooms).
        self.entry_url = self.url
        #: Where the server last redirected a joined member (the room moved); None otherwise.
        self._redirected_to: str | None = None
        #: The transfer grant of a ``redirect`` that moves us to a room another server runs:
        #: our next hello's token in place of the join token, until a welcome.
        self._transfer_grant: str | None = None
        #: Redirects followed since the application started the session.
        self.redirects = 0
        #: False: state frames are dropped unread (bots that use the room for signaling only).
        self.receive_state = receive_state
        self.room = room
        #: Our display name as the others see it: the join token's ``name`` (the server shows
        #: that, or the token's pseudonym in pseudonymous rooms), else ``name``.
        self.name = _display_name(name, token)
        self.slots = slots
        self.reconnect = reconnect
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        #: Called when the room puts us in its lobby (start() goes on waiting for a host).
        self.on_waiting = on_waiting
        #: Seconds start() waits in a lobby before giving up (None: until admitted or
        #: denied; an application may also cancel start() under its own time limit).
        self.lobby_timeout = lobby_timeout
        #: While start() waits in a lobby, or a room we were moved to keeps us in its lobby:
        #: the Waiting event (lobby id); None otherwise.
        self.waiting: Waiting | None = None
        #: In a waiting room: our place in the queue as last told (None elsewhere).
        self.queue: QueueChanged | None = None
        #: Between a ``moved`` and the welcome of the room we were moved to: that room.
        self.moving_to: str | None = None
        self.ping_interval = ping_interval
        self.token = token
        #: After a move: the server's credential for the HTTP APIs (assets, image series) of
        #: the room we are in now, whose join token names the room we first entered. The
        #: server sends a fresh one (``access``) before it expires; the HTTP clients follow.
        self.room_access: str | None = None
        self._ssl = ssl
        #: Asked (version, text) when a room requires consent; True accepts.
        self.consent = consent
        self.consent_version: str | None = None
        self.member_id: int = 0
        self.rate: int = 30
        self.rtt: float | None = None
        self.members: dict[int, str] = {}
        self._interp = interpolation_delay
        # What this client speaks: every family of the protocol, and an application's own
        # (``messages``, or classes feature clients register with add_handler).
        self._client_messages = dict(CLIENT_MESSAGES)
        self._server_messages = dict(SERVER_MESSAGES)
        for cls in messages:
            self._learn(cls)
        #: The connection's state machine (a new one per connection).
        self._conn: Connection | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._resume: str | None = None
        self._decoder = SnapshotDecoder()
        self._history: deque[tuple[float, Snapshot]] = deque(maxlen=history)
        self._offsets: deque[float] = deque(maxlen=90)
        self._offset = 0.0
        self._seq = 0
        self._outbox: bytes | None = None
        self._out_ready = asyncio.Event()
        self._events: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=10_000)
        self._pings: dict[int, asyncio.Future[float]] = {}
        self._ping_id = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self._closing = False
        self._connected = asyncio.Event()
        self._avatars: dict[int, Avatar] | None = None
        self._close_task: asyncio.Future[Any] | None = None
        #: How the session ended (None while it runs): see :class:`Closed`.
        self.closed_reason: Closed | None = None
        # Set when the server ended the session for good (a fatal error that reconnecting
        # cannot undo, or our consent withdrawal): no reconnection follows.
        self._ending: Closed | None = None
        #: The ending a consent declined after a move set (until the server moves us back).
        self._declined: Closed | None = None
        self._ended = asyncio.Event()
        # Acknowledged requests (moderation, pause, audio routing) waiting for their answer.
        self._requests: dict[int, tuple[asyncio.Future[None], type[RefusedError]]] = {}
        self._req = 0
        self.frames_received = 0
        self.bytes_received = 0
        #: Called with (local receive time, snapshot) after every state frame (for tools).
        self.on_state: Any = None
        # Feature clients (objects, audio) hook in here: handlers of their server messages,
        # and callbacks run after every (re)connection with the welcome.
        self._handlers: dict[type[Message], list[Callable[[Message], None]]] = {}
        self._connected_hooks: list[Callable[[Welcome], None]] = []
        self._assets: AssetClient | None = None
        #: Our role and grants as a host last changed them (None: as the join token says).
        self.role: str | None = None
        self.grants: frozenset[str] | None = None
        self._audio: AudioClient | None = None
        #: The room's shared objects ({object_id: SharedObject}); the object calls (spawn,
        #: grab, move, release, annotate, ...) are methods of the session.
        self.objects = ObjectsClient(self)
        #: The room's image panels ({panel_id: ImagePanel}), their measurements and pointers;
        #: the image calls (upload_series, open_panel, set_image_view, measure, ...) are
        #: methods of the session.
        self.panels = PanelsClient(self)

    @property
    def state(self) -> State:
        """Where the connection is: ``hello``, ``consent``, ``lobby``, ``joined``, ``paused``,
        ``closing`` or ``closed`` (see protocol/SPEC.md, "Connection states")."""
        return self._conn.state if self._conn is not None else State.CLOSED

    def _learn(self, cls: type[Message]) -> None:
        """Add an application's message class to both decoders' registries."""
        for registry in (self._client_messages, self._server_messages):
            if registry.setdefault(cls.TYPE, cls) is not cls:
                raise ValueError(f"message type {cls.TYPE!r} is already taken")

    @property
    def audio(self) -> AudioClient:
        """This member's spatial audio (publish, receive the mix, mute, routing rules)."""
        if self._audio is None:
            self._audio = AudioClient(self)
        return self._audio

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Session:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect and join; raises :class:`JoinError` or a connection error on failure."""
        self._http = aiohttp.ClientSession()
        try:
            await self._open()
        except BaseException:
            await self._http.close()
            raise
        loop = asyncio.get_running_loop()
        self._tasks += [
            loop.create_task(self._run(), name="medverse-reader"),
            loop.create_task(self._sender(), name="medverse-sender"),
        ]
        if self.ping_interval > 0:
            self._tasks.append(loop.create_task(self._pinger(), name="medverse-pinger"))

    async def close(self) -> None:
        """Leave the room and close the connection."""
        if self._closing:
            return
        self._closing = True
        if self._audio is not None:
            with contextlib.suppress(Exception):
                await self._audio.close()
        ws = self._ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                if self._conn is not None and self._conn.accepts(Leave):
                    await ws.send_bytes(self._conn.send(Leave()))
                await ws.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._http is not None:
            await self._http.close()
        if self._assets is not None:
            await self._assets.close()
        if self._image_client is not None:
            await self._image_client.close()
        self._finish(Closed("closed by the application", "closed"))

    async def _open(self) -> Welcome:
        """Connect and join, following the servers' redirects (at most
        :data:`MAX_REDIRECTS` in a row) to the server that runs the room."""
        deadline = time.monotonic() + self.connect_timeout
        hops = 0
        while True:
            try:
                return await self._open_once()
            except _Redirected as moved:
                hops += 1
                if hops > MAX_REDIRECTS:
                    raise ConnectionError(
                        f"more than {MAX_REDIRECTS} redirects in a row for room {self.room}"
                    ) from None
                log.debug("room %s lives at %s: following", self.room, moved.url)
                self.url = moved.url
                self.redirects += 1
            except JoinError as err:
                # Its server stopped and another takes the room within seconds: ask again
                # (through the URL we were given) until connect_timeout.
                if err.code != ErrorCode.ROOM_MOVING.value or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
                self.url = self.entry_url
                hops = 0
            except (aiohttp.ClientConnectionError, OSError):
                # A live server redirected us to one that is gone (killed moments ago: its
                # entry and the room's lease run out within the cluster's lease time): ask
                # the live one again shortly, until connect_timeout.
                if hops == 0 or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
                self.url = self.entry_url
                hops = 0

    async def _open_once(self) -> Welcome:
        assert self._http is not None
        ws = await self._http.ws_connect(
            self.url,
            autoping=True,
            heartbeat=None,
            compress=0,
            max_msg_size=8 * 1024 * 1024,
            timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
            ssl=self._ssl if self._ssl is not None else True,
        )
        conn = Connection(
            Role.CLIENT,
            client_messages=self._client_messages,
            server_messages=self._server_messages,
        )
        try:
            token = self._transfer_grant or self.token
            hello = Hello(PROTOCOL_VERSION, self.room, self.name, self.slots, self._resume, token)
            await ws.send_bytes(conn.send(hello))
            # session.state shows the join as it goes (consent, lobby) while start() waits.
            self._conn = conn
            welcome = await self._await_welcome(ws, conn)
        except BaseException:
            # An application's own time limit (a cancelled start()) lands here too: closing
            # takes us out of the lobby.
            self.waiting = None
            await ws.close()
            raise
        self.waiting = None
        self._transfer_grant = None  # used: resumes go with the join token and resume token
        self._conn = conn
        self._ws = ws
        # A member moved to another room resumes there; if it could not, the server let it
        # in anew where its token admits it: the welcome says which room this is.
        if welcome.room != self.room and self.moving_to is None:
            # Back in the room our join token names: the move's credential is for another.
            self.room_access = None
            self.room = welcome.room
            self._retarget_http()
        self.room = welcome.room
        self.member_id = welcome.member_id
        self.rate = welcome.rate
        self._resume = welcome.resume
        self.members = {m.id: m.name for m in welcome.members}
        self._decoder.reset()
        self._history.clear()
        self._offsets.clear()
        self._avatars = None
        self._connected.set()
        if self._outbox is not None:
            self._out_ready.set()
        for hook in self._connected_hooks:
            hook(welcome)
        return welcome

    def add_handler(self, cls: type[Message], handler: Callable[[Any], None]) -> None:
        """Call ``handler`` with every server message of type ``cls`` (for feature clients and
        applications; a message class the protocol does not know is learnt)."""
        if self._server_messages.get(cls.TYPE) is not cls:
            self._learn(cls)
        self._handlers.setdefault(cls, []).append(handler)

    def add_connected_hook(self, hook: Callable[[Welcome], None]) -> None:
        """Call ``hook`` with the welcome after every connection, first and resumed."""
        self._connected_hooks.append(hook)

    async def _await_welcome(
        self, ws: aiohttp.ClientWebSocketResponse, conn: Connection
    ) -> Welcome:
        """Read until ``welcome``, answering a consent request on the way, within
        ``connect_timeout``. In a room with a lobby the wait goes on until a host admits us
        (``Waiting`` event, ``on_waiting`` callback, :attr:`waiting`) or denies us
        (``JoinError``), for at most ``lobby_timeout`` seconds if given (then TimeoutError)."""
        deadline: float | None = time.monotonic() + self.connect_timeout
        while True:
            timeout = None if deadline is None else max(0.01, deadline - time.monotonic())
            try:
                msg = await ws.receive(timeout=timeout)
            except TimeoutError:
                if self.waiting is not None:
                    raise TimeoutError(
                        f"not admitted from the lobby within {self.lobby_timeout} s"
                    ) from None
                raise TimeoutError("no welcome from the server in time") from None
            if msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.ERROR,
            ):
                raise ConnectionError(f"connection closed during join ({ws.close_code})")
            if msg.type not in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                continue
            ev = conn.receive(msg.data, text=msg.type == aiohttp.WSMsgType.TEXT)
            if not isinstance(ev, MessageReceived):
                continue  # nothing else is expected before the welcome
            m = ev.message
            if isinstance(m, Welcome):
                return m
            if isinstance(m, Redirect):
                raise _Redirected(m.url)
            if isinstance(m, ConsentRequired):
                self.consent_version = m.version
                if self.consent is None:
                    # Nobody was asked, so nothing is answered (an answer would be audited as
                    # the user's decline): the connection closes and the error names what
                    # is missing.
                    await ws.close()
                    raise JoinError(
                        ErrorCode.CONSENT_REQUIRED.value,
                        f"room {self.room} asks for consent and connect() was given no "
                        "consent= callback to ask the user (consent=lambda version, text: ...)",
                    )
                accept = bool(self.consent(m.version, m.text))
                await ws.send_bytes(conn.send(ConsentMsg(m.version, accept)))
                continue
            if isinstance(m, Waiting):
                lobby = self.lobby_timeout
                deadline = None if lobby is None else time.monotonic() + lobby
                self.waiting = m
                self.emit(m)
                if self.on_waiting is not None:
                    self.on_waiting(m)
            elif isinstance(m, Error):
                if m.fatal:
                    raise JoinError(m.code, m.message)
                self.emit(m)

    # ----------------------------------------------------------------- sending

    def send_pose(
        self,
        head: Pose | None = None,
        left: Pose | None = None,
        right: Pose | None = None,
        *,
        poses: Sequence[Pose | None] | None = None,
    ) -> int:
        """Queue this member's pose for the server (latest wins); returns its sequence number.

        Give ``head``/``left``/``right`` for the usual avatar, or ``poses`` with one entry per
        slot for other rigs. Omitted poses are sent as not tracked.
        """
        slots: Sequence[Pose | None] = poses if poses is not None else (head, left, right)
        slots = list(slots)[: self.slots] + [None] * (self.slots - len(slots))
        data: list[tuple[Sequence[float], Sequence[float]] | None] = []
        for p in slots:
            if p is None:
                data.append(None)
                continue
            if len(p.position) != 3 or len(p.rotation) != 4:
                raise ValueError("a pose is a 3-vector position and a 4-vector quaternion")
            if not all(math.isfinite(v) for v in (*p.position, *p.rotation)):
                raise ValueError("pose values must be finite")
            data.append((p.position, p.rotation))
        self._seq += 1
        self._outbox = encode_pose(self._seq, data)
        self._out_ready.set()
        return self._seq

    @property
    def assets(self) -> AssetClient:
        """The room's 3D models over HTTP (upload, list, download), with this session's token."""
        if self._assets is None:
            self._assets = AssetClient(self.url, self.room, self.http_token, ssl=self._ssl)
        return self._assets

    async def upload_asset(
        self,
        source: str | os.PathLike[str] | bytes,
        name: str | None = None,
        files: dict[str, bytes] | None = None,
    ) -> AssetInfo:
        """Upload a glTF model to the room (see :meth:`AssetClient.upload`); returns its
        listing, whose ``sha256`` names it when spawning it as an object."""
        return await self.assets.upload(source, name, files)

    async def send_message(self, msg: Message) -> None:
        """Send one control message now, through the connection's state machine. Raises
        ConnectionError while disconnected, and
        :class:`~medverse.protocol.connection.LocalProtocolError` if the protocol does not
        allow ``msg`` in the connection's state (say, a room message while in the lobby)."""
        conn = self._conn
        if conn is None or conn.state in (State.CLOSING, State.CLOSED):
            raise ConnectionError("not connected")
        ws = self._ws
        if ws is None or ws.closed:
            raise ConnectionError("not connected")
        await ws.send_bytes(conn.send(msg))

    async def request(
        self,
        make: Callable[[int], Message],
        error: type[RefusedError] = RefusedError,
        timeout: float | None = None,
    ) -> None:
        """Send ``make(req)``, a request with a ``req`` field, and return once the server has
        applied it (``ack``); raise ``error(code, message)`` at once if it refused it, and
        ConnectionError if the connection went away before the answer."""
        self._req = (self._req + 1) & 0xFFFFFFFF
        req = self._req
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._requests[req] = (fut, error)
        try:
            await self.send_message(make(req))
            await asyncio.wait_for(fut, timeout or self.connect_timeout)
        finally:
            self._requests.pop(req, None)

    def _answer(self, req: int, refusal: RequestRefused | None) -> None:
        waiting = self._requests.get(req)
        if waiting is None or waiting[0].done():
            return
        fut, error = waiting
        if refusal is None:
            fut.set_result(None)
        else:
            fut.set_exception(error(refusal.code, refusal.message))

    def _drop_requests(self, ending: Closed | None) -> None:
        """The connection is gone: requests still waiting get no answer on it."""
        for fut, error in self._requests.values():
            if fut.done():
                continue
            if ending is not None and ending.code not in ("closed", "disconnected"):
                fut.set_exception(error(ending.code, ending.message or ending.reason))
            else:
                fut.set_exception(ConnectionError("the connection closed before the answer"))

    async def send_raw(self, frame: bytes) -> None:
        """Send one frame as is, bypassing the state machine (binary inputs such as object
        moves, and tools and tests that speak the protocol byte by byte)."""
        ws = self._ws
        if ws is None or ws.closed:
            raise ConnectionError("not connected")
        await ws.send_bytes(frame)

    async def _sender(self) -> None:
        while True:
            await self._out_ready.wait()
            self._out_ready.clear()
            frame, self._outbox = self._outbox, None
            ws = self._ws
            if frame is None or ws is None or ws.closed:
                continue
            try:
                await ws.send_bytes(frame)
            except (ConnectionError, aiohttp.ClientError, RuntimeError):
                self._outbox = self._outbox or frame  # resend after reconnecting

    # ----------------------------------------------------------------- moderation

    async def moderate(
        self,
        action: str,
        member_id: int | None = None,
        reason: str | None = None,
        *,
        duration: float | None = None,
    ) -> None:
        """A host's action (needs the ``moderate`` grant). Returns once the server has applied
        it; raises :class:`RefusedError` (``forbidden``, ``not_found``, ...) if it refused:
        ``admit``/``deny`` a lobby member, ``remove`` a member from the session or ``ban`` its
        identity from the room (for ``duration`` seconds, or until lifted; ``reason`` is shown
        to them), ``unban`` a ban (``member_id`` is its id from :class:`BansChanged`),
        ``mute``/``allow_unmute`` a member's audio on the server, ``lock``/``unlock``/
        ``lobby``/``open`` the room, or ``end`` the session for everyone."""
        seconds = None if duration is None else max(1, round(duration))
        try:
            await self.request(lambda r: Moderate(action, member_id, reason, seconds, r))
        except RefusedError as err:
            # Ending the session ends ours too: the server closes us before it can answer.
            if not (action == "end" and err.code == ErrorCode.SESSION_ENDED.value):
                raise

    async def change_role(
        self,
        member_id: int,
        role: str | None = None,
        *,
        grant: str | None = None,
        allow: bool | None = None,
    ) -> None:
        """A host gives a member another ``role``, or gives (``allow=True``) or takes one
        ``grant``; everyone concerned gets a :class:`GrantsChanged` event. Returns once
        applied; raises :class:`RefusedError` if refused."""
        await self.request(lambda r: ChangeRole(member_id, role, grant, allow, r))

    # ----------------------------------------------------------------- clinic

    async def transfer(self, member_id: int, room: str, reason: str | None = None) -> None:
        """Move member ``member_id`` of our room to ``room`` (a host, a receptionist or the
        ``transfer`` grant): it enters that room under its rules (consent, lobby). Returns
        once moved; raises :class:`RefusedError` (``forbidden``, ``not_found``,
        ``room_full``, ``room_locked``, ``banned``, ``rate_limited``, ...) with nothing moved.
        In a cluster, moving to a room another server runs returns once that server has
        accepted the member (or raises its refusal, ``room_moving`` if it is gone,
        ``transfer_timeout`` if it did not answer: the member stays). If the member then
        declines that room's consent, a :class:`MoveDeclined` event follows (it went back, or
        its connection closed: ``back`` None); so for :meth:`call_next`."""
        await self.request(lambda r: Transfer(member_id, room, reason, r))

    async def call_next(self) -> None:
        """A host calls the patient who has waited longest in the clinic's waiting room into
        our room (no lobby: we are letting them in). Raises :class:`RefusedError`
        (``not_found`` when nobody waits)."""
        await self.request(lambda r: CallNext(r))

    async def send_back(self, member_id: int, reason: str | None = None) -> None:
        """Send member ``member_id`` of our room back to the clinic's waiting room."""
        await self.request(lambda r: SendBack(member_id, reason, r))

    async def pause(self, paused: bool = True) -> None:
        """Step out of the room (or back in): while paused nobody sees or hears us and we
        receive nothing. Returns once the server has applied it (coming back: with the room
        as it is now). Asking for the state we are in does nothing."""
        if self.state is (State.PAUSED if paused else State.JOINED):
            return
        await self.request(lambda r: Pause(paused, r))

    async def request_unmute(self) -> None:
        """Ask the hosts to allow unmuting after a server mute."""
        await self.request(lambda r: RequestUnmute(r))

    async def withdraw_consent(self) -> None:
        """Withdraw consent given to the room's text: the server removes us from the room."""
        if self.consent_version is None:
            raise RuntimeError("this room did not ask for consent")
        self._ending = Closed("consent withdrawn", "consent_withdrawn")
        await self.send_message(ConsentMsg(self.consent_version, False))
        # The server answers by removing us and closing the connection: that is the
        # acknowledgement (nothing else can arrive once we have withdrawn).
        await asyncio.wait_for(self._ended.wait(), self.connect_timeout)

    async def ping(self, timeout: float = 5.0) -> float:
        """Measure the round trip to the server, in seconds."""
        self._ping_id = (self._ping_id + 1) & 0xFFFFFFFF
        pid = self._ping_id
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[pid] = fut
        try:
            await self.send_message(Ping(pid, time.monotonic()))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pings.pop(pid, None)

    async def _pinger(self) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            if self._connected.is_set():
                with contextlib.suppress(Exception):
                    await self.ping()

    # ----------------------------------------------------------------- receiving

    async def _run(self) -> None:
        while not self._closing:
            ws = self._ws
            assert ws is not None
            await self._read(ws)
            self._connected.clear()
            if self._closing:
                return
            self._drop_requests(self._ending)
            ending = self._ending
            if ending is None and ws.close_code == CLOSE_CONSENT and self.consent_version:
                ending = Closed("consent withdrawn", "consent_withdrawn")
            if ending is not None:
                # A host removed, banned or denied us, ended the session, or we withdrew
                # consent: trying again would only read as an attempt to get back in.
                self._finish(ending)
                return
            if not self.reconnect and self._transfer_grant is None:
                # (A move to a room another server runs is followed even so: it is the move.)
                self._finish(Closed(f"connection closed ({ws.close_code})", "disconnected", ""))
                return
            if not await self._reconnect():
                return

    async def _reconnect(self) -> bool:
        attempt = 0
        old_id = self.member_id
        moved, self._redirected_to = self._redirected_to, None
        if moved is not None:
            self.url = moved
            self.redirects += 1
        while not self._closing:
            attempt += 1
            delay = min(self.max_backoff, 0.05 * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            if moved is not None and attempt == 1:
                delay = 0.0  # the room moved: its new server expects us now
            self.emit(Reconnecting(attempt, delay))
            await asyncio.sleep(delay)
            try:
                welcome = await self._open()
            except JoinError as err:
                # A move's transfer grant joins once: the room it moved us to refused us.
                if err.code in _FINAL_CODES or self._transfer_grant is not None:
                    self._finish(Closed(str(err), err.code, err.message))
                    return False
                if err.code == "room_moving":
                    # A live server says the room is about to be placed again (its old
                    # server's lease is running out): ask that server again shortly rather
                    # than backing off further, so failover takes the lease's time and no more.
                    attempt = min(attempt, 2)
            except (aiohttp.ClientError, OSError, TimeoutError, ConnectionError):
                # The server a redirect named may be gone (its rooms move to others): go
                # back to the URL we were given, which finds the room wherever it is now, or
                # to the cluster's other servers in turn.
                if self.url not in (self.entry_url, *self.fallback_urls):
                    # A live server named it: the dead one's lease runs out within the
                    # cluster's lease time, so ask again shortly rather than backing off.
                    attempt = min(attempt, 2)
                self.url = self._next_entry()
                continue
            else:
                if self.moving_to is not None:
                    # The room we were moved to, on the server that runs it: we are a new
                    # member there (as after a move on one server).
                    self.moving_to = None
                    self.role = self.grants = None
                    self.emit(Arrived(welcome.room, welcome.member_id, dict(self.members)))
                else:
                    self.emit(
                        Resumed(welcome.member_id, welcome.resumed and welcome.member_id == old_id)
                    )
                return True
        return False

    def _next_entry(self) -> str:
        """The next URL to reconnect through: the given one, then each fallback in turn."""
        entries = [self.entry_url, *self.fallback_urls]
        if self.url != self.entry_url and self.url not in entries:
            self._fallback = 0  # a redirected server failed: start again at the given URL
        else:
            self._fallback = (self._fallback + 1) % len(entries)
        return entries[self._fallback]

    def _finish(self, ending: Closed) -> None:
        """The session is over: say how, once, and end :meth:`events`."""
        if self.closed_reason is not None:
            return
        self.closed_reason = ending
        self._ended.set()
        self.emit(ending)
        if not self._events.full():
            self._events.put_nowait(None)

    async def wait_closed(self) -> Closed:
        """Wait until the session has ended (a host ended it or removed us, we withdrew
        consent, ...); returns how (see :class:`Closed`)."""
        await self._ended.wait()
        assert self.closed_reason is not None
        return self.closed_reason

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for msg in ws:
                if msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                    self._on_frame(msg.data, msg.type == aiohttp.WSMsgType.TEXT)
        except (aiohttp.ClientError, ConnectionError) as exc:
            log.debug("connection lost: %s", exc)

    def _on_frame(self, data: bytes, text: bool = False) -> None:
        self.bytes_received += len(data)
        if not self.receive_state and data[:1] == _STATE_KIND:
            return
        assert self._conn is not None
        ev = self._conn.receive(data, text=text)
        if type(ev) is StateReceived:
            now = time.monotonic()
            try:
                snap = self._decoder.decode(ev.frame)
            except ProtocolError as err:
                # Our stream state is lost; reconnecting (resume) brings a fresh keyframe.
                self.emit(Error(err.code.value, err.message, False))
                if self._ws is not None:
                    self._close_task = asyncio.ensure_future(self._ws.close())
                return
            self.frames_received += 1
            tick = self._decoder.tick or 0
            t = tick / self.rate
            self._history.append((t, snap))
            self._offsets.append(t - now)
            self._offset = max(self._offsets)
            self._avatars = None
            if self.on_state is not None:
                self.on_state(now, snap)
        elif type(ev) is Refused:
            refusal = ev.error
            self.emit(Error(refusal.code.value, "from server: " + refusal.message, False))
        elif type(ev) is MessageReceived:
            m = ev.message
            if isinstance(m, Joined):
                self.members[m.member_id] = m.name
                self._avatars = None
                self.emit(m)
            elif isinstance(m, Left):
                self.members.pop(m.member_id, None)
                self._avatars = None
                self.emit(m)
            elif isinstance(m, Pong):
                fut = self._pings.get(m.id)
                self.rtt = time.monotonic() - m.client_time
                if fut is not None and not fut.done():
                    fut.set_result(self.rtt)
            elif isinstance(m, Ack):
                self._answer(m.req, None)
            elif isinstance(m, RequestRefused):
                self._answer(m.req, m)
            elif isinstance(m, Welcome):
                if self.moving_to is not None:
                    self._arrived(m)
                else:
                    self._rewelcome(m)
            elif isinstance(m, Redirect):
                # The room moves to another server: the server closes us now, and we resume
                # there at once (no backoff: the room is already waiting for us). Moved to a
                # room another server runs, we enter it there with the grant it gave.
                self._redirected_to = m.url
                if m.token is not None and self.moving_to is not None:
                    self._transfer_grant = m.token
            elif isinstance(m, MovedMsg):
                self._moved(m)
            elif isinstance(m, AccessMsg):
                if m.room == self.room:  # a refresh of the credential of our room
                    self.room_access = m.access
                    self._retarget_http()
            elif isinstance(m, ConsentRequired):
                self._consent_on_move(m)
            elif isinstance(m, Waiting):
                self.waiting = m
                self.emit(m)
                if self.on_waiting is not None:
                    self.on_waiting(m)
            elif isinstance(m, QueueMsg):
                self.queue = QueueChanged(
                    m.position,
                    m.waiting,
                    float(m.estimate) if m.estimate is not None else None,
                    m.message,
                )
                self.emit(self.queue)
            elif isinstance(m, (Called, MoveDeclined)):
                self.emit(m)
            elif isinstance(m, Error):
                if m.fatal and m.code in _FINAL_CODES and self._ending is None:
                    self._ending = Closed(f"{m.code}: {m.message}", m.code, m.message)
                self.emit(m)
            elif isinstance(m, MemberState):
                self.emit(m)
            elif isinstance(m, Lobby):
                self.emit(
                    LobbyChanged(
                        tuple((w.id, w.name) for w in m.members),
                        tuple(LobbyEntry(w.id, w.name, w.identity) for w in m.members),
                    )
                )
            elif isinstance(m, Bans):
                self.emit(
                    BansChanged(
                        tuple(BanEntry(b.id, b.name, b.until or None, b.reason) for b in m.bans)
                    )
                )
            elif isinstance(m, RoomState):
                self.emit(from_message(EntryChanged, m))
            elif isinstance(m, Grants):
                if m.member_id == self.member_id:
                    self.role, self.grants = m.role, frozenset(m.grants)
                self.emit(from_message(GrantsChanged, m, grants=frozenset(m.grants)))
            # Feature clients see every message of their types, the core's too.
            for handler in self._handlers.get(type(m), ()):
                handler(m)

    def _moved(self, m: MovedMsg) -> None:
        """A host moved us: the old room is gone for us (nothing of it is valid any more);
        the new room's entry follows on this connection."""
        if self._ending is not None and self._ending is self._declined:
            # We declined the consent of the room we were moved to and the server took us
            # back to the room we came from: the session goes on there.
            self._ending = None
        self._declined = None
        self.moving_to = m.room
        self.room = m.room
        # The HTTP clients follow us: the new room's URLs, with its credential (our join
        # token names the room we first entered, which the new room's APIs refuse).
        self.room_access = m.access
        self._retarget_http()
        self.queue = None
        self.members = {}
        self._decoder.reset()
        self._history.clear()
        self._avatars = None
        self.emit(from_message(Moved, m))

    def _retarget_http(self) -> None:
        """Point the cached HTTP clients (assets, images) at our room now, with its token."""
        for client in (self._assets, self._image_client):
            if client is not None:
                client.room, client.token = self.room, self.http_token

    def _consent_on_move(self, m: ConsentRequired) -> None:
        """The room we were moved to asks for consent to its own text: ask the application
        (``consent=``); declining, the server takes us back to the room we came from (a
        ``moved`` there, then its welcome) if that room takes us back, else it ends the
        session (as it does without an answer)."""
        accept = bool(self.consent(m.version, m.text)) if self.consent is not None else False
        if accept:
            # Declined, the version we consented to is still that of the room we go back to.
            self.consent_version = m.version
        if not accept and self._ending is None:
            self._ending = self._declined = Closed(
                f"consent to room {self.room} declined", ErrorCode.CONSENT_REQUIRED.value
            )
        self._send_soon(ConsentMsg(m.version, accept))

    def _send_soon(self, msg: Message) -> None:
        """Send a control message from a receive handler (which cannot wait), in order."""
        conn, ws = self._conn, self._ws
        if conn is None or ws is None or ws.closed:
            return
        frame = conn.send(msg)  # the state changes now, in the order of what we received
        self.run_task(ws.send_bytes(frame))

    def _arrived(self, welcome: Welcome) -> None:
        """The welcome of the room we were moved to: we are a new member there."""
        self.moving_to = None
        self.waiting = None
        self.room = welcome.room
        self.member_id = welcome.member_id
        self.rate = welcome.rate
        self._resume = welcome.resume
        self.members = {mi.id: mi.name for mi in welcome.members}
        self.role = self.grants = None
        self._decoder.reset()
        self._history.clear()
        self._offsets.clear()
        self._avatars = None
        self.emit(Arrived(welcome.room, welcome.member_id, dict(self.members)))
        for hook in self._connected_hooks:
            hook(welcome)  # audio renegotiates: the old room's peer closed with our leaving

    def _rewelcome(self, welcome: Welcome) -> None:
        """A fresh welcome on the same connection (coming back from a pause): the room may
        have changed while we received nothing, so the member list is the welcome's, and the
        members who left or joined meanwhile are reported as such."""
        self._resume = welcome.resume
        now = {m.id: m.name for m in welcome.members}
        for mid, name in self.members.items():
            if mid not in now:
                self.emit(Left(mid, name, "left while you were paused"))
        for mid, name in now.items():
            if mid not in self.members:
                self.emit(Joined(mid, name))
        self.members = now
        # The states before the pause are no base for interpolating the ones after it.
        self._history.clear()
        self._avatars = None

    def emit(self, ev: Event) -> None:
        """Queue an event for :meth:`events` (feature clients add theirs); when the queue is
        full the oldest is dropped rather than letting it grow without bound."""
        if self._events.full():
            self._events.get_nowait()  # drop the oldest rather than grow without bound
        self._events.put_nowait(ev)

    def run_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a task that is cancelled when the session closes (for feature clients)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        return task

    async def events(self) -> AsyncIterator[Event]:
        """Membership, error and connection events, in order, until the session is closed."""
        while True:
            ev = await self._events.get()
            if ev is None:
                return
            yield ev

    # ----------------------------------------------------------------- state

    @property
    def tick(self) -> int | None:
        """Room tick of the newest state received."""
        return self._decoder.tick

    @property
    def snapshot(self) -> Snapshot:
        """The newest decoded (quantized) room state."""
        return self._decoder.snapshot

    def room_time(self) -> float:
        """The room clock now, in seconds, as estimated from the least delayed recent frames."""
        return time.monotonic() + self._offset

    def render_time(self) -> float:
        """Room time to render remote avatars at: now minus the interpolation delay
        (default: three ticks), so that :meth:`Avatar.sample` has snapshots on both sides."""
        delay = self._interp if self._interp is not None else 3.0 / self.rate
        return self.room_time() - delay

    @property
    def avatars(self) -> dict[int, Avatar]:
        """{member_id: Avatar} as last received, your own avatar included (as the server has
        it). Members who have not sent a pose yet have all poses None."""
        if self._avatars is None:
            self._avatars = self._build_avatars(self._decoder.snapshot)
        return self._avatars

    def _build_avatars(self, snap: Snapshot) -> dict[int, Avatar]:
        pos = dequantize_positions(snap.pos)
        rot = dequantize_rotations(snap.rot_index, snap.rot)
        out: dict[int, Avatar] = {}
        start = 0
        for mid, n, flags in zip(
            snap.ids.tolist(), snap.slots.tolist(), snap.flags.tolist(), strict=True
        ):
            if mid >= OBJECT_ID_BASE:
                break  # shared objects follow the avatars (ids are ascending)
            rows = slice(start, start + n)
            poses = _poses(pos[rows], rot[rows], snap.present[rows])
            out[mid] = Avatar(mid, self._name_of(mid), poses, self.sample_entity, flags=flags)
            start += n
        return out

    def _name_of(self, member_id: int) -> str | None:
        if member_id == self.member_id:
            return self.members.get(member_id, self.name)
        return self.members.get(member_id)

    def sample_entity(self, member_id: int, t: float) -> Avatar | None:
        """Entity ``member_id`` (an avatar, or a shared object's entity id) at room time ``t``,
        interpolated between the buffered states on either side (positions linearly, rotations
        by slerp); None if no buffered state has it."""
        hist = self._history
        if not hist:
            return None
        times = [h[0] for h in hist]
        i = bisect.bisect_right(times, t)
        if i == 0:
            a = b = hist[0]
            alpha = 0.0
        elif i >= len(hist):
            a = b = hist[-1]
            alpha = 0.0
        else:
            a, b = hist[i - 1], hist[i]
            alpha = (t - a[0]) / (b[0] - a[0]) if b[0] > a[0] else 0.0
        ra, rb = a[1].rows_of(member_id), b[1].rows_of(member_id)
        if ra is None and rb is None:
            return None
        if ra is None or rb is None or ra.stop - ra.start != rb.stop - rb.start:
            snap, rows = (b[1], rb) if rb is not None else (a[1], ra)
            assert rows is not None
            pa = dequantize_positions(snap.pos[rows])
            qa = dequantize_rotations(snap.rot_index[rows], snap.rot[rows])
            present = snap.present[rows]
        else:
            sa, sb = a[1], b[1]
            p0 = dequantize_positions(sa.pos[ra])
            p1 = dequantize_positions(sb.pos[rb])
            q0 = dequantize_rotations(sa.rot_index[ra], sa.rot[ra])
            q1 = dequantize_rotations(sb.rot_index[rb], sb.rot[rb])
            both = sa.present[ra] & sb.present[rb]
            pa = np.where(
                both[:, None], p0 + (p1 - p0) * alpha, np.where(sb.present[rb][:, None], p1, p0)
            )
            qa = np.where(
                both[:, None], _slerp(q0, q1, alpha), np.where(sb.present[rb][:, None], q1, q0)
            )
            present = sa.present[ra] | sb.present[rb] if alpha < 0.5 else sb.present[rb]
        snap_b = b[1]
        i_b = int(np.searchsorted(snap_b.ids, member_id))
        flags = int(snap_b.flags[i_b]) if rb is not None else 0
        return Avatar(
            member_id,
            self._name_of(member_id),
            _poses(pa, qa, present),
            self.sample_entity,
            flags=flags,
        )


def connect(url: str, room: str, name: str | None = None, **options: Any) -> Session:
    """Open a session to ``room`` on the server at ``url``.

    Others see the display name the join token gives (or its pseudonym in pseudonymous rooms):
    ``name`` only matters on a server without authentication, and a ``name`` that differs from
    the token's is logged as ignored. ``session.name`` is the name others see.

    Use it as an async context manager (``async with connect(...) as session:``), or ``await
    session.start()`` and ``await session.close()`` yourself. Options: ``slots`` (pose slots of
    your avatar: 3 for head and hands, 1 for a desktop head), ``reconnect`` (default True),
    ``max_backoff`` (seconds), ``interpolation_delay`` (seconds), ``history`` (snapshots kept
    for sampling), ``connect_timeout``, ``ping_interval``, ``token`` (the signed join token;
    required unless the server runs without authentication), ``ssl`` (an ``ssl.SSLContext``
    for ``wss://`` servers with their own certificate authority), ``consent`` (called with the
    version and text of a room's consent form; return True to accept; without it such rooms
    refuse the join with ``consent_required``), ``messages`` (message classes of the server's
    application plugins, so the session can send and decode them; receive them with
    :meth:`Session.add_handler`), ``receive_state`` (False: avatar and object state is dropped
    unread, for bots that use the room only for signaling or messages), ``on_waiting``
    (called with the :class:`Waiting` event when the room puts you in its lobby; meanwhile
    ``session.state`` is ``lobby`` and ``session.waiting`` names the lobby id) and
    ``lobby_timeout`` (seconds to wait there before ``start()`` raises TimeoutError; default:
    until a host admits or denies you; wrapping ``start()`` in your own ``asyncio.timeout``
    works as well, and leaves the lobby). In a cluster the session follows the servers'
    redirects to the server that runs the room, carrying its token and resume token;
    ``fallback_urls`` names other servers of the cluster to reconnect through when the one it
    was on, and the one ``url`` names, cannot be reached.
    """
    return Session(url, room, name, **options)
