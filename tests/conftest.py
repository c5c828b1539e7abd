"""Shared fixtures: a real medverse server process on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A ``medverse serve`` child process listening on 127.0.0.1."""

    proc: subprocess.Popen[bytes]
    port: int
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

    def get(self, path: str) -> str:
        ctx = ssl.create_default_context(cafile=self.cafile) if self.cafile else None
        with urllib.request.urlopen(self.http + path, timeout=5, context=ctx) as r:
            return r.read().decode()


@contextlib.contextmanager
def run_server(**settings: object) -> Iterator[ServerProcess]:
    """Start ``medverse serve`` with MEDVERSE_* settings; stop it afterwards."""
    port = free_port()
    env = dict(os.environ)
    env["MEDVERSE_DATA_DIR"] = tempfile.mkdtemp(prefix="medverse-test-")
    if "auth_secret" not in settings and "auth_public_key" not in settings:
        env["MEDVERSE_NO_AUTH"] = "1"  # most tests are about sync, not tokens
    env.update({f"MEDVERSE_{k.upper()}": str(v) for k, v in settings.items()})
    env["MEDVERSE_HOST"] = "127.0.0.1"
    env["MEDVERSE_PORT"] = str(port)
    env.setdefault("MEDVERSE_LOG_LEVEL", "warning")
    proc = subprocess.Popen(
        [sys.executable, "-m", "medverse.server.cli", "serve"], env=env, cwd=ROOT
    )
    cafile = str(settings["tls_cert"]) if settings.get("tls_cert") else None
    server = ServerProcess(proc, port, cafile)
    deadline = time.monotonic() + 20
    try:
        while True:
            try:
                server.get("/health")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server did not start") from None
                time.sleep(0.05)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """One server per test module, with short timeouts so tests run fast."""
    with run_server(resume_grace=3.0, room_linger=0.5, handshake_timeout=1.0) as s:
        yield s
