"""``medverse`` command line: ``serve`` runs the room server, ``loadtest`` simulates headsets.

Each command imports what it needs when it runs: ``medverse token`` or ``medverse audit`` should
not wait for the server's dependencies (aiohttp, aiortc, numpy) to load.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import socket
import sqlite3
import ssl
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .config import ServerConfig, parse_cpu_list

if TYPE_CHECKING:
    from aiohttp import web

    from .limits import RequestHeadGuard


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: usage goes to ``--help``, the error to stderr, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class CommandError(Exception):
    """What the operator must fix (a setting, a file, a port), said in one line."""


def one_line(exc: BaseException) -> str:
    """An exception as one line for the operator: what failed and why, no traceback."""
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        text = f"{exc.filename}: {reason}" if exc.filename else reason
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _fail(prog: str, exc: BaseException | str) -> int:
    """Print ``prog: error: ...`` on one line to stderr; the exit code for bad input (2)."""
    text = exc if isinstance(exc, str) else one_line(exc)
    print(f"{prog}: error: {text}", file=sys.stderr)
    return 2


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
            # --flag and --no-flag: a setting that is on by default (or in the environment)
            # can be turned off from the command line too. A setting named no_x is turned on
            # by --no-x and off by --x (not --no-no-x).
            help_text = f"(default {'on' if value else 'off'}; {env})"
            if f.name.startswith("no_"):
                on, off = flag, "--" + f.name[3:].replace("_", "-")
                group = p.add_mutually_exclusive_group()
                group.add_argument(
                    on, dest=f.name, action="store_const", const=True, help=help_text
                )
                group.add_argument(off, dest=f.name, action="store_const", const=False)
                p.set_defaults(**{f.name: None})
            else:
                p.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
                )
        else:
            p.add_argument(flag, type=type(value), default=None, help=f"(default {value!r}; {env})")

    p.add_argument(
        "--workers",
        type=int,
        nargs="?",
        const=0,
        default=None,
        metavar="N",
        help="start N server processes on this machine (ports PORT..PORT+N-1, data in "
        "DATA_DIR/node-I), one cluster sharing --redis-url; without N, one per core; each "
        "keeps to a core of its own (of --cpu-affinity, if given) while there are enough",
    )


def _add_cluster(sub: argparse._SubParsersAction) -> None:
    redis_help = "the cluster's Redis (env MEDVERSE_REDIS_URL)"
    for name, text in (
        ("nodes", "list the nodes of a cluster with their load"),
        ("rooms", "list the rooms and members of a whole cluster"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--redis-url", default=None, help=redis_help)
    p = sub.add_parser("end", help="end a room's session wherever it runs in the cluster")
    p.add_argument("room")
    p.add_argument("--reason", default="an administrator ended the session")
    p.add_argument("--redis-url", default=None, help=redis_help)
    p = sub.add_parser("ban", help="ban an identity from a room on every node of the cluster")
    p.add_argument("identity", help="the token subject to ban")
    p.add_argument("--room", required=True)
    p.add_argument("--reason", default="")
    p.add_argument("--duration", default=None, help="90s, 30m, 1h, 2d (default: until lifted)")
    p.add_argument("--redis-url", default=None, help=redis_help)
    p = sub.add_parser("drain", help="drain a node: its rooms move to other nodes, then it exits")
    p.add_argument("node", help="the node's id or URL (see medverse nodes)")
    p.add_argument("--redis-url", default=None, help=redis_help)


def _cluster_command(args: argparse.Namespace) -> int:
    """``medverse nodes|rooms|end|ban|drain``: the cluster's directory in Redis, and
    commands every node hears."""
    import getpass
    import json
    import time

    prog = f"medverse {args.command}"
    url = args.redis_url or os.environ.get("MEDVERSE_REDIS_URL", "")
    if not url:
        return _fail(prog, "--redis-url (or MEDVERSE_REDIS_URL) names the cluster's Redis")
    try:
        from redis.exceptions import RedisError

        from .auth import parse_ttl
        from .cluster import COMMANDS, read_nodes, read_rooms, run_command
    except ImportError as exc:
        return _fail(prog, f"the redis package is needed ({one_line(exc)})")
    actor = f"operator:{getpass.getuser()}@{socket.gethostname()}"

    async def act(r: object) -> int:
        if args.command == "nodes":
            for n in await read_nodes(r):  # type: ignore[arg-type]
                print(json.dumps(n))
            return 0
        if args.command == "rooms":
            for room in await read_rooms(r):  # type: ignore[arg-type]
                print(json.dumps(room))
            return 0
        if args.command == "drain":
            nodes = await read_nodes(r)  # type: ignore[arg-type]
            if not any(args.node in (n["node"], n.get("url")) for n in nodes):
                raise CommandError(f"no live node {args.node!r} (see medverse nodes)")
            cmd: dict[str, object] = {"op": "drain", "node": args.node, "actor": actor}
        elif args.command == "end":
            rooms = await read_rooms(r)  # type: ignore[arg-type]
            if not any(room.get("room") == args.room for room in rooms):
                raise CommandError(f"no live room {args.room!r} (see medverse rooms)")
            cmd = {"op": "end", "room": args.room, "actor": actor, "reason": args.reason}
        else:
            until = time.time() + parse_ttl(args.duration) if args.duration else None
            nodes = await read_nodes(r)  # type: ignore[arg-type]
            if not nodes:
                raise CommandError("no live node to record the ban (see medverse nodes)")
            cmd = {
                "op": "ban",
                "room": args.room,
                "identity": args.identity,
                "reason": args.reason,
                "actor": actor,
                "until": until,
                # Nodes that share one database: this one records it, the others enforce it.
                "recorder": nodes[0]["node"],
            }
        heard = await r.publish(COMMANDS, json.dumps(cmd))  # type: ignore[attr-defined]
        print(f"{args.command}: sent to {heard} node(s)")
        return 0

    try:
        return int(asyncio.run(run_command(url, act)))
    except (CommandError, ValueError, RedisError, OSError) as exc:
        return _fail(prog, exc)


def _workers(cfg: ServerConfig, count: int) -> int:
    """``medverse serve --workers N``: N server processes on consecutive ports, one cluster
    through ``redis_url``, each with its own data directory; they share the token secret.
    SIGTERM and SIGINT are passed on to each (SIGTERM drains them); returns when all ended."""
    import subprocess

    from .auth import load_or_create_secret

    if not cfg.redis_url:
        raise CommandError(
            "--workers needs --redis-url: the processes find each other's rooms through Redis "
            "(start one with: redis-server --port 6379)"
        )
    if cfg.public_url:
        raise CommandError("--public-url names one server; give each worker its own instead")
    n = count or os.cpu_count() or 1
    if not 1 <= n <= 256 or cfg.port + n - 1 > 65535:
        raise CommandError(f"--workers {n}: ports {cfg.port}-{cfg.port + n - 1} do not fit")
    prepare_data_dir(cfg.data_dir)
    env = dict(os.environ)
    if not cfg.no_auth and not cfg.auth_secret and not cfg.auth_public_key:
        # One secret for every worker, so a token minted for the cluster works on each.
        secret, _ = load_or_create_secret(cfg.data_dir)
        env["MEDVERSE_AUTH_SECRET"] = secret.decode()
    if getattr(cfg, "database_url", ""):
        # One audit log in the shared database takes one signing key: made here once, and
        # copied into every worker's data directory.
        import shutil

        from .audit import KEY_FILE, PUBLIC_KEY_FILE, _load_key

        _load_key(Path(cfg.data_dir))
        for i in range(n):
            node_dir = Path(cfg.data_dir) / f"node-{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            for name in (KEY_FILE, PUBLIC_KEY_FILE):
                if not (node_dir / name).exists():
                    shutil.copy2(Path(cfg.data_dir) / name, node_dir / name)
        # One index of models and series in the database: one folder of their files too.
        if not cfg.blob_dir:
            env["MEDVERSE_BLOB_DIR"] = str(Path(cfg.data_dir).resolve())
    cores = worker_cores(cfg.cpu_affinity, n)
    procs = []
    for i in range(n):
        child = dict(env)
        for f in fields(ServerConfig):
            value = getattr(cfg, f.name)
            if value != getattr(ServerConfig(), f.name):
                child[f"MEDVERSE_{f.name.upper()}"] = str(value)
        child["MEDVERSE_PORT"] = str(cfg.port + i)
        child["MEDVERSE_CPU_AFFINITY"] = cores[i]
        child["MEDVERSE_DATA_DIR"] = str(Path(cfg.data_dir) / f"node-{i}")
        cmd = [sys.executable, "-m", "medverse.server.cli", "serve"]
        procs.append(subprocess.Popen(cmd, env=child))

    def forward(sig: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [p.wait() for p in procs]
    return max(codes, default=0)


def _add_token(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "token",
        help="mint a join token",
        description=(
            "Print an HS256 join token signed with the deployment secret (MEDVERSE_AUTH_SECRET, "
            "or the secret `medverse serve` created in the data directory; never a new one)."
        ),
    )
    p.add_argument("--room", default=None, help="the room the token admits to")
    p.add_argument("--identity", required=True, help="the token's subject (who this is)")
    p.add_argument("--name", default=None, help="display name others see (default: identity)")
    roles = ["host", "participant", "observer", "receptionist"]
    p.add_argument("--role", default="participant", choices=roles)
    p.add_argument("--ttl", default="1h", help="lifetime: 90s, 30m, 1h, 2d")
    p.add_argument("--grants", default=None, help="comma-separated grants replacing the role's")
    p.add_argument("--data-dir", default=None, help="(env MEDVERSE_DATA_DIR)")
    p.add_argument(
        "--admin", action="store_true", help="an operator's token for /admin (no --room)"
    )


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="read, check, prove or anchor the audit log")
    asub = p.add_subparsers(dest="audit_command", required=True)
    data_help = "(env MEDVERSE_DATA_DIR)"
    db_help = (
        "the cluster's PostgreSQL log instead of the data directory's SQLite file (env "
        "MEDVERSE_DATABASE_URL); the data directory's audit_public_key.pem, if there, checks it"
    )
    v = asub.add_parser("verify", help="recompute the Merkle tree and check every signed head")
    v.add_argument("--data-dir", default=None, help=data_help)
    v.add_argument("--database-url", default=None, help=db_help)
    v.add_argument(
        "--against",
        metavar="HEAD_FILE",
        default=None,
        help="a head saved earlier (medverse audit head): also prove the log still extends it",
    )
    pr = asub.add_parser("prove", help="print an inclusion proof of entry N")
    pr.add_argument("entry", type=int)
    pr.add_argument("--data-dir", default=None, help=data_help)
    pr.add_argument("--database-url", default=None, help=db_help)
    h = asub.add_parser(
        "head", help="print the newest signed tree head, to keep where the server cannot write"
    )
    h.add_argument("--data-dir", default=None, help=data_help)
    h.add_argument("--database-url", default=None, help=db_help)
    h.add_argument("--out", metavar="FILE", default=None, help="write it to FILE instead")
    sh = asub.add_parser("show", help="print the entries, one line each")
    sh.add_argument("--data-dir", default=None, help=data_help)
    sh.add_argument("--database-url", default=None, help=db_help)
    sh.add_argument(
        "--since",
        default=None,
        help="2026-11-30, 2026-11-30T18:00 (UTC unless an offset is given), or a time back "
        "from now: 90m, 2h, 7d",
    )
    sh.add_argument("--room", default=None, help="entries of this room")
    sh.add_argument("--identity", default=None, help="entries whose actor or subject it is")


def _since(text: str) -> float:
    """``--since`` as Unix time: an ISO date or time (UTC unless it has an offset) or a
    duration back from now."""
    import re
    import time
    from datetime import UTC, datetime

    from .auth import parse_ttl

    if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*[smhd]?\s*", text):
        return time.time() - parse_ttl(text)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r}: give 2026-11-30, 2026-11-30T18:00 or 2h") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _audit(args: argparse.Namespace) -> int:
    import json

    from .audit import (
        AuditSource,
        PostgresAuditSource,
        SavedHead,
        check_against,
        current_head,
        prove,
        read_entries,
        verify,
    )

    prog = f"medverse audit {args.audit_command}"
    data_dir = _data_dir(args.data_dir)
    url = args.database_url or os.environ.get("MEDVERSE_DATABASE_URL", "")
    database = None
    log: str | AuditSource = data_dir
    try:
        if url:
            from .pg import Database

            database = Database(url, retry_for=0.0)
            database.start()
            log = PostgresAuditSource(database, data_dir)
        if args.audit_command == "verify":
            saved = None
            if args.against:
                try:
                    saved = SavedHead.parse(json.loads(Path(args.against).read_text()))
                except ValueError as exc:  # JSON errors are ValueErrors too
                    raise CommandError(f"{args.against}: {one_line(exc)}") from None
            report = verify(log)
            against = check_against(log, saved) if saved is not None else None
        elif args.audit_command == "prove":
            print(json.dumps(prove(log, args.entry), indent=2))
            return 0
        elif args.audit_command == "head":
            # One line, as the admin API gives it: a log collector keeps it whole.
            text = json.dumps(current_head(log)) + "\n"
            if args.out:
                _write_atomically(Path(args.out), text)
            else:
                print(text, end="")
            return 0
        else:
            since = _since(args.since) if args.since else None
            for line in read_entries(log, since, args.room, args.identity):
                print(line)
            return 0
    except (CommandError, ValueError, OSError, sqlite3.Error) as exc:
        return _fail(prog, exc)
    finally:
        if database is not None:
            database.close()
    print(f"{report.entries} entries, signed tree heads up to {report.signed_size}")
    for problem in report.problems:
        print("TAMPERED:", problem)
    if saved is not None:
        if against is None:
            print(f"consistent with the head saved at {saved.when()} ({saved.size} entries)")
        else:
            print("TAMPERED:", against)
    ok = report.ok and against is None
    problems = len(report.problems) + (against is not None)
    print("OK: the log is intact" if ok else f"{problems} problem(s) found")
    return 0 if ok else 1


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one, never half."""

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _token(args: argparse.Namespace) -> int:
    from .auth import mint_admin_token, mint_token, parse_ttl

    prog = "medverse token"
    try:
        ttl = parse_ttl(args.ttl)
        data_dir = _data_dir(args.data_dir)
        if args.admin:
            if args.room is not None:
                return _fail(prog, "an admin token names no room")
            secret = _token_secret(data_dir)
            print(mint_admin_token(secret, identity=args.identity, ttl=ttl))
            return 0
        if args.room is None:
            return _fail(prog, "--room is required (or --admin)")
        grants = [g.strip() for g in args.grants.split(",") if g.strip()] if args.grants else None
        token = mint_token(
            _token_secret(data_dir),
            room=args.room,
            identity=args.identity,
            name=args.name,
            role=args.role,
            ttl=ttl,
            grants=grants,
        )
    except (CommandError, ValueError, OSError) as exc:
        return _fail(prog, exc)
    print(token)
    return 0


