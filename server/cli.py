"""``medverse`` command line: ``serve`` runs the room server, ``loadtest`` simulates headsets."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import fields

from .config import ServerConfig


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
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(value),
            default=None,
            help=f"(default {value!r}; env MEDVERSE_{f.name.upper()})",
        )


async def _serve(cfg: ServerConfig) -> None:
    from aiohttp import web

    from .app import create_app

    app = create_app(cfg)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    logging.getLogger("medverse").info(
        "medverse serving on ws://%s:%d/ws (tick %d Hz)", cfg.host, cfg.port, cfg.tick_rate
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


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
    try:
        from client_sdk.loadtest import add_arguments as add_loadtest
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
        logging.basicConfig(
            level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        run_loop(_serve(cfg))
        return 0
    if args.command == "loadtest":
        from client_sdk.loadtest import run as run_loadtest

        return run_loadtest(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
