"""The aiohttp application: ``/ws`` for rooms, ``/health`` and ``/metrics``.

``create_app()`` returns a plain :class:`aiohttp.web.Application`, so medverse can run on its
own (``medverse serve``) or be mounted in another aiohttp app with ``add_subapp``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from aiohttp import web

from .admin import AdminAPI
from .assets import AssetService, AssetStore
from .audio import AudioFeature
from .audit import AuditLog
from .auth import SECRET_FILE, TokenVerifier, load_or_create_secret
from .config import ServerConfig
from .metrics import Metrics
from .objects import ObjectsFeature
from .session import CLOSE_GOING_AWAY, websocket_handler
from .world import World

log = logging.getLogger("medverse")

WORLD_KEY = web.AppKey("medverse.world", World)
CONFIG_KEY = web.AppKey("medverse.config", ServerConfig)


async def _health(request: web.Request) -> web.Response:
    """Liveness and a summary; ``?ticks=N`` adds work-time percentiles of the last N ticks."""
    world = request.app[WORLD_KEY]
    body: dict[str, object] = {
        "status": "ok",
        "rooms": len(world.rooms),
        "members": sum(len(r.members) for r in world.rooms.values()),
        "tick": world.tick_no,
        "tick_rate": world.config.tick_rate,
        "tick_overruns": world.overruns,
    }
    try:
        n = int(request.query.get("ticks", "0"))
    except ValueError:
        raise web.HTTPBadRequest(text="ticks must be an integer") from None
    if n > 0 and world.tick_work:
        work = np.array(world.tick_work[-n:]) * 1000.0
        body["tick_work_ms"] = {
            "ticks": int(work.size),
            "p50": round(float(np.percentile(work, 50)), 3),
            "p99": round(float(np.percentile(work, 99)), 3),
            "max": round(float(work.max()), 3),
        }
    for feature in world.features:
        health = getattr(feature, "health", None)
        if health is not None:
            body.update(health())
    return web.Response(text=json.dumps(body), content_type="application/json")


async def _metrics(request: web.Request) -> web.Response:
    world = request.app[WORLD_KEY]
    return web.Response(
        body=world.metrics.render(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


def make_verifier(cfg: ServerConfig) -> TokenVerifier | None:
    """The join-token verifier the settings ask for (None only with ``no_auth``)."""
    if cfg.no_auth:
        log.warning("authentication is OFF: anyone who can reach this server can join any room")
        return None
    if cfg.auth_public_key:
        return TokenVerifier(public_key_pem=Path(cfg.auth_public_key).read_bytes())
    if cfg.auth_secret:
        return TokenVerifier(secret=cfg.auth_secret.encode())
    secret, created = load_or_create_secret(cfg.data_dir)
    if created:
        log.info("created a token secret in %s", Path(cfg.data_dir) / SECRET_FILE)
    return TokenVerifier(secret=secret)


def create_app(config: ServerConfig | None = None) -> web.Application:
    """Build the medverse application with ``config`` (embedded defaults if None)."""
    cfg = config or ServerConfig()
    app = web.Application()
    world = World(cfg, Metrics())
    world.verifier = make_verifier(cfg)
    world.add_feature(AudioFeature(world))
    world.add_feature(ObjectsFeature(world))
    app[CONFIG_KEY] = cfg
    app[WORLD_KEY] = world
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    assets = AssetService(world, None)  # the store opens with the app
    assets.routes(app)
    AdminAPI(world).routes(app)

    async def on_startup(app: web.Application) -> None:
        world.audit = AuditLog(cfg.data_dir, retention_days=cfg.audit_retention_days)
        world.audit.append("server_start", auth="off" if cfg.no_auth else "tokens")
        assets.store = world.assets = AssetStore(cfg.data_dir)
        for feature in world.features:
            await feature.start()
        world.start()

    async def on_shutdown(app: web.Application) -> None:
        for room in list(world.rooms.values()):
            for m in list(room.members.values()):
                if m.session is not None:
                    m.session.close(CLOSE_GOING_AWAY, b"server shutting down")

    async def on_cleanup(app: web.Application) -> None:
        await world.stop()
        for feature in reversed(world.features):
            await feature.stop()
        if world.assets is not None:
            world.assets.close()
            world.assets = None
        if world.audit is not None:
            world.audit.append("server_stop")
            world.audit.close()
            world.audit = None

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
