"""Clinic definitions: a TOML file (``medverse serve --clinic FILE``) naming room types, their
policies and the room names that use them.

A virtual clinic is a set of rooms: a waiting room, consultation rooms, group rooms, case
reviews. Each room type says how its rooms are entered (open, through a lobby, locked), what
members consent to there, whether names are pseudonyms, which roles host, whether members
enter muted and which plugins run; ``rooms`` lists the names (``*`` and ``?`` wildcards) of
that type. See ``examples/clinic.toml``::

    [clinic]
    name = "Riverside virtual clinic"
    message = "Welcome. A clinician will call you in shortly."
    waiting_room = "waiting"
    default_consultation_minutes = 10

    [types.consultation]
    rooms = ["consult-*"]
    entry = "open"
    consent = "This consultation is not recorded..."
    hosts = ["host"]

Errors name the key (``types.consultation.entry``) and, for TOML syntax, the line.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medverse.protocol.clinic import MAX_CLINIC_MESSAGE_CHARS
from medverse.protocol.messages import ROOM_NAME_RE
from medverse.protocol.tokens import ROLE_GRANTS

#: Entry modes a room type may start in (a host may change them later).
ENTRY_MODES = ("open", "lobby", "locked")
_TYPE_NAME = re.compile(r"[A-Za-z0-9_\-]{1,32}")
_ROOM_GLOB = re.compile(r"[A-Za-z0-9_.\-*?]{1,64}")
_CLINIC_KEYS = {"name", "message", "waiting_room", "default_consultation_minutes"}
_TYPE_KEYS = {
    "rooms",
    "regex",
    "entry",
    "consent",
    "consent_file",
    "pseudonymous",
    "hosts",
    "plugins",
    "audio",
}
_AUDIO_KEYS = {"muted"}


class ClinicError(ValueError):
    """A clinic file that cannot be used; the message names the file, the key and the line
    when known."""


@dataclass(frozen=True, slots=True)
class RoomRules:
    """One room type's policies. ``None`` means the type leaves it to the next rule that
    matches the room (the server's flags, then the defaults)."""

    #: The room type's name (``types.NAME``).
    type: str
    #: Room names of this type (full match).
    pattern: re.Pattern[str]
    entry: str | None = None
    consent_text: str | None = None
    pseudonymous: bool | None = None
    #: Roles that host (hold ``moderate``) in these rooms; other roles do not.
    hosts: frozenset[str] | None = None
    #: Plugins these rooms run (None: every plugin the server has).
    plugins: tuple[str, ...] | None = None
    #: Members who do not host enter muted by the server (a host may allow them to unmute).
    audio_muted: bool | None = None

    @property
    def consent_version(self) -> str:
        """The SHA-256 (hex) of the consent text: what a member accepts."""
        return consent_version(self.consent_text or "")

    def matches(self, room: str) -> bool:
        return self.pattern.fullmatch(room) is not None


@dataclass(frozen=True, slots=True)
class Clinic:
    """A clinic definition: its name and message, its waiting room and its room types."""

    name: str = ""
    #: What patients in the waiting room read.
    message: str = ""
    #: Where ``call_next`` takes patients from and ``send_back`` returns them to.
    waiting_room: str | None = None
    #: The wait per patient assumed before any consultation has been measured (seconds).
    default_consultation: float | None = None
    types: tuple[RoomRules, ...] = ()

    def known(self, room: str) -> bool:
        """Whether some room type of the clinic takes a room of this name."""
        return any(t.matches(room) for t in self.types)


def consent_version(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def glob_pattern(globs: list[str]) -> re.Pattern[str]:
    """One pattern matching any of the room-name ``globs`` (``*``: any run, ``?``: one)."""
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))


