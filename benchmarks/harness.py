"""Servers and helper processes on 127.0.0.1, for the benchmarks and the tests.

:func:`run_server` starts ``medverse serve`` on a free port with its settings as ``MEDVERSE_*``
environment variables, waits until ``/health`` answers and stops it afterwards;
:func:`spawn` starts ``python -m MODULE`` (load generators, attackers) from the repository
root. Benchmarks pin each process to a core (``cpu=``) so the server and its load do not share
one; ``tests/conftest.py`` uses the same functions without pinning. Both run from the
repository root, where ``benchmarks`` is importable.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(pid: int, cpu: int) -> None:
    """Keep process ``pid`` (0: this one) on core ``cpu``, where there is more than one core
    and the platform allows it (macOS has no CPU affinity)."""
    with contextlib.suppress(AttributeError, OSError):
        if len(os.sched_getaffinity(0)) > 1:
            os.sched_setaffinity(pid, {cpu})


def spawn(
    module: str,
    *args: str,
    env: Mapping[str, str] | None = None,
    cpu: int | None = None,
    nice: int = 0,
    **popen: Any,
) -> subprocess.Popen[Any]:
    """``python -m module args`` with this interpreter, from the repository root; ``cpu`` and
    ``nice`` are applied in the child before it starts, so no work runs elsewhere first."""

    def setup() -> None:
        if nice:
            os.nice(nice)
        if cpu is not None:
            pin(0, cpu)

    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env=env,
        cwd=ROOT,
        preexec_fn=setup if nice or cpu is not None else None,
        **popen,
    )


@dataclass
class ServerProcess:
    """A ``medverse serve`` child process listening on 127.0.0.1."""

    proc: subprocess.Popen[bytes]
    port: int
    #: The server's environment, settings included: for processes that need the same (the
    #: load generator mints join tokens with its ``MEDVERSE_AUTH_SECRET``).
    env: dict[str, str]
    cafile: str | None = None  # set when the server speaks TLS

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"{'https' if self.cafile else 'http'}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get(self, path: str, timeout: float = 10.0) -> str:
        """The body of ``GET path`` as text."""
        ctx = ssl.create_default_context(cafile=self.cafile) if self.cafile else None
        with urllib.request.urlopen(self.http + path, timeout=timeout, context=ctx) as r:
            return r.read().decode()

    def get_json(self, path: str) -> Any:
        return json.loads(self.get(path))

    def wait_ready(self, timeout: float = 20.0, step: float = 0.05) -> None:
        """Poll ``/health`` until the server answers; RuntimeError if the process exits or
        ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/health")
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server did not start") from None
                time.sleep(step)

    def stop(self) -> None:
        """Terminate the server (it shuts down cleanly), or kill it after 10 s."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server(
    *,
    port: int | None = None,
    cpu: int | None = None,
    app: str | None = None,
    log: IO[Any] | None = None,
    **settings: object,
) -> ServerProcess:
    """Start ``medverse serve`` on 127.0.0.1 and return at once (see :meth:`wait_ready`).
    ``app`` names a module to run instead (``python -m app``, e.g. ``examples.breathing``):
    an application's own server, configured by the same environment variables.

    ``settings`` are ``ServerConfig`` fields (``auth_secret=...``, ``tick_rate=45``), passed as
    ``MEDVERSE_*`` environment variables. Unless given: a fresh temporary data directory, log
    level ``warning`` (or ``MEDVERSE_LOG_LEVEL`` from our environment), and no authentication
    when neither ``auth_secret`` nor ``auth_public_key`` is set: most runs are about
    synchronization, not tokens. ``port`` defaults to a free one; ``cpu`` pins the server;
    ``log``, an open file, takes the server's stdout and stderr (to read what it logged).
    """
    port = free_port() if port is None else port
    env = dict(os.environ)
    env["MEDVERSE_DATA_DIR"] = tempfile.mkdtemp(prefix="medverse-")
    if "auth_secret" not in settings and "auth_public_key" not in settings:
        env["MEDVERSE_NO_AUTH"] = "1"
    env.update({f"MEDVERSE_{k.upper()}": str(v) for k, v in settings.items()})
    env["MEDVERSE_HOST"] = "127.0.0.1"
    env["MEDVERSE_PORT"] = str(port)
    env.setdefault("MEDVERSE_LOG_LEVEL", "warning")
    command = (app,) if app is not None else ("medverse.server.cli", "serve")
    output = {"stdout": log, "stderr": log} if log is not None else {}
    proc = spawn(*command, env=env, cpu=cpu, **output)
    cafile = str(settings["tls_cert"]) if settings.get("tls_cert") else None
    return ServerProcess(proc, port, env, cafile)


@contextlib.contextmanager
def run_server(
    *,
    port: int | None = None,
    cpu: int | None = None,
    app: str | None = None,
    log: IO[Any] | None = None,
    **settings: object,
) -> Iterator[ServerProcess]:
    """A server as :func:`start_server` starts it, answering ``/health``; stopped afterwards."""
    server = start_server(port=port, cpu=cpu, app=app, log=log, **settings)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def progress(message: str) -> None:
    """One line on stderr saying what the benchmark does now (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def save_results(name: str, doc: Any) -> Path:
    """Write ``doc`` to ``benchmarks/results/NAME.json`` and say so."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {os.path.relpath(path, Path.cwd())}")
    return path
