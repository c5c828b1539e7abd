"""``medverse`` command line: ``serve`` runs the room server, ``loadtest`` simulates headsets.

Each command imports what it needs when it runs: ``medverse token`` or ``medverse audit`` should
not wait for the server's dependencies (aiohttp, aiortc, numpy) to load.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys
from dataclasses import fields
from typing import TYPE_CHECKING

from .config import ServerConfig

if TYPE_CHECKING:
    from aiohttp import web


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the room server",
        description=(
            "Run the medverse room server. Every flag can also be set as MEDVERSE_<NAME> in the "
            "environment (for example MEDVERSE_PORT=9000); flags win."
        ),
    )
    defaults = ServerConfig()
    for f in fields(ServerConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        env = f"env MEDVERSE_{f.name.upper()}"
        if isinstance(value, bool):
            p.add_argument(flag, action="store_const", const=True, default=None, help=f"({env})")
        else:
            p.add_argument(flag, type=type(value), default=None, help=f"(default {value!r}; {env})")


def _add_token(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "token",
        help="mint a join token",
        description=(
            "Print an HS256 join token signed with the deployment secret (MEDVERSE_AUTH_SECRET, "
            "or the secret in the data directory)."
        ),
    )
    p.add_argument("--room", default=None, help="the room the token admits to")
    p.add_argument("--identity", required=True, help="the token's subject (who this is)")
    p.add_argument("--name", default=None, help="display name others see (default: identity)")
    p.add_argument("--role", default="participant", choices=["host", "participant", "observer"])
    p.add_argument("--ttl", default="1h", help="lifetime: 90s, 30m, 1h, 2d")
    p.add_argument("--grants", default=None, help="comma-separated grants replacing the role's")
    p.add_argument("--data-dir", default=None, help="(env MEDVERSE_DATA_DIR)")
    p.add_argument(
        "--admin", action="store_true", help="an operator's token for /admin (no --room)"
    )


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="check or prove the audit log")
    asub = p.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="recompute the Merkle tree and check every signed head")
    v.add_argument("--data-dir", default=None, help="(env MEDVERSE_DATA_DIR)")
    pr = asub.add_parser("prove", help="print an inclusion proof of entry N")
    pr.add_argument("entry", type=int)
    pr.add_argument("--data-dir", default=None, help="(env MEDVERSE_DATA_DIR)")


def _audit(args: argparse.Namespace) -> int:
    import json

    from .audit import prove, verify

    data_dir = ServerConfig.from_env(data_dir=args.data_dir).data_dir
    if args.audit_command == "verify":
        report = verify(data_dir)
        print(f"{report.entries} entries, signed tree heads up to {report.signed_size}")
        for problem in report.problems:
            print("TAMPERED:", problem)
        print("OK: the log is intact" if report.ok else f"{len(report.problems)} problem(s) found")
        return 0 if report.ok else 1
    try:
        print(json.dumps(prove(data_dir, args.entry), indent=2))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _token(args: argparse.Namespace) -> int:
    from .auth import load_or_create_secret, mint_admin_token, mint_token, parse_ttl

    cfg = ServerConfig.from_env(data_dir=args.data_dir)
    secret = cfg.auth_secret.encode() if cfg.auth_secret else load_or_create_secret(cfg.data_dir)[0]
    if args.admin:
        if args.room is not None:
            print("error: an admin token names no room", file=sys.stderr)
            return 2
        print(mint_admin_token(secret, identity=args.identity, ttl=parse_ttl(args.ttl)))
        return 0
    if args.room is None:
        print("error: --room is required (or --admin)", file=sys.stderr)
        return 2
    grants = [g.strip() for g in args.grants.split(",") if g.strip()] if args.grants else None
    print(
        mint_token(
            secret,
            room=args.room,
            identity=args.identity,
            name=args.name,
            role=args.role,
            ttl=parse_ttl(args.ttl),
            grants=grants,
        )
    )
    return 0


async def _serve(cfg: ServerConfig, app: web.Application) -> None:
    from aiohttp import web

    from .auth import load_or_create_secret, mint_token

    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    ssl_ctx = None
    if cfg.tls_cert:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    site = web.TCPSite(runner, cfg.host, cfg.port, ssl_context=ssl_ctx)
    await site.start()
    log = logging.getLogger("medverse")
    scheme = "wss" if ssl_ctx else "ws"
    log.info(
        "medverse serving on %s://%s:%d/ws (tick %d Hz)", scheme, cfg.host, cfg.port, cfg.tick_rate
    )
    if not cfg.no_auth and not cfg.auth_secret and not cfg.auth_public_key:
        secret, _ = load_or_create_secret(cfg.data_dir)
        token = mint_token(secret, room="demo", identity="dev", name="Developer", role="host")
        log.info("development token for room 'demo' (host, 1 h): %s", token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def serve(cfg: ServerConfig, app: web.Application | None = None) -> None:
    """Run ``app`` (default: ``create_app(cfg)``) on ``cfg.host:cfg.port`` until SIGINT or
    SIGTERM, on uvloop, logging at ``cfg.log_level``. An application with plugins of its own
    builds its app with :func:`~medverse.server.app.create_app` and serves it here."""
    from .app import create_app

    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_loop(_serve(cfg, app if app is not None else create_app(cfg)))


def run_loop(coro: object) -> None:
    """Run on uvloop where it is installed (it is a dependency), else plain asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every POSIX platform
        asyncio.run(coro)  # type: ignore[arg-type]
    else:
        uvloop.run(coro)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medverse", description="medverse telepresence server")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_token(sub)
    _add_audit(sub)
    try:
        from medverse.client_sdk.loadtest import add_arguments as add_loadtest
    except ImportError:
        add_loadtest = None
    if add_loadtest is not None:
        add_loadtest(sub.add_parser("loadtest", help="simulate headsets against a server"))
    args = parser.parse_args(argv)
    if args.command == "serve":
        overrides = {f.name: getattr(args, f.name) for f in fields(ServerConfig)}
        try:
            cfg = ServerConfig.from_env(**overrides)
        except ValueError as exc:
            parser.error(str(exc))
        serve(cfg)
        return 0
    if args.command == "token":
        return _token(args)
    if args.command == "audit":
        return _audit(args)
    if args.command == "loadtest":
        from medverse.client_sdk.loadtest import run as run_loadtest

        return run_loadtest(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
