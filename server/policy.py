"""Per-room policies from the settings: consent to a versioned text, pseudonymous names."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .config import ServerConfig


class RoomPolicy:
    """Which rooms ask for consent (and to what) and which show only pseudonyms."""

    def __init__(self, config: ServerConfig) -> None:
        self.consent_text: str | None = None
        self.consent_version = ""
        if config.consent_file:
            raw = Path(config.consent_file).read_bytes()
            self.consent_text = raw.decode("utf-8")
            self.consent_version = hashlib.sha256(raw).hexdigest()
        self._consent_rooms = re.compile(config.consent_rooms)
        self._pseudonymous = (
            re.compile(config.pseudonymous_rooms) if config.pseudonymous_rooms else None
        )
        self._identifiable_images = (
            re.compile(config.identifiable_image_rooms) if config.identifiable_image_rooms else None
        )

    def needs_consent(self, room: str) -> bool:
        return self.consent_text is not None and self._consent_rooms.fullmatch(room) is not None

    def pseudonymous(self, room: str) -> bool:
        return self._pseudonymous is not None and self._pseudonymous.fullmatch(room) is not None

    def identifiable_images(self, room: str) -> bool:
        """Whether ``room`` takes image series whose attributes identify the patient."""
        pattern = self._identifiable_images
        return pattern is not None and pattern.fullmatch(room) is not None
