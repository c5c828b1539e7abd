"""Shared fixtures: a real medverse server process on 127.0.0.1.

Servers are started by ``benchmarks/harness.py``, which the benchmarks use too: settings go
in as ``MEDVERSE_*`` environment variables, with authentication off unless a test gives a
secret or a public key.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks.harness import ROOT, ServerProcess, free_port, run_server
from tests.browser import browser  # the headless Chromium fixture: see tests/browser.py

from .backends import backend
from .pgservice import postgres_server

__all__ = [
    "ROOT",
    "ServerProcess",
    "backend",
    "browser",
    "free_port",
    "postgres_server",
    "run_server",
]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """One server per test module, with short timeouts so tests run fast."""
    with run_server(resume_grace=3.0, room_linger=0.5, handshake_timeout=1.0) as s:
        yield s
