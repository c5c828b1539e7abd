"""Join tokens, roles, connection limits and TLS, against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from medverse.client_sdk import Joined, JoinError, Pose, connect
from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    Welcome,
    encode_message,
    encode_pose,
)
from medverse.server.auth import TokenVerifier, mint_token, parse_ttl
from medverse.server.config import ServerConfig

from .conftest import ROOT, run_server
from .helpers import RawClient, wait_for

SECRET = "s" * 48


def token(**kw: object) -> str:
    args: dict = {"room": "ward", "identity": "dr-a", "name": "Dr A", "role": "participant"}
    args.update(kw)
    return mint_token(SECRET.encode(), **args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- verifier


def test_valid_token_gives_identity_and_role_grants() -> None:
    v = TokenVerifier(secret=SECRET.encode())
    ident = v.verify(token(role="host"), "ward")
    assert (ident.subject, ident.name, ident.room, ident.role) == ("dr-a", "Dr A", "ward", "host")
    assert ident.can("moderate") and ident.can("upload_assets") and not ident.hidden
    obs = v.verify(token(role="observer"), "ward")
    assert obs.hidden and not obs.can("publish_audio")
    custom = v.verify(token(grants=["annotate"]), "ward")
    assert custom.grants == frozenset({"annotate"})
    with pytest.raises(ProtocolError) as e:
        custom.require("moderate")
    assert e.value.code is ErrorCode.FORBIDDEN


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: token(ttl=-60), ErrorCode.TOKEN_EXPIRED),
        (lambda: mint_token(b"x" * 48, room="ward", identity="a"), ErrorCode.UNAUTHORIZED),
        (lambda: token(room="other"), ErrorCode.UNAUTHORIZED),
        (lambda: "not.a.token", ErrorCode.UNAUTHORIZED),
        (lambda: jwt.encode({"sub": "a", "room": "ward"}, SECRET, "HS256"), ErrorCode.UNAUTHORIZED),
        (
            lambda: jwt.encode(
                {"sub": "a", "room": "ward", "role": "king", "exp": time.time() + 60}, SECRET
            ),
            ErrorCode.UNAUTHORIZED,
        ),
        (
            lambda: jwt.encode(
                {
                    "sub": "a",
                    "room": "ward",
                    "role": "host",
                    "grants": ["fly"],
                    "exp": time.time() + 60,
                },
                SECRET,
            ),
            ErrorCode.UNAUTHORIZED,
        ),
        (  # "alg: none" must never be accepted
            lambda: jwt.encode(
                {"sub": "a", "room": "ward", "role": "host", "exp": time.time() + 60}, None, "none"
            ),
            ErrorCode.UNAUTHORIZED,
        ),
    ],
)
def test_bad_tokens_are_refused_with_typed_errors(make, code: ErrorCode) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProtocolError) as e:
        TokenVerifier(secret=SECRET.encode()).verify(make(), "ward")
    assert e.value.code is code


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_identity_provider_public_keys(kind: str) -> None:
    if kind == "ed25519":
        priv: object = ed25519.Ed25519PrivateKey.generate()
        alg = "EdDSA"
    else:
        priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        alg = "RS256"
    pub = priv.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = {
        "sub": "idp-user",
        "name": "Dr B",
        "room": "ward",
        "role": "host",
        "exp": int(time.time()) + 60,
    }
    v = TokenVerifier(public_key_pem=pub)
    assert v.verify(jwt.encode(claims, priv, alg), "ward").name == "Dr B"  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):  # an HS256 token made with the public key as secret
        v.verify(jwt.encode(claims, b"k" * 64, "HS256"), "ward")
    other = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError):
        TokenVerifier(public_key_pem=other)


def test_short_secrets_and_durations() -> None:
    with pytest.raises(ValueError):
        TokenVerifier(secret=b"short")
    assert parse_ttl("90") == 90 and parse_ttl("30m") == 1800 and parse_ttl("1h") == 3600
    with pytest.raises(ValueError):
        parse_ttl("soon")


def test_boolean_settings_from_environment() -> None:
    assert ServerConfig.from_env({"MEDVERSE_NO_AUTH": "false"}).no_auth is False
    assert ServerConfig.from_env({"MEDVERSE_NO_AUTH": "1"}).no_auth is True
    with pytest.raises(ValueError):
        ServerConfig.from_env({"MEDVERSE_NO_AUTH": "maybe"})


# --------------------------------------------------------------------------- live server


async def hello_with(url: str, room: str, tok: str | None) -> tuple[RawClient, object]:
    raw = await RawClient.open(url)
    await raw.ws.send_bytes(encode_message(Hello(PROTOCOL_VERSION, room, "x", 3, None, tok)))
    return raw, await raw.next_control()


async def test_joins_need_a_valid_token_for_the_room() -> None:
    with run_server(auth_secret=SECRET) as srv:
        cases = {
            "missing": (None, "unauthorized"),
            "expired": (token(ttl=-60), "token_expired"),
            "forged": (mint_token(b"y" * 48, room="ward", identity="a"), "unauthorized"),
            "other room": (token(room="lab"), "unauthorized"),
        }
        for name, (tok, code) in cases.items():
            raw, reply = await hello_with(srv.url, "ward", tok)
            assert isinstance(reply, Error), name
            assert (reply.code, reply.fatal) == (code, True), name
            await raw.close()
        assert '"members": 0' in srv.get("/health")
        metrics = srv.get("/metrics")
        assert 'medverse_auth_refusals_total{code="unauthorized"} 3.0' in metrics
        # A good token joins, under the name the token gives (not the one in hello).
        raw, reply = await hello_with(srv.url, "ward", token(name="Dr Token"))
        assert isinstance(reply, Welcome)
        async with connect(srv.url, room="ward", name="ignored", token=token(identity="b")) as s:
            assert s.members[reply.member_id] == "Dr Token"
        await raw.close()
        with pytest.raises(JoinError) as e:
            async with connect(srv.url, room="ward", name="x"):
                pass
        assert e.value.code == "unauthorized"


async def test_observer_is_hidden_and_receives_only() -> None:
    with run_server(auth_secret=SECRET) as srv:
        async with connect(srv.url, room="ward", name="a", token=token(identity="a")) as a:
            events = a.events()
            a.send_pose(head=Pose((0.0, 1.6, 0.0)))
            obs = await RawClient.open(srv.url)
            await obs.ws.send_bytes(
                encode_message(
                    Hello(
                        PROTOCOL_VERSION,
                        "ward",
                        "x",
                        3,
                        None,
                        token(identity="student", role="observer"),
                    )
                )
            )
            welcome = await obs.next_control()
            assert isinstance(welcome, Welcome)
            assert [m.id for m in welcome.members] == [a.member_id]
            # The observer sends no pose; others never learn it is there.
            await obs.ws.send_bytes(encode_pose(1, [((0, 1, 0), (0, 0, 0, 1)), None, None]))
            err = await obs.next_error()
            assert err.code == "forbidden"
            async with connect(srv.url, room="ward", name="b", token=token(identity="b")) as b:
                ev = await asyncio.wait_for(anext(events), 5)
                assert isinstance(ev, Joined) and ev.member_id == b.member_id
                assert welcome.member_id not in b.members
                await wait_for(lambda: a.member_id in b.avatars)
                await asyncio.sleep(0.2)
                assert welcome.member_id not in b.avatars
                assert welcome.member_id not in a.avatars
            await obs.close()
            with pytest.raises(TimeoutError):  # no "left" for the observer either
                while True:
                    ev = await asyncio.wait_for(anext(events), 0.5)
                    assert ev.member_id != welcome.member_id  # type: ignore[union-attr]


async def test_connections_per_address_are_capped() -> None:
    with run_server(max_connections_per_address=3) as srv:
        raws = [await RawClient.open(srv.url) for _ in range(3)]
        extra = await RawClient.open(srv.url)
        # SPEC.md "Close codes": the refused connection gets a fatal error, then close 4003.
        err = await extra.next_control()
        assert isinstance(err, Error)
        assert (err.code, err.fatal) == ("too_many_connections", True)
        msg = await extra.ws.receive(timeout=5)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 4003)
        assert extra.ws.close_code == 4003
        await extra.close()
        for r in raws:
            await r.close()
        await asyncio.sleep(0.3)
        ok = await RawClient.open(srv.url)
        assert isinstance(await ok.join("cap"), Welcome)
        await ok.close()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_tls_serves_wss() -> None:
    tmp = Path(tempfile.mkdtemp())
    cert, key = _self_signed(tmp)
    with run_server(tls_cert=cert, tls_key=key) as srv:
        ctx = ssl.create_default_context(cafile=str(cert))
        url = srv.url.replace("ws://", "wss://")
        async with connect(url, room="tls", name="t", ssl=ctx) as s:
            s.send_pose(head=Pose((0.0, 1.6, 0.0)))
            await wait_for(lambda: s.avatars.get(s.member_id) and s.avatars[s.member_id].head)


async def test_secure_by_default_creates_a_private_secret() -> None:
    data = Path(tempfile.mkdtemp()) / "data"
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEDVERSE_DATA_DIR=str(data))
    env.pop("MEDVERSE_NO_AUTH", None)
    with run_server(data_dir=data, no_auth=0) as srv:
        secret_file = data / "auth_secret"
        assert secret_file.exists()
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        raw, reply = await hello_with(srv.url, "demo", None)
        assert isinstance(reply, Error) and reply.code == "unauthorized"
        await raw.close()
        # medverse token signs with that same secret, and the server takes it.
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "medverse.server.cli",
                "token",
                "--room",
                "demo",
                "--identity",
                "dr-c",
                "--name",
                "Dr C",
                "--role",
                "host",
                "--ttl",
                "10m",
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        async with connect(srv.url, room="demo", name="x", token=out) as s:
            assert s.member_id >= 1
