"""Per-room policies: consent to a versioned text, pseudonymous names, how a room is entered,
who hosts it, whether members enter muted.

Policies are rules, each a pattern of room names and what it sets; for each policy the first
rule that matches the room and sets it decides. A clinic file's room types
(:mod:`.clinicdef`) come first, in the file's order, then the server's own flags expressed the
same way (``--consent-file`` with ``--consent-rooms``, ``--pseudonymous-rooms``).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from .auth import Identity
from .clinicdef import Clinic, RoomRules, consent_version
from .config import ServerConfig
from .plugins import RoomSettings


def flag_rules(config: ServerConfig) -> list[RoomRules]:
    """The server's per-room flags as rules."""
    rules = []
    if config.consent_file:
        text = Path(config.consent_file).read_bytes().decode("utf-8")
        rules.append(RoomRules("consent_rooms", re.compile(config.consent_rooms), None, text))
    if config.pseudonymous_rooms:
        pattern = re.compile(config.pseudonymous_rooms)
        rules.append(RoomRules("pseudonymous_rooms", pattern, pseudonymous=True))
    return rules


class RoomPolicy:
    """What each room's policies are, from the clinic definition and the server's flags."""

    def __init__(self, config: ServerConfig, clinic: Clinic | None = None) -> None:
        self.clinic = clinic
        self.rules: list[RoomRules] = [*(clinic.types if clinic else ()), *flag_rules(config)]
        self._identifiable_images = (
            re.compile(config.identifiable_image_rooms) if config.identifiable_image_rooms else None
        )

    def settings(self, room: str) -> RoomSettings:
        """Every policy of ``room``, resolved."""
        kind = "default"
        entry: str | None = None
        consent: str | None = None
        pseudonymous: bool | None = None
        hosts: frozenset[str] | None = None
        muted: bool | None = None
        types = self.clinic.types if self.clinic else ()
        for rule in self.rules:
            if not rule.matches(room):
                continue
            if kind == "default" and rule in types:
                kind = rule.type
            entry = entry if entry is not None else rule.entry
            if consent is None and rule.consent_text is not None:
                consent = rule.consent_text
            pseudonymous = pseudonymous if pseudonymous is not None else rule.pseudonymous
            hosts = hosts if hosts is not None else rule.hosts
            muted = muted if muted is not None else rule.audio_muted
        return RoomSettings(
            type=kind,
            entry=entry or "open",
            consent_text=consent,
            consent_version=consent_version(consent) if consent is not None else "",
            pseudonymous=bool(pseudonymous),
            hosts=hosts,
            audio_muted=bool(muted),
        )

    def consent(self, room: str) -> tuple[str, str] | None:
        """``(version, text)`` members must accept before entering ``room``, or None."""
        s = self.settings(room)
        return (s.consent_version, s.consent_text) if s.consent_text is not None else None

    def needs_consent(self, room: str) -> bool:
        return self.consent(room) is not None

    def pseudonymous(self, room: str) -> bool:
        return self.settings(room).pseudonymous

    def known(self, room: str) -> bool:
        """Whether the clinic has a room of this name (every name, without a clinic file or
        with one that defines no room types)."""
        return self.clinic is None or not self.clinic.types or self.clinic.known(room)

    def identity_in(self, identity: Identity, room: str) -> Identity:
        """``identity`` as it enters ``room``: a room type that names its host roles gives
        those roles ``moderate`` and takes it from the others."""
        hosts = self.settings(room).hosts
        if hosts is None or identity.hidden:
            return identity
        grants = identity.grants
        grants = grants | {"moderate"} if identity.role in hosts else grants - {"moderate"}
        return identity if grants == identity.grants else replace(identity, grants=grants)

    def identifiable_images(self, room: str) -> bool:
        """Whether ``room`` takes image series whose attributes identify the patient."""
        pattern = self._identifiable_images
        return pattern is not None and pattern.fullmatch(room) is not None
