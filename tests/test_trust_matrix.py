"""Every role and grant against every action, on every channel: allowed actions succeed, the
others are refused with ``forbidden``; and no channel takes requests before a verified join."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from benchmarks.dicomgen import synthetic_ct
from medverse.client_sdk import AssetError, ObjectError, RefusedError, connect, tone_track
from medverse.client_sdk.audio import AudioError
from medverse.client_sdk.images import ImageError
from medverse.protocol.audio import AudioOffer
from medverse.protocol.messages import PROTOCOL_VERSION, Hello, Moderate, Waiting, encode_message
from medverse.protocol.objects import Spawn
from medverse.server.auth import mint_token

from .conftest import ServerProcess, run_server
from .helpers import RawClient, wait_for
from .models import provide, triangle_glb

SECRET = "t" * 48
ROOM = "matrix"


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    data = tempfile.mkdtemp(prefix="medverse-matrix-")
    # The matrix rooms are clinic rooms (every plugin, the server's own entry rules), so that
    # moving members between them (the ``transfer`` grant) is a channel too.
    clinic = Path(data) / "clinic.toml"
    clinic.write_text('[types.matrix]\nrooms = ["matrix", "matrix-*"]\n', encoding="utf-8")
    with run_server(
        auth_secret=SECRET, data_dir=data, clinic=clinic, rtc_host_addresses="127.0.0.1"
    ) as s:
        yield s


def tok(who: str, role: str, grants: list[str] | None = None, room: str = ROOM) -> str:
    return mint_token(SECRET.encode(), room=room, identity=who, name=who, role=role, grants=grants)


# (role, grants given in the token or None for the role's own)
CASES: list[tuple[str, list[str] | None]] = [
    ("host", None),
    ("participant", None),
    ("observer", None),
    ("participant", []),
    ("participant", ["publish_audio"]),
    ("participant", ["manipulate_objects"]),
    ("participant", ["annotate"]),
    ("participant", ["upload_assets"]),
    ("participant", ["moderate"]),
]
ROLE_GRANTS = {
    "host": {"publish_audio", "manipulate_objects", "annotate", "upload_assets", "moderate"},
    "participant": {"publish_audio", "manipulate_objects", "annotate"},
    "observer": {"hidden"},
}


async def attempt(coro: object) -> str:
    """``ok``, or the code of the typed refusal."""
    try:
        await coro  # type: ignore[misc]
    except (AudioError, ObjectError, AssetError, ImageError, RefusedError) as exc:
        return exc.code
    return "ok"


@pytest.mark.parametrize(("role", "grants"), CASES, ids=[f"{r}-{g}" for r, g in CASES])
async def test_every_grant_on_every_action(
    srv: ServerProcess, role: str, grants: list[str] | None
) -> None:
    held = set(ROLE_GRANTS[role] if grants is None else grants)
    who = f"{role}-{'-'.join(grants) if grants is not None else 'default'}"
    host_token = tok("lead", "host")
    heart, _ = await provide(srv.http, ROOM, host_token)
    async with connect(srv.url, ROOM, "lead", token=host_token) as lead:
        await lead.objects.wait_synced()
        oid = await lead.spawn(heart, (0.0, 1.0, 0.0))
        await lead.grab(oid)
        async with connect(srv.url, ROOM, who, token=tok(who, role, grants)) as s:
            await s.objects.wait_synced()
            expect = {
                "publish audio": "publish_audio" in held and "hidden" not in held,
                "spawn": "manipulate_objects" in held,
                "annotate": "annotate" in held,
                "upload": "upload_assets" in held,
                "force-release": "moderate" in held,
            }
            got = {
                "publish audio": await attempt(s.audio.start(tone_track())),
                "spawn": await attempt(s.spawn(heart)),
                "annotate": await attempt(s.annotate(oid, "pin", [(0.0, 0.0, 0.0)], text="x")),
                "upload": await attempt(s.upload_asset(triangle_glb(nodes=(who,)))),
                "force-release": await attempt(s.force_release(oid)),
            }
            await s.audio.close()
            for action, allowed in expect.items():
                assert got[action] == ("ok" if allowed else "forbidden"), (action, got)
            # Everyone may listen, observers included.
            assert await attempt(s.audio.start(None)) == "ok"
            await s.audio.close()
            # Observers are hidden from the member list; others are not.
            await asyncio.sleep(0.1)
            assert (s.member_id in lead.members) is ("hidden" not in held)


async def test_nothing_before_a_verified_join(srv: ServerProcess) -> None:
    """Signaling and object requests before hello, or while waiting in the lobby, are refused,
    and bad tokens never reach any channel."""
    offer = AudioOffer("v=0\r\n", False)
    spawn = Spawn(1, "ab" * 32, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0), 1.0, None)
    for msg in (offer, spawn):
        raw = await RawClient.open(srv.url)
        await raw.ws.send_bytes(encode_message(msg))
        err = await raw.next_error()
        assert err.code == "handshake_required" and err.fatal
        await raw.close()
    for bad in (
        None,
        mint_token(b"x" * 48, room=ROOM, identity="f", role="host"),
        mint_token(SECRET.encode(), room=ROOM, identity="e", role="host", ttl=-60),
        tok("other", "host", room="elsewhere"),
    ):
        raw = await RawClient.open(srv.url)
        await raw.ws.send_bytes(encode_message(Hello(PROTOCOL_VERSION, ROOM, "x", 3, None, bad)))
        err = await raw.next_error()
        assert err.code in ("unauthorized", "token_expired") and err.fatal
        await raw.close()
    # A lobby member cannot signal audio or touch objects until admitted.
    room = "lobbied"
    async with connect(srv.url, room, "host", token=tok("h", "host", room=room)) as host:
        await host.send_message(Moderate("lobby"))
        await asyncio.sleep(0.2)
        raw = await RawClient.open(srv.url)
        hello = Hello(PROTOCOL_VERSION, room, "p", 3, None, tok("p", "participant", room=room))
        await raw.ws.send_bytes(encode_message(hello))
        assert isinstance(await raw.next_control(), Waiting)
        for msg in (offer, spawn):
            await raw.ws.send_bytes(encode_message(msg))
            err = await raw.next_error()
            assert err.code == "forbidden" and not err.fatal
        await raw.close()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{srv.http}/rooms/{room}/assets") as r:
            assert r.status == 401


async def test_grants_given_and_taken_live_hold_on_every_channel(srv: ServerProcess) -> None:
    """A host gives each grant to a member who had none and takes it away again: WebSocket
    messages, asset and image HTTP, audio signaling and clinic transfers all follow the
    member's grants now, not the token's role."""
    host_token = tok("lead-live", "host")
    heart, _ = await provide(srv.http, ROOM, host_token)
    member_token = tok("live", "participant", [])
    async with (
        connect(srv.url, ROOM, token=host_token) as lead,
        connect(srv.url, ROOM, token=member_token) as s,
    ):
        await lead.objects.wait_synced()
        await s.objects.wait_synced()
        oid = await lead.spawn(heart, (0.0, 1.0, 0.0))
        await lead.grab(oid)
        n = 0

        async def try_grant(grant: str, channel: str) -> str:
            nonlocal n
            n += 1
            if channel == "audio":
                code = await attempt(s.audio.start(tone_track()))
                await s.audio.close()
                return code
            if channel == "spawn":
                return await attempt(s.spawn(heart))
            if channel == "annotate":
                return await attempt(s.annotate(oid, "pin", [(0.0, 0.0, 0.0)]))
            if channel == "asset upload":
                return await attempt(s.upload_asset(triangle_glb(nodes=(f"live{n}",))))
            if channel == "series upload":
                return await attempt(s.upload_series(synthetic_ct(16, 16, 2 + n)))
            if channel == "transfer":
                who = f"moved{n}"
                async with connect(srv.url, ROOM, token=tok(who, "participant")) as m:
                    return await attempt(s.transfer(m.member_id, f"{ROOM}-{n}"))
            if channel == "force-release":
                await lead.grab(oid)  # held again, so force-releasing changes something
                return await attempt(s.force_release(oid))
            if channel == "asset removal":
                # Someone else's asset: only its uploader or a moderator may remove it.
                info = await lead.upload_asset(triangle_glb(nodes=(f"lead{n}",)))
                return await attempt(s.assets.remove(info.sha256))
            if channel == "audio zone":
                return await attempt(s.audio.set_zone(lead.member_id, n))
            assert channel == "audio broadcast"
            return await attempt(s.audio.broadcast(lead.member_id, on=n % 2 == 0))

        channels = {
            "publish_audio": ["audio"],
            "manipulate_objects": ["spawn"],
            "annotate": ["annotate"],
            "upload_assets": ["asset upload", "series upload"],
            "transfer": ["transfer"],
            "moderate": ["force-release", "asset removal", "audio zone", "audio broadcast"],
        }
        for grant, ways in channels.items():
            for way in ways:
                assert await try_grant(grant, way) == "forbidden", (grant, way)
        for grant, ways in channels.items():
            if grant == "moderate":
                await lead.release(oid)
            await lead.change_role(s.member_id, grant=grant, allow=True)
            await wait_for(lambda g=grant: s.grants is not None and g in s.grants)
            for way in ways:
                assert await try_grant(grant, way) == "ok", (grant, way)
            await lead.change_role(s.member_id, grant=grant, allow=False)
            await wait_for(lambda g=grant: s.grants is not None and g not in s.grants)
            for way in ways:
                assert await try_grant(grant, way) == "forbidden", (grant, way)