def _data_dir(flag: str | None) -> str:
    """The data directory for commands that only read it: the flag, ``MEDVERSE_DATA_DIR``, or
    the default. (Not the whole server configuration: a server setting in the environment,
    such as a TLS key only the server may read, is no concern of ``token`` or ``audit``.)"""

    return flag or os.environ.get("MEDVERSE_DATA_DIR") or ServerConfig().data_dir


def _token_secret(data_dir: str) -> bytes:
    """The secret the server signs with: ``MEDVERSE_AUTH_SECRET``, else the one ``medverse
    serve`` created in the data directory. Minting never creates one (the server would refuse
    every token signed with it), so none found is an error that says where it looked."""

    from .auth import SECRET_FILE, load_secret

    secret = os.environ.get("MEDVERSE_AUTH_SECRET", "").encode() or load_secret(data_dir)
    if secret is None:
        raise CommandError(
            f"no token secret: MEDVERSE_AUTH_SECRET is not set and "
            f"{(Path(data_dir) / SECRET_FILE).resolve()} does not exist (give the server's "
            "--data-dir, or MEDVERSE_AUTH_SECRET; `medverse serve` creates the secret)"
        )
    if len(secret) < 32:
        raise CommandError("the token secret is shorter than 32 bytes: the server refuses it")
    return secret


