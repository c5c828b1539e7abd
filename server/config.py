"""Server settings: embedded defaults, overridable by ``MEDVERSE_*`` variables and flags."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Every knob of the room server, with the defaults a single machine wants.

    Each field can be set from the environment as ``MEDVERSE_<FIELD>`` (upper case).
    """

    host: str = "127.0.0.1"
    port: int = 8750
    #: Room tick rate in Hz (10-90).
    tick_rate: int = 30
    #: Seconds a room stays open after its last member left.
    room_linger: float = 10.0
    #: Seconds a dropped member may reconnect and keep its member id.
    resume_grace: float = 15.0
    max_members_per_room: int = 256
    #: Seconds a new connection has to send its hello.
    handshake_timeout: float = 5.0
    #: Seconds a new TCP connection has to send a complete HTTP request head (request line
    #: and headers; with TLS, as long again for the handshake first); slower ones are cut (0:
    #: no deadline).
    header_timeout: float = 10.0
    #: Largest WebSocket message accepted from a client, bytes.
    max_frame_bytes: int = 16 * 1024
    #: A member whose unsent bytes exceed this skips state ticks until it catches up.
    send_soft_limit: int = 64 * 1024
    #: A member whose unsent bytes exceed this is disconnected (memory stays bounded).
    send_hard_limit: int = 1024 * 1024
    #: Kernel send buffer per connection, bytes (0: the OS default, which autotunes to
    #: megabytes). Kept small so a slow reader backs up into our latest-wins skip logic instead
    #: of queueing seconds of stale state in the kernel.
    socket_send_buffer: int = 256 * 1024
    #: Error replies per second per connection; more are dropped, not queued.
    error_reply_rate: float = 20.0
    #: WebSocket ping interval in seconds (0 turns pings and the silence check off). A ping is
    #: a 2-byte frame: every 2 s is nothing even for a thousand headsets.
    heartbeat: float = 2.0
    #: Seconds without a byte from a connection (no pose, no pong) after which it is taken for
    #: dead and dropped: its leases end and its mix stops (it may still resume). More than the
    #: heartbeat, so a live but idle client always answers a ping in time.
    silence_timeout: float = 5.0
    log_level: str = "info"
    #: Where the server keeps what must survive a restart (the generated token secret, the
    #: audit log, shared objects and annotations).
    data_dir: str = "medverse-data"
    #: PostgreSQL for the durable state (objects, annotations, bans, the audit log, the models
    #: and image series rooms list, image viewers), shared by every server of a cluster:
    #: ``postgresql://user:password@host:5432/medverse``. Empty: SQLite files in the data
    #: directory. The files themselves are in ``blob_dir`` either way.
    database_url: str = ""
    #: Where uploaded model and image series files are kept, content-addressed (``assets/``
    #: and ``images/`` in it). Empty: the data directory. Servers of a cluster sharing
    #: ``database_url`` give one folder on a volume each can read and write (NFS or similar).
    blob_dir: str = ""
    #: HS256 secret for join tokens (at least 32 bytes). Empty: a secret is generated in the
    #: data directory on first start (unless a public key is given or auth is off).
    auth_secret: str = ""
    #: PEM file of an Ed25519 or RSA public key whose holder signs join tokens (EdDSA/RS256).
    auth_public_key: str = ""
    #: Accept joins without a token. For local development only; logged as a warning.
    no_auth: bool = False
    #: Open connections allowed from one IP address (0: unlimited).
    max_connections_per_address: int = 256
    #: Open connections that have not sent a valid hello yet, from one address and in total
    #: (0: unlimited). Each costs little, but a flood of them must not crowd out the members.
    max_unidentified_per_address: int = 64
    max_unidentified_connections: int = 1024
    #: Messages per second per connection (sustained), and the burst allowed above it.
    message_rate: float = 120.0
    message_burst: float = 240.0
    #: Bytes per second per connection (sustained), and the burst allowed above it.
    byte_rate: float = 64 * 1024.0
    byte_burst: float = 256 * 1024.0
    #: Refused messages tolerated within 10 s before the connection is closed (code 4008).
    max_violations: int = 200
    #: Days to keep audit entries' content (their hashes stay so the log still verifies);
    #: 0 keeps everything.
    audit_retention_days: float = 0.0
    #: UTF-8 text members must accept before anything of a room flows (its SHA-256 is the
    #: version they accept); empty: no consent step.
    consent_file: str = ""
    #: Rooms (regular expression, full match) that ask for consent when consent_file is set.
    consent_rooms: str = ".*"
    #: Rooms (regular expression, full match) where members appear only under pseudonyms.
    pseudonymous_rooms: str = ""
    #: A clinic definition (TOML): room types with their policies and the room names using
    #: them, the waiting room and its message (see ``examples/clinic.toml``).
    clinic: str = ""
    #: Seconds without a move or view change after which an object's lease ends by itself.
    object_lease_timeout: float = 5.0
    #: Seconds between writes of moved objects' transforms to storage (at most 1 s).
    object_flush_interval: float = 0.5
    #: Objects one room may hold, and annotations one object may carry.
    max_objects_per_room: int = 256
    max_annotations_per_object: int = 1024
    #: Open a room's objects even when, at start, its stored objects lack changes the audit
    #: log says were acknowledged (by default such a room's objects are refused until an
    #: operator decides). The gap is reported either way.
    serve_incomplete_objects: bool = False
    #: TLS certificate chain and private key (PEM) to serve wss:// directly.
    tls_cert: str = ""
    tls_key: str = ""
    #: Largest 3D model an upload may be, in bytes (a .glb, or a .gltf with its files).
    max_asset_bytes: int = 128 * 1024 * 1024
    #: Most assets one room may list.
    max_assets_per_room: int = 256
    #: Rooms (regular expression, full match) that take image series whose attributes carry
    #: identifying data (PS3.15 basic profile); elsewhere such an upload is refused unless it
    #: asks to be de-identified. Empty (the default): no room does.
    identifiable_image_rooms: str = ""
    #: Largest image series upload (a zip or the .dcm files), and most series one room lists.
    max_series_bytes: int = 1024 * 1024 * 1024
    max_series_per_room: int = 64
    #: Seconds between background passes that re-read every stored model file and check it
    #: against its SHA-256, at low priority (0: none; downloads are checked either way).
    asset_scrub_interval: float = 3600.0
    #: Addresses WebRTC (ICE) gathers host candidates on, comma-separated. The default keeps
    #: media on loopback for development; production names its public address(es).
    rtc_host_addresses: str = "127.0.0.1"
    #: Distance model: full level within the reference distance (m), then
    #: ref / (ref + rolloff * (d - ref)); silent beyond the maximum distance (m).
    audio_ref_distance: float = 1.0
    audio_rolloff: float = 1.0
    audio_max_distance: float = 20.0
    #: Delay the ear away from a source by up to 0.6 ms (interaural time difference).
    audio_interaural_delay: bool = True
    #: Speaker frames below this level (dBFS) are not mixed at all.
    audio_silence_dbfs: float = -60.0
    #: Voice level (dBFS) that sets the speaking flag; it clears 10 dB lower after 0.3 s.
    audio_speaking_dbfs: float = -40.0
    #: Speakers mixed per listener (their loudest; 0: all of them).
    audio_max_speakers: int = 0
    #: Speakers per listener while the mixer is behind (it degrades to the loudest ones).
    audio_degraded_speakers: int = 6
    #: Mix time per 20 ms frame (ms) above which the mixer degrades for a second.
    audio_mix_budget_ms: float = 10.0
    #: Opus bitrate of each listener's stereo mix, bits per second.
    audio_bitrate: int = 64000
    #: Opus encoder complexity of the mixes, 0-10 (10 is aiortc's; 5 costs about half).
    audio_complexity: int = 5
    #: Received 20 ms frames aiortc holds before the mixer gets them (aiortc's default is 4).
    #: 0 hands each packet on at once; the mixer then absorbs up to 60 ms of jitter itself.
    audio_jitter_frames: int = 0
    #: Redis that the servers of a cluster share as their directory of nodes and rooms
    #: (``redis://host:6379/0``); empty: this server runs alone.
    redis_url: str = ""
    #: The WebSocket URL clients reach this server at, given to them in redirects (default:
    #: ``ws://HOST:PORT/ws``; behind a proxy or TLS terminator, the public one).
    public_url: str = ""
    #: Members this server is meant to hold; the cluster places new rooms on the server with
    #: the most room left.
    node_capacity: int = 1000
    #: Seconds a room's lease in the cluster lasts unless its server renews it: how long a
    #: dead server's rooms wait before another server takes them over. Renewals run every
    #: fifth of it on a thread of their own, so a saturated event loop does not lose them; 2 s
    #: brings a dead server's rooms back within about 2.5 s.
    cluster_lease_ttl: float = 2.0
    #: Seconds a server of a cluster waits for the server that runs a room to accept or
    #: refuse a member moved there (then the move is refused with ``transfer_timeout``).
    cluster_transfer_timeout: float = 5.0
    #: Seconds a room access credential (a moved member's bearer token for its new room's
    #: HTTP APIs) lives; the server sends the member a fresh one when half of it has passed.
    room_access_ttl: float = 3600.0
    #: Make up a speaker's lost or late 20 ms frames with Opus's loss concealment (and the
    #: next packet's in-band FEC, when the sender sends one) instead of mixing silence.
    audio_conceal: bool = True
    #: CPU cores this server process keeps to, as a list of cores and ranges (``0``,
    #: ``0-1,3``); empty: wherever the system's scheduler puts it. ``serve --workers`` gives
    #: each worker one core of its own, so the workers' ticks never wait for one another.
    cpu_affinity: str = ""

    def __post_init__(self) -> None:
        """Refuse values that cannot work, naming the setting: the server should fail at
        start with one clear line, not later with a traceback (or run with a nonsense value)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, not {value!r}")
        _check_host(self.host)
        if not 0 < self.port < 65536:
            raise ValueError("port must be 1-65535")
        if not 10 <= self.tick_rate <= 90:
            raise ValueError("tick_rate must be between 10 and 90 Hz")
        _at_least(self, 0, "room_linger", "resume_grace", "heartbeat", "audit_retention_days")
        if self.heartbeat > 0 and self.silence_timeout <= self.heartbeat:
            raise ValueError("silence_timeout must be more than heartbeat (pings need answers)")
        _at_least(self, 0, "send_soft_limit", "socket_send_buffer", "max_connections_per_address")
        _at_least(self, 0, "max_unidentified_per_address", "max_unidentified_connections")
        _at_least(self, 0, "header_timeout")
        _at_least(self, 0, "max_objects_per_room", "max_annotations_per_object")
        _at_least(self, 0, "max_assets_per_room", "audio_max_speakers", "asset_scrub_interval")
        _at_least(self, 1, "max_members_per_room", "max_violations", "send_hard_limit")
        _at_least(self, 1, "max_asset_bytes", "audio_degraded_speakers")
        _at_least(self, 1, "max_series_bytes", "max_series_per_room")
        _positive(self, "handshake_timeout", "error_reply_rate", "message_rate", "byte_rate")
        _positive(self, "message_burst", "byte_burst", "audio_mix_budget_ms")
        # A hello with its join token takes up to about 1 KB: smaller frames lock everyone out.
        if self.max_frame_bytes < MIN_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be at least {MIN_FRAME_BYTES}")
        if self.send_soft_limit > self.send_hard_limit:
            raise ValueError("send_soft_limit must not exceed send_hard_limit")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"log_level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if not self.data_dir:
            raise ValueError("data_dir must name a folder")
        if self.database_url and not self.database_url.startswith(("postgresql://", "postgres://")):
            # Not echoed: the value may hold a password.
            raise ValueError("database_url must be a postgresql:// URL (or empty for SQLite)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if not 0 < self.object_flush_interval <= 1.0:
            raise ValueError("object_flush_interval must be in (0, 1] seconds")
        if self.object_lease_timeout <= 0:
            raise ValueError("object_lease_timeout must be positive")
        if self.auth_secret and self.auth_public_key:
            raise ValueError("give auth_secret or auth_public_key, not both")
        if self.auth_secret and len(self.auth_secret.encode()) < 32:
            raise ValueError("auth_secret must be at least 32 bytes")
        for name in ("consent_file", "tls_cert", "tls_key", "auth_public_key", "clinic"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(f"{name} {path}: no such file")
        for name in ("consent_rooms", "pseudonymous_rooms", "identifiable_image_rooms"):
            try:
                re.compile(getattr(self, name))
            except re.error as exc:
                raise ValueError(f"{name} is not a valid regular expression: {exc}") from None
        if not 0 < self.audio_ref_distance <= self.audio_max_distance:
            raise ValueError("audio_ref_distance must be > 0 and <= audio_max_distance")
        if self.audio_rolloff < 0:
            raise ValueError("audio_rolloff must be >= 0")
        if self.audio_silence_dbfs > 0 or self.audio_speaking_dbfs > 0:
            raise ValueError("audio_silence_dbfs and audio_speaking_dbfs are levels <= 0 dBFS")
        if not 6000 <= self.audio_bitrate <= 510000:
            raise ValueError("audio_bitrate must be 6000-510000 (what Opus encodes)")
        if not 0 <= self.audio_complexity <= 10:
            raise ValueError("audio_complexity must be 0-10")
        parse_cpu_list(self.cpu_affinity)
        if not 0 <= self.audio_jitter_frames <= 8:
            raise ValueError("audio_jitter_frames must be 0-8")
        if self.redis_url and not re.match(r"^(rediss?|unix)://", self.redis_url):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        if self.public_url and not re.match(r"^wss?://[^\x00-\x20\x7f]{1,490}$", self.public_url):
            raise ValueError("public_url must be a ws:// or wss:// URL")
        _at_least(self, 1, "node_capacity")
        if not 1.0 <= self.cluster_lease_ttl <= 60.0:
            raise ValueError("cluster_lease_ttl must be between 1 and 60 seconds")
        if not 0.1 <= self.cluster_transfer_timeout <= 60.0:
            raise ValueError("cluster_transfer_timeout must be between 0.1 and 60 seconds")
        if not 2.0 <= self.room_access_ttl <= 86_400.0:
            raise ValueError("room_access_ttl must be between 2 seconds and a day")
        # Fail at start, not at the first audio offer (medverse.rtc parses them again then;
        # it is not imported here because it loads aiortc, which `medverse token` need not).
        addresses = [a.strip() for a in self.rtc_host_addresses.split(",") if a.strip()]
        if not addresses:
            raise ValueError("rtc_host_addresses: name at least one ICE host address")
        for a in addresses:
            try:
                ipaddress.ip_address(a)
            except ValueError:
                raise ValueError(f"rtc_host_addresses: {a!r} is not an IP address") from None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> ServerConfig:
        """Defaults, then ``MEDVERSE_*`` environment variables, then explicit overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"MEDVERSE_{f.name.upper()}")
            if raw is None:
                continue
            kind = type(getattr(cls(), f.name))
            try:
                values[f.name] = parse_bool(raw) if kind is bool else kind(raw)
            except ValueError as exc:
                raise ValueError(f"MEDVERSE_{f.name.upper()}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)


def parse_bool(text: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (any case)."""
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean, got {text!r}")


#: Smallest ``max_frame_bytes`` accepted: a hello carrying a join token needs about 1 KB.
MIN_FRAME_BYTES = 1024
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _check_host(host: str) -> None:
    """An IP address or a host name (RFC 1123 labels); a name of digits and dots only must be
    an IPv4 address (``0.0.0.0.0`` is a typo, not a name to look up)."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    numeric = all(label.isdigit() for label in labels)
    if not host or numeric or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"host {host!r} is not an IP address or a host name")


def _at_least(cfg: ServerConfig, low: int, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < low:
            raise ValueError(f"{name} must be >= {low}, not {getattr(cfg, name)!r}")


def _positive(cfg: ServerConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be > 0, not {getattr(cfg, name)!r}")


def parse_cpu_list(text: str) -> frozenset[int]:
    """Cores named by a list such as ``0-1,3`` (empty: none). Raises ValueError naming the
    setting when the list is not one."""
    cores: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, dash, high = part.partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise ValueError(
                f"cpu_affinity {text!r} is not a list of cores such as 0-1,3"
            ) from None
        if not 0 <= first <= last < 4096:
            raise ValueError(f"cpu_affinity {text!r}: {part} is not a range of cores")
        cores.update(range(first, last + 1))
    if text.strip() and not cores:
        raise ValueError(f"cpu_affinity {text!r} names no core")
    return frozenset(cores)
