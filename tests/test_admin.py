"""The admin HTTP API: fails closed, and works with an operator's token."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medverse.client_sdk import Closed, ErrorEvent, connect
from medverse.server.audit import tree_head_message
from medverse.server.auth import mint_admin_token, mint_token

from .conftest import ServerProcess, run_server
from .helpers import wait_for

SECRET = "d" * 48


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    with run_server(auth_secret=SECRET) as s:
        yield s


def admin(ttl: float = 600, secret: str = SECRET) -> str:
    return mint_admin_token(secret.encode(), identity="ops", ttl=ttl)


async def call(
    srv: ServerProcess, method: str, path: str, token: str | None, **kw: object
) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, srv.http + path, headers=headers, **kw) as r,  # type: ignore[arg-type]
    ):
        return r.status, await r.json(content_type=None)


ENDPOINTS = [
    ("GET", "/admin/rooms"),
    ("POST", "/admin/rooms/any/end"),
    ("GET", "/admin/audit/head"),
    ("GET", "/admin/audit/proof/1"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_admin_api_fails_closed(srv: ServerProcess, method: str, path: str) -> None:
    room_host = mint_token(SECRET.encode(), room="any", identity="h", role="host")
    for token, status, code in (
        (None, 401, "unauthorized"),
        ("garbage", 401, "unauthorized"),
        (admin(secret="x" * 48), 401, "unauthorized"),
        (admin(ttl=-60), 401, "token_expired"),
        (room_host, 403, "forbidden"),  # a room's host is not an operator
    ):
        got, body = await call(srv, method, path, token)
        assert (got, body["error"]["code"]) == (status, code), token


async def test_admin_tokens_cannot_join_rooms(srv: ServerProcess) -> None:
    from medverse.client_sdk import JoinError

    with pytest.raises(JoinError) as e:
        async with connect(srv.url, "any", "ops", token=admin(), reconnect=False):
            pass
    assert e.value.code == "unauthorized"


async def test_no_admin_api_without_authentication() -> None:
    with run_server() as open_srv:  # no_auth: nobody can prove they are an operator
        status, body = await call(open_srv, "GET", "/admin/rooms", admin())
        assert (status, body["error"]["code"]) == (403, "forbidden")


async def test_list_rooms_end_a_session_and_read_the_audit_head(srv: ServerProcess) -> None:
    tok = mint_token(SECRET.encode(), room="ward-9", identity="p1", name="Pat", role="participant")
    async with connect(srv.url, "ward-9", "Pat", token=tok, reconnect=False) as member:
        status, body = await call(srv, "GET", "/admin/rooms", admin())
        assert status == 200
        (room,) = [r for r in body["rooms"] if r["room"] == "ward-9"]
        assert room["entry"] == "open" and room["members"][0]["name"] == "Pat"
        assert room["members"][0]["role"] == "participant"
        status, body = await call(srv, "POST", "/admin/rooms/nowhere/end", admin())
        assert (status, body["error"]["code"]) == (404, "not_found")
        status, body = await call(
            srv, "POST", "/admin/rooms/ward-9/end", admin(), json={"reason": "fire drill"}
        )
        assert status == 200
        seen: list[object] = []

        async def collect() -> None:
            async for ev in member.events():
                seen.append(ev)

        task = asyncio.ensure_future(collect())
        await wait_for(lambda: any(isinstance(e, Closed) for e in seen), 5)
        task.cancel()
        errs = [e for e in seen if isinstance(e, ErrorEvent)]
        assert errs and errs[0].code == "session_ended" and errs[0].message == "fire drill"
    status, head = await call(srv, "GET", "/admin/audit/head", admin())
    assert status == 200 and head["size"] >= 3
    key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(head["public_key"]))
    key.verify(
        bytes.fromhex(head["signature"]),
        tree_head_message(head["size"], head["time_ms"], bytes.fromhex(head["root"])),
    )
    status, proof = await call(srv, "GET", "/admin/audit/proof/1", admin())
    assert status == 200 and proof
    status, body = await call(srv, "GET", "/admin/audit/proof/999999", admin())
    assert (status, body["error"]["code"]) == (404, "not_found")
    for bad in ("abc", "-1", "1.5", "%C2%B2", "9" * 40):
        status, body = await call(srv, "GET", f"/admin/audit/proof/{bad}", admin())
        assert (status, body["error"]["code"]) == (400, "bad_field"), bad
        assert "int()" not in body["error"]["message"]


async def test_a_head_collected_over_the_admin_api_anchors_the_log(
    srv: ServerProcess, tmp_path: Path
) -> None:
    from medverse.server.audit import SavedHead, check_against

    status, head = await call(srv, "GET", "/admin/audit/head", admin())
    assert status == 200
    data = srv.env["MEDVERSE_DATA_DIR"]
    assert check_against(data, SavedHead.parse(head)) is None
    grown = dict(head, size=head["size"] + 1000)  # a head the log never signed
    assert "signature" in (check_against(data, SavedHead.parse(grown)) or "")


def test_cli_mints_admin_tokens() -> None:
    import os
    import subprocess
    import sys

    from medverse.server.auth import TokenVerifier

    from .conftest import ROOT

    env = dict(os.environ, MEDVERSE_AUTH_SECRET=SECRET, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "medverse.server.cli", "token", "--admin", "--identity", "ops"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    assert TokenVerifier(secret=SECRET.encode()).verify_admin(out.stdout.strip()) == "ops"
    bad = subprocess.run([*cmd, "--room", "x"], env=env, capture_output=True, cwd=ROOT)
    assert bad.returncode == 2
