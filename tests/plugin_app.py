"""A server with test plugins (``python -m tests.plugin_app``, settings as for ``medverse
serve``): in rooms named ``gate-...`` a gatekeeper that keeps ``intruder`` out, even as the
room's first entrant, and a lobby that lets everyone in at once."""

from __future__ import annotations

from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.server.app import create_app, default_plugins
from medverse.server.auth import Identity
from medverse.server.cli import serve
from medverse.server.config import ServerConfig
from medverse.server.plugins import WAIT, RoomPlugin, RoomType, Wait


class Gatekeeper(RoomPlugin):
    """Keeps one identity out; sends everyone else through the lobby."""

    name = "gatekeeper"

    def on_enter(self, identity: Identity) -> Wait | ProtocolError | None:
        if identity.subject == "intruder":
            return ProtocolError(ErrorCode.FORBIDDEN, "not in this room")
        return None if identity.can("moderate") else WAIT

    def on_lobby_changed(self) -> None:
        for lobby_id in list(self.ctx.lobby):  # admits as soon as someone waits
            self.ctx.admit(lobby_id)


def main() -> None:
    cfg = ServerConfig.from_env()
    gate = RoomType("gate", ["moderation", "objects", "gatekeeper"], rooms=r"gate-.*")
    serve(cfg, create_app(cfg, plugins=[*default_plugins(), Gatekeeper], room_types=[gate]))


if __name__ == "__main__":
    main()