async def _serve(cfg: ServerConfig, app: web.Application, ssl_ctx: ssl.SSLContext | None) -> None:
    from aiohttp import web

    from .app import SERVER_KEY
    from .auth import load_or_create_secret, mint_token

    # Signals first: a SIGTERM at any point from here on stops the server cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = app.get(SERVER_KEY)
    cluster = server.cluster if server is not None else None
    if server is not None and cluster is not None:
        # In a cluster SIGTERM drains: no new rooms here, every room handed to another node
        # (its members redirected), then the process exits. SIGINT stops at once.
        server.when_drained(stop.set)
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(cluster.drain()) and None)
    # Handlers finish when their client disconnects (see medverse.server.httplog).
    # aiohttp's keep-alive timer (about an hour by default in recent versions) closes idle
    # connections between requests; a slow first request is cut by the head guard below.
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        handler_cancellation=False,
        keepalive_timeout=75.0,
    )
    await runner.setup()
    # The listening socket is ours rather than a TCPSite's, so that every connection goes
    # through the request head guard (see medverse.server.limits.RequestHeadGuard).
    guard = _head_guard(cfg, app)
    try:
        listener = await loop.create_server(
            guard.factory(runner.server),  # type: ignore[arg-type]
            cfg.host,
            cfg.port,
            ssl=ssl_ctx,
            reuse_address=True,
            # The guard sees a TLS connection only once its handshake is done: the event
            # loop's own timeout bounds the handshake (aborted, not counted), then the guard's.
            ssl_handshake_timeout=(cfg.header_timeout or None) if ssl_ctx is not None else None,
        )
    except OSError as exc:
        await runner.cleanup()
        raise CommandError(_bind_error(cfg, exc)) from None
    _print_banner(cfg, ssl_ctx is not None)
    log = logging.getLogger("medverse")
    if not cfg.no_auth and not cfg.auth_secret and not cfg.auth_public_key:
        secret, _ = load_or_create_secret(cfg.data_dir)
        token = mint_token(secret, room="demo", identity="dev", name="Developer", role="host")
        log.info("development token for room 'demo' (host, 1 h): %s", token)
        # The token rides in the fragment, which browsers never send to the server.
        base = f"{'https' if ssl_ctx is not None else 'http'}://{_url_host(cfg.host)}:{cfg.port}"
        log.info("development link for room 'demo': %s/join#token=%s", base, token)
    await stop.wait()
    listener.close()
    await runner.cleanup()


