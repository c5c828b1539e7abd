"""The README's examples run as written: every fenced Python block is executed against a live
server (top-level ``await`` allowed, like an asyncio REPL), so the documentation cannot drift
from the code.

Blocks get what their text says they need and nothing more: the live server's address in
place of ``127.0.0.1:8750``, ``url`` (its WebSocket URL), ``token`` (a host's join token for
the room the block names), ``session`` (a host's session in that room) and a ``heart.glb`` in
the working folder. The clinic example runs against a server started with
``--clinic examples/clinic.toml`` and gets ``patient_token``, ``desk_token`` (a receptionist)
and ``clinician_token`` (a host), each for the room the block joins them to. Complete programs
(``asyncio.run(main())``) run in a process of their own with ``MEDVERSE_TOKEN`` set; the plugin
excerpts run in the namespace of ``examples/breathing.py``, which they are quoted from.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medverse.client_sdk import connect
from medverse.server.auth import mint_token

from .conftest import ROOT, ServerProcess, run_server
from .models import HEART

SECRET = "r" * 48
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = [
    (README[: m.start()].count("\n") + 2, m.group(1))
    for m in re.finditer(r"^```python\n(.*?)^```", README, re.S | re.M)
]


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    data = tempfile.mkdtemp(prefix="medverse-readme-")
    with run_server(auth_secret=SECRET, data_dir=data, rtc_host_addresses="127.0.0.1") as s:
        yield s


@pytest.fixture(scope="module")
def clinic_srv() -> Iterator[ServerProcess]:
    data = tempfile.mkdtemp(prefix="medverse-readme-clinic-")
    with run_server(
        auth_secret=SECRET,
        data_dir=data,
        clinic=ROOT / "examples" / "clinic.toml",
        rtc_host_addresses="127.0.0.1",
    ) as s:
        yield s


def clinic_tokens() -> dict[str, str]:
    """The clinic example's join tokens, as ``medverse token`` would make them."""

    def tok(room: str, who: str, name: str, role: str) -> str:
        return mint_token(SECRET.encode(), room=room, identity=who, name=name, role=role)

    return {
        "patient_token": tok("waiting", "pat", "Pat", "participant"),
        "desk_token": tok("waiting", "desk", "Front desk", "receptionist"),
        "clinician_token": tok("consult-1", "drlee", "DR LEE", "host"),
    }


def test_the_clinic_example_is_run() -> None:
    """The clinic example is one of the blocks run (a ```py fence would be skipped)."""
    assert sum("call_next(" in src for _, src in BLOCKS) == 1


def host_token(room: str) -> str:
    return mint_token(SECRET.encode(), room=room, identity=f"host-{room}", name="Dr A", role="host")


def room_of(src: str) -> str:
    m = re.search(r'room="([^"]+)"', src) or re.search(r'"(case-\d+)"', src)
    return m.group(1) if m else "readme"


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 7


@pytest.mark.parametrize(("line", "src"), BLOCKS, ids=[f"line{n}" for n, _ in BLOCKS])
async def test_readme_example(
    request: pytest.FixtureRequest,
    srv: ServerProcess,
    line: int,
    src: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = f"README.md line {line}"
    if "call_next(" in src:
        clinic: ServerProcess = request.getfixturevalue("clinic_srv")
        ns: dict[str, Any] = {"url": clinic.url, **clinic_tokens()}
        result = eval(compile(src, name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT), ns)
        assert inspect.iscoroutine(result)
        await asyncio.wait_for(result, 60)
        return
    src = src.replace("127.0.0.1:8750", f"127.0.0.1:{srv.port}")
    room = room_of(src)
    token = host_token(room)
    if "asyncio.run(main())" in src:
        env = {**os.environ, "MEDVERSE_TOKEN": token}
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", src],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return
    if "BreathingExercise" in src or "RoomType(" in src:
        import examples.breathing as breathing

        served: list[Any] = []
        ns = {
            **vars(breathing),
            "cfg": breathing.ServerConfig(),
            "serve": lambda cfg, app: served.append(app),
        }
        exec(compile(src, name, "exec"), ns)  # a quoted excerpt: it must still define the same
        if "serve(" in src:
            assert len(served) == 1  # handed an app to serve
        return
    monkeypatch.chdir(tmp_path)
    (tmp_path / "heart.glb").write_bytes(HEART)
    async with (
        connect(srv.url, room, token=token, ping_interval=0) as session,
        connect(srv.url, room, token=mint_token(SECRET.encode(), room=room, identity="peer")),
    ):
        ns: dict[str, Any] = {"url": srv.url, "token": token, "session": session}
        result = eval(compile(src, name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT), ns)
        if inspect.iscoroutine(result):
            await asyncio.wait_for(result, 60)
        if session.audio.pc is not None:
            await session.audio.close()