def load_clinic(path: str | Path) -> Clinic:
    """Read and check a clinic file; raises :class:`ClinicError` naming what is wrong."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ClinicError(f"clinic file {p}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ClinicError(f"clinic file {p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib says "... (at line 7, column 3)": keep it, it is what the operator needs.
        raise ClinicError(f"clinic file {p}: {exc}") from None
    return parse_clinic(data, p.parent, str(p))


def parse_clinic(data: Mapping[str, Any], base: Path, source: str = "clinic") -> Clinic:
    """A :class:`Clinic` from a parsed TOML document (``base``: where ``consent_file`` paths
    are relative to)."""

    def fail(key: str, why: str) -> ClinicError:
        return ClinicError(f"{source}: {key}: {why}")

    unknown = set(data) - {"clinic", "types"}
    if unknown:
        raise fail(sorted(unknown)[0], "unknown section (expected [clinic] and [types.NAME])")
    head = data.get("clinic", {})
    if not isinstance(head, dict):
        raise fail("clinic", "must be a table")
    _no_extra(head, _CLINIC_KEYS, "clinic", fail)
    name = _string(head, "name", "clinic", fail, 128) or ""
    message = _string(head, "message", "clinic", fail, MAX_CLINIC_MESSAGE_CHARS) or ""
    waiting = _string(head, "waiting_room", "clinic", fail, 64)
    if waiting is not None and not ROOM_NAME_RE.match(waiting):
        raise fail("clinic.waiting_room", f"{waiting!r} is not a room name")
    default: float | None = None
    if "default_consultation_minutes" in head:
        minutes = head["default_consultation_minutes"]
        if isinstance(minutes, bool) or not isinstance(minutes, int | float):
            raise fail("clinic.default_consultation_minutes", "must be a number")
        if not 0 < minutes <= 24 * 60:
            raise fail("clinic.default_consultation_minutes", "must be in (0, 1440]")
        default = float(minutes) * 60.0
    types_raw = data.get("types", {})
    if not isinstance(types_raw, dict):
        raise fail("types", "must be tables [types.NAME]")
    types = tuple(_room_type(tname, body, base, fail) for tname, body in types_raw.items())
    clinic = Clinic(name, message, waiting, default, types)
    if waiting is not None and types and not clinic.known(waiting):
        raise fail("clinic.waiting_room", f"no room type lists the room {waiting!r}")
    return clinic


def _room_type(name: str, body: Any, base: Path, fail: Any) -> RoomRules:
    key = f"types.{name}"
    if not _TYPE_NAME.fullmatch(name):
        raise fail(key, "a type name is 1-32 letters, digits, - or _")
    if not isinstance(body, dict):
        raise fail(key, "must be a table")
    _no_extra(body, _TYPE_KEYS, key, fail)
    if ("rooms" in body) == ("regex" in body):
        raise fail(key, "give rooms (a list of names, * and ? allowed) or regex, not both")
    if "rooms" in body:
        globs = body["rooms"]
        if isinstance(globs, str):
            globs = [globs]
        if not isinstance(globs, list) or not globs:
            raise fail(f"{key}.rooms", "must be a non-empty list of room names")
        for g in globs:
            if not isinstance(g, str) or not _ROOM_GLOB.fullmatch(g):
                raise fail(f"{key}.rooms", f"{g!r} is not a room name (letters, digits, . _ - * ?)")
        pattern = glob_pattern(globs)
    else:
        rx = body["regex"]
        if not isinstance(rx, str):
            raise fail(f"{key}.regex", "must be a string")
        try:
            pattern = re.compile(rx)
        except re.error as exc:
            raise fail(f"{key}.regex", f"not a valid regular expression: {exc}") from None
    entry = _string(body, "entry", key, fail, 16)
    if entry is not None and entry not in ENTRY_MODES:
        raise fail(f"{key}.entry", f"{entry!r} is not one of {', '.join(ENTRY_MODES)}")
    if "consent" in body and "consent_file" in body:
        raise fail(key, "give consent (the text) or consent_file, not both")
    consent = _string(body, "consent", key, fail, 65536)
    if "consent_file" in body:
        rel = _string(body, "consent_file", key, fail, 4096)
        assert rel is not None
        path = base / rel
        try:
            consent = path.read_bytes().decode("utf-8")
        except OSError as exc:
            raise fail(f"{key}.consent_file", f"{path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise fail(f"{key}.consent_file", f"{path}: not UTF-8 text") from None
        if len(consent) > 65536:
            raise fail(f"{key}.consent_file", "longer than 65536 characters")
    if consent is not None and not consent.strip():
        raise fail(f"{key}.consent", "is empty (leave the key out for no consent step)")
    pseudonymous = _bool(body, "pseudonymous", key, fail)
    hosts: frozenset[str] | None = None
    if "hosts" in body:
        roles = body["hosts"]
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise fail(f"{key}.hosts", "must be a list of roles")
        bad = [r for r in roles if r not in ROLE_GRANTS or r == "observer"]
        if bad:
            allowed = ", ".join(r for r in sorted(ROLE_GRANTS) if r != "observer")
            raise fail(f"{key}.hosts", f"{bad[0]!r} is not a role that can host ({allowed})")
        hosts = frozenset(roles)
    plugins: tuple[str, ...] | None = None
    if "plugins" in body:
        names = body["plugins"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise fail(f"{key}.plugins", "must be a list of plugin names")
        plugins = tuple(names)
    audio_muted: bool | None = None
    if "audio" in body:
        audio = body["audio"]
        if not isinstance(audio, dict):
            raise fail(f"{key}.audio", "must be a table")
        _no_extra(audio, _AUDIO_KEYS, f"{key}.audio", fail)
        audio_muted = _bool(audio, "muted", f"{key}.audio", fail)
    return RoomRules(name, pattern, entry, consent, pseudonymous, hosts, plugins, audio_muted)


def _no_extra(table: Mapping[str, Any], allowed: set[str], key: str, fail: Any) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise fail(f"{key}.{extra[0]}", f"unknown key (known: {', '.join(sorted(allowed))})")


def _string(table: Mapping[str, Any], name: str, key: str, fail: Any, max_len: int) -> str | None:
    if name not in table:
        return None
    value = table[name]
    if not isinstance(value, str):
        raise fail(f"{key}.{name}", "must be a string")
    if len(value) > max_len:
        raise fail(f"{key}.{name}", f"longer than {max_len} characters")
    return value


def _bool(table: Mapping[str, Any], name: str, key: str, fail: Any) -> bool | None:
    if name not in table:
        return None
    value = table[name]
    if not isinstance(value, bool):
        raise fail(f"{key}.{name}", "must be true or false")
    return value