def _head_guard(cfg: ServerConfig, app: web.Application) -> RequestHeadGuard:
    """The guard of every connection's first request head, counting what it cuts in the
    server's ``medverse_connections_refused_total`` (when ``app`` is medverse's own)."""
    from .app import SERVER_KEY
    from .limits import RequestHeadGuard

    server = app.get(SERVER_KEY)

    def refused(reason: str) -> None:
        if server is not None:
            server.metrics.connections_refused.labels(reason).inc()

    return RequestHeadGuard(
        cfg.header_timeout,
        cfg.max_unidentified_per_address,
        cfg.max_unidentified_connections,
        refused,
    )


def _tls_context(cfg: ServerConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise CommandError(
            f"tls_cert {cfg.tls_cert} / tls_key {cfg.tls_key}: not a PEM certificate chain and "
            f"its private key ({one_line(exc)})"
        ) from None
    return ctx


def _bind_error(cfg: ServerConfig, exc: OSError) -> str:
    """Why listening failed, for the operator: the port taken, or the address unknown."""
    where = f"{cfg.host}:{cfg.port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {where}: port {cfg.port} is in use (another process holds it; "
            "stop it or pick another port with --port or MEDVERSE_PORT)"
        )
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: {cfg.host!r} is not an address of this machine"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges)"
    return f"cannot listen on {where}: {one_line(exc)}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _print_banner(cfg: ServerConfig, tls: bool) -> None:
    """Where to reach the server and where it keeps its data, on stdout at any log level."""
    base = f"{'https' if tls else 'http'}://{_url_host(cfg.host)}:{cfg.port}"
    ws = f"{'wss' if tls else 'ws'}://{_url_host(cfg.host)}:{cfg.port}/ws"
    print(
        f"medverse serving {base} (tick {cfg.tick_rate} Hz)\n"
        f"  web app  {base}/\n"
        f"  rooms    {ws}\n"
        f"  health   {base}/health\n"
        f"  metrics  {base}/metrics\n"
        f"  data     {Path(cfg.data_dir).resolve()}",
        flush=True,
    )


