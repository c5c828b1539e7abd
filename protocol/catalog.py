"""Every message family medverse speaks, and the complete registries decoders use.

The core messages are in :mod:`.messages`, spatial audio in :mod:`.audio`, shared objects in
:mod:`.objects`, transfers and waiting rooms in :mod:`.clinic`, image viewers in
:mod:`.images`; each module only declares its messages. A client that speaks all of them
decodes the server's control frames with
:data:`SERVER_MESSAGES`; a server builds its own registry from the core and the families of
the room plugins it runs (so an application's plugin adds its messages without changing this
package).
"""

from __future__ import annotations

from .audio import CLIENT_AUDIO, SERVER_AUDIO
from .clinic import CLIENT_CLINIC, SERVER_CLINIC
from .images import CLIENT_IMAGES, SERVER_IMAGES
from .messages import CORE_CLIENT_MESSAGES, CORE_SERVER_MESSAGES, message_registry
from .objects import CLIENT_OBJECTS, SERVER_OBJECTS

#: Every message a client may send (wire type -> class).
CLIENT_MESSAGES = message_registry(
    CORE_CLIENT_MESSAGES, CLIENT_AUDIO, CLIENT_OBJECTS, CLIENT_CLINIC, CLIENT_IMAGES
)
#: Every message a server may send (wire type -> class).
SERVER_MESSAGES = message_registry(
    CORE_SERVER_MESSAGES, SERVER_AUDIO, SERVER_OBJECTS, SERVER_CLINIC, SERVER_IMAGES
)

__all__ = ["CLIENT_MESSAGES", "SERVER_MESSAGES"]