def check_listen(cfg: ServerConfig) -> None:
    """Fail before anything is opened or created if the server could not listen: the port is
    taken or the host is not an address of this machine. (Binding for real may still fail if
    another process takes the port in between; that is reported the same way.)"""
    try:
        infos = socket.getaddrinfo(
            cfg.host, cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, addr in infos:
            with socket.socket(family, kind, proto) as s:
                # As the server's own socket will: a port in TIME_WAIT is free to take.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(addr)
    except OSError as exc:
        raise CommandError(_bind_error(cfg, exc)) from None


def prepare_data_dir(path: str, what: str = "data_dir") -> Path:
    """The data directory (or ``what`` another folder the server writes to), created if
    missing and checked to be a writable folder (a clear error now rather than a traceback
    from the first file the server writes there)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CommandError(f"{what} {p.resolve()}: exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as exc:
        raise CommandError(f"{what} {p.resolve()}: cannot write there ({one_line(exc)})") from None
    return p


def serve(cfg: ServerConfig, app: web.Application | None = None) -> None:
    """Run ``app`` (default: ``create_app(cfg)``) on ``cfg.host:cfg.port`` until SIGINT or
    SIGTERM, on uvloop, logging at ``cfg.log_level``. An application with plugins of its own
    builds its app with :func:`~medverse.server.app.create_app` and serves it here."""
    from .app import create_app
    from .httplog import quiet_client_errors

    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    quiet_client_errors()  # clients' bad requests are one line each, not tracebacks
    # Everything that can be checked before the server opens or creates anything is.
    check_listen(cfg)
    keep_to_cores(cfg.cpu_affinity)
    prepare_data_dir(cfg.data_dir)
    if cfg.blob_dir:
        prepare_data_dir(cfg.blob_dir, "blob_dir")
    ssl_ctx = _tls_context(cfg) if cfg.tls_cert else None
    run_loop(_serve(cfg, app if app is not None else create_app(cfg), ssl_ctx))


def keep_to_cores(cpu_affinity: str) -> None:
    """Keep this process to the cores ``cpu_affinity`` names (nothing when it is empty);
    a core this process may not use is the operator's to fix, so a CommandError."""
    cores = parse_cpu_list(cpu_affinity)
    if not cores:
        return
    if not hasattr(os, "sched_setaffinity"):
        raise CommandError("cpu_affinity: this system cannot keep a process to given cores")
    allowed = os.sched_getaffinity(0)
    if not cores <= allowed:
        missing = ",".join(str(c) for c in sorted(cores - allowed))
        usable = ",".join(str(c) for c in sorted(allowed))
        raise CommandError(f"cpu_affinity: core {missing} is not available here (usable: {usable})")
    os.sched_setaffinity(0, cores)


def worker_cores(cpu_affinity: str, count: int) -> list[str]:
    """The ``cpu_affinity`` of each of ``count`` workers: one core each while there are
    enough (of those ``cpu_affinity`` names, or all this process may use), so the workers'
    ticks never wait for one another; with more workers than cores, all share them."""
    named = parse_cpu_list(cpu_affinity)
    cores = sorted(named or (os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ()))
    if 0 < count <= len(cores):
        return [str(c) for c in cores[:count]]
    return [cpu_affinity] * count


def run_loop(coro: object) -> None:
    """Run on uvloop where it is installed (it is a dependency), else plain asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every POSIX platform
        asyncio.run(coro)  # type: ignore[arg-type]
    else:
        uvloop.run(coro)  # type: ignore[arg-type]


def build_parser(loadtest: bool = True) -> argparse.ArgumentParser:
    """The ``medverse`` command's parser, with every subcommand.

    ``loadtest=False`` leaves the load generator's options out: they come from the client SDK,
    whose import (aiohttp, aiortc, numpy) takes seconds on a busy machine, which ``medverse
    token`` and ``medverse audit`` should not pay.
    """
    parser = _Parser(prog="medverse", description="medverse telepresence server")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_token(sub)
    _add_audit(sub)
    _add_cluster(sub)
    lt = sub.add_parser("loadtest", help="simulate headsets against a server")
    if loadtest:
        try:
            from medverse.client_sdk.loadtest import add_arguments as add_loadtest
        except ImportError:  # a server installed without the client SDK
            sub.choices.pop("loadtest", None)
        else:
            add_loadtest(lt)
    return parser


def serve_config(args: argparse.Namespace) -> ServerConfig:
    """``medverse serve``'s settings: defaults, then ``MEDVERSE_*`` variables, then flags."""
    return ServerConfig.from_env(**{f.name: getattr(args, f.name) for f in fields(ServerConfig)})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(loadtest=argv[:1] == ["loadtest"]).parse_args(argv)
    if args.command == "serve":
        try:
            if args.workers is not None:
                return _workers(serve_config(args), args.workers)
            serve(serve_config(args))
        except (CommandError, ValueError, OSError, sqlite3.Error) as exc:
            # Settings, files and the listening socket: the operator's to fix, so one line.
            return _fail("medverse serve", exc)
        return 0
    if args.command == "token":
        return _token(args)
    if args.command == "audit":
        return _audit(args)
    if args.command == "loadtest":
        return _loadtest(args)
    if args.command in ("nodes", "rooms", "end", "ban", "drain"):
        return _cluster_command(args)
    return 2


def _loadtest(args: argparse.Namespace) -> int:
    """``medverse loadtest``, with its bad input and unreachable servers said in one line."""

    from medverse.client_sdk.loadtest import run as run_loadtest

    prog = "medverse loadtest"
    for name, low in (("clients", 1), ("rate", 1), ("room_size", 0), ("probes", 0)):
        if getattr(args, name) < low:
            return _fail(prog, f"--{name.replace('_', '-')} must be at least {low}")
    if not args.seconds > 0 or not args.warmup >= 0:
        return _fail(prog, "--seconds must be > 0 and --warmup >= 0")
    # A refused headset is reported below; the others' unread refusals need not be logged.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        return run_loadtest(args)
    except ConnectionRefusedError as exc:
        return _fail(prog, f"no server answers at {args.url} ({one_line(exc)})")
    except ConnectionError as exc:  # a headset's join was refused
        text = one_line(exc)
        if "unauthorized" in text and not (args.secret or os.environ.get("MEDVERSE_AUTH_SECRET")):
            text += " (give the server's token secret with --secret or MEDVERSE_AUTH_SECRET)"
        return _fail(prog, f"{args.url}: {text}")
    except (OSError, ValueError) as exc:
        return _fail(prog, f"{args.url}: {one_line(exc)}")


if __name__ == "__main__":
    sys.exit(main())
