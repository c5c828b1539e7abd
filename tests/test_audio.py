"""Spatial audio end to end: real aiortc peers on both ends, on 127.0.0.1 only.

Bots publish tones; listeners measure what arrives (dBFS per channel from the received
frames). Covers panning, distance and its cut-off, never hearing yourself, zones, whispers,
broadcast, ignore, server mute within 100 ms whatever the client does, pause both ways, the
speaking flag, role refusals and malformed or flooding signaling.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import sqlite3
import tempfile
import time
import wave
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from medverse.client_sdk import (
    AudioError,
    LevelMeter,
    Pose,
    RoomAudioRules,
    Session,
    ToneTrack,
    connect,
    file_track,
    tone_track,
)
from medverse.protocol import CLIENT_MESSAGES
from medverse.protocol.audio import (
    AUDIO_OFFER_MAX_BYTES,
    MAX_SDP_CHARS,
    AudioAnswer,
    AudioBroadcast,
    AudioIgnore,
    AudioMute,
    AudioOffer,
    AudioRules,
    AudioWhisper,
    AudioZone,
)
from medverse.protocol.messages import (
    CORE_CLIENT_MESSAGES,
    MAX_CONTROL_BYTES,
    PROTOCOL_VERSION,
    Hello,
    Moderate,
    Pause,
    Ping,
    Pong,
    Welcome,
    decode_message,
    encode_message,
    message_registry,
)
from medverse.rtc import configured_addresses
from medverse.server.audit import DB_FILE
from medverse.server.auth import mint_token

from .conftest import ServerProcess, run_server
from .helpers import RawClient, quat_about_y

SECRET = "a" * 48
HEAD_Y = 1.6
SILENT = -60.0  # dBFS: "does not hear"
LOUD = -45.0  # dBFS: clearly hears a -20 dBFS tone within a few metres


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    data = tempfile.mkdtemp(prefix="medverse-audio-")
    with run_server(
        auth_secret=SECRET, room_linger=0.2, rtc_host_addresses="127.0.0.1", data_dir=data
    ) as s:
        s.data_dir = Path(data)  # type: ignore[attr-defined]
        yield s


def tok(room: str, who: str, role: str = "participant", grants: list[str] | None = None) -> str:
    return mint_token(SECRET.encode(), room=room, identity=who, name=who, role=role, grants=grants)


def chromium_offer() -> str:
    """An audio-only offer the size Chromium writes for a microphone on a machine with a few
    network interfaces (about 5.5 KB): every codec it offers, its header extensions, the
    track's SSRC lines and 40 host candidates (UDP and TCP), all on loopback addresses."""
    cands = []
    foundation = 1_000_000_000
    for i, (addr, proto) in enumerate(
        [(f"127.0.0.{1 + n}", p) for n in range(8) for p in ("udp", "tcp")]
        + [("::1", p) for _ in range(12) for p in ("udp", "tcp")]
    ):
        port = 50000 + i if proto == "udp" else 9
        prio = 2122260223 - i * 1000 if proto == "udp" else 1518280447 - i * 1000
        tcptype = " tcptype active" if proto == "tcp" else ""
        cands.append(
            f"a=candidate:{foundation + i} 1 {proto} {prio} {addr} {port} typ host{tcptype}"
            f" generation 0 network-id {1 + i % 4} network-cost 10"
        )
    lines = [
        "v=0",
        "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0",
        "a=extmap-allow-mixed",
        "a=msid-semantic: WMS 3f5c1a0e-8d1b-4f7a-9c2e-5b6d7e8f9a0b",
        "m=audio 50000 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126",
        "c=IN IP4 127.0.0.1",
        "a=rtcp:9 IN IP4 0.0.0.0",
        *cands,
        "a=ice-ufrag:Xk3v",
        "a=ice-pwd:q9Zp4rT1mW8yB2nC6dF0hJ5k",
        "a=ice-options:trickle",
        "a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35"
        ":DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08",
        "a=setup:actpass",
        "a=mid:0",
        "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
        "a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
        "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
        "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
        "a=sendrecv",
        "a=msid:3f5c1a0e-8d1b-4f7a-9c2e-5b6d7e8f9a0b 6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d",
        "a=rtcp-mux",
        "a=rtcp-rsize",
        "a=rtpmap:111 opus/48000/2",
        "a=rtcp-fb:111 transport-cc",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "a=rtpmap:63 red/48000/2",
        "a=fmtp:63 111/111",
        "a=rtpmap:9 G722/8000",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:13 CN/8000",
        "a=rtpmap:110 telephone-event/48000",
        "a=rtpmap:126 telephone-event/8000",
        "a=ssrc:3735928559 cname:n8Q4r2T6y0U3i5O7",
        "a=ssrc:3735928559 msid:3f5c1a0e-8d1b-4f7a-9c2e-5b6d7e8f9a0b"
        " 6a7b8c9d-0e1f-4a2b-8c3d-4e5f6a7b8c9d",
        "a=end-of-candidates",
    ]
    return "\r\n".join(lines) + "\r\n"


def head(x: float, z: float, yaw: float = 0.0) -> Pose:
    return Pose((x, HEAD_Y, z), quat_about_y(yaw))


class Bot:
    """A member with a tone it can switch on and off and a meter on the mix it receives."""

    def __init__(self, session: Session, tone: ToneTrack | None, meter: LevelMeter) -> None:
        self.session = session
        self.tone = tone
        self.meter = meter

    @property
    def id(self) -> int:
        return self.session.member_id

    def talk(self, level: float | None = -20.0) -> None:
        assert self.tone is not None
        self.tone.level_dbfs = level

    def at(self, x: float, z: float, yaw: float = 0.0) -> None:
        self.session.send_pose(head=head(x, z, yaw))


@contextlib.asynccontextmanager
async def bot(
    url: str,
    room: str,
    who: str,
    pos: tuple[float, float] = (0.0, 0.0),
    *,
    role: str = "participant",
    publish: bool = True,
    freq: float = 440.0,
) -> AsyncIterator[Bot]:
    async with connect(url, room=room, name=who, token=tok(room, who, role)) as s:
        s.send_pose(head=head(*pos))
        tone = tone_track(freq, None) if publish else None
        mix = await s.audio.start(tone)
        meter = LevelMeter(mix)
        try:
            yield Bot(s, tone, meter)
        finally:
            meter.stop()


async def until(
    fn: Callable[[], tuple[float, float]],
    ok: Callable[[tuple[float, float]], bool],
    timeout: float = 3.0,
) -> tuple[float, float]:
    """Poll levels until ``ok`` holds (returning them) or fail with the last ones."""
    deadline = time.monotonic() + timeout
    last = fn()
    while not ok(last):
        if time.monotonic() > deadline:
            raise AssertionError(f"levels never satisfied the check: {last}")
        await asyncio.sleep(0.05)
        last = fn()
    return last


def lv(b: Bot, seconds: float = 0.2) -> Callable[[], tuple[float, float]]:
    return lambda: b.meter.levels(seconds)


def loudest(levels: tuple[float, float]) -> float:
    return max(levels)


# --------------------------------------------------------------------------- spatial


async def test_panning_distance_cutoff_and_self(srv: ServerProcess) -> None:
    async with (
        bot(srv.url, "spatial", "listener", publish=False) as lis,
        bot(srv.url, "spatial", "speaker", (-1.0, 0.0)) as spk,
    ):
        assert configured_addresses() == ("127.0.0.1",)
        spk.talk(-20.0)
        # 90 degrees to the listener's left (listener faces -Z): left louder by >= 6 dB.
        await until(lv(lis), lambda x: x[0] > LOUD and x[0] - x[1] >= 6.0)
        # ... and on the right the channels swap.
        spk.at(1.0, 0.0)
        await until(lv(lis), lambda x: x[1] > LOUD and x[1] - x[0] >= 6.0)
        # Turning the listener's head around swaps them back: panning follows the head.
        lis.at(0.0, 0.0, math.pi)
        await until(lv(lis), lambda x: x[0] > LOUD and x[0] - x[1] >= 6.0)
        lis.at(0.0, 0.0)
        # Level falls monotonically with distance (straight ahead), silent beyond the maximum.
        levels = []
        for d in (1.0, 2.0, 4.0, 8.0, 16.0):
            spk.at(0.0, -d)
            want = -20.0 - 20 * math.log10(d) - 3.0  # inverse distance, centred (-3 dB per ear)
            got = await until(lv(lis), lambda x, w=want: abs(loudest(x) - w) < 2.0)
            levels.append(loudest(got))
        assert all(a > b + 4.0 for a, b in itertools.pairwise(levels)), levels
        spk.at(0.0, -25.0)  # the default maximum distance is 20 m
        await until(lv(lis), lambda x: loudest(x) <= SILENT)
        # The speaker never hears its own voice.
        spk.at(0.0, -1.0)
        await until(lv(lis), lambda x: loudest(x) > LOUD)
        assert loudest(spk.meter.levels(1.0)) <= SILENT
        # The speaking flag and active-speaker events follow the voice.
        assert lis.session.audio.speaking == (spk.id,)
        assert lis.session.avatars[spk.id].speaking
        spk.talk(None)
        await until(lv(lis), lambda x: loudest(x) <= SILENT)
        deadline = time.monotonic() + 2
        while lis.session.audio.speaking or lis.session.avatars[spk.id].speaking:
            assert time.monotonic() < deadline, "speaking flag stuck"
            await asyncio.sleep(0.05)


async def test_zones_whisper_broadcast_and_ignore(srv: ServerProcess) -> None:
    room = "routing"
    async with (
        bot(srv.url, room, "host", (0.0, -2.0), role="host") as host,
        bot(srv.url, room, "z1", (-1.0, 0.0)) as z1,
        bot(srv.url, room, "z2", (1.0, 0.0)) as z2,
        bot(srv.url, room, "out1", (0.0, 1.0)) as out1,
        bot(srv.url, room, "out2", (0.0, 2.0)) as out2,
    ):
        h = host.session.audio
        await h.set_zone(z1.id, 7)
        await h.set_zone(z2.id, 7)
        for b in (host, z1, out1):  # rules are room state every member learns
            await b.session.audio.wait_rules(lambda r: r.zones == {z1.id: 7, z2.id: 7})
        # Zone members hear each other; outside members hear nothing of them, and vice versa.
        z1.talk()
        await until(lv(z2), lambda x: loudest(x) > LOUD)
        assert loudest(out1.meter.levels(0.5)) <= SILENT
        assert loudest(out2.meter.levels(0.5)) <= SILENT
        assert loudest(host.meter.levels(0.5)) <= SILENT
        z1.talk(None)
        await until(lv(z2), lambda x: loudest(x) <= SILENT)  # z1's last frames have passed
        out1.talk()
        await until(lv(out2), lambda x: loudest(x) > LOUD)
        t0 = time.monotonic()
        await asyncio.sleep(0.3)
        assert loudest(z1.meter.levels(time.monotonic() - t0)) <= SILENT
        assert loudest(z2.meter.levels(time.monotonic() - t0)) <= SILENT
        out1.talk(None)
        # Whisper: only the target hears the host, others nothing.
        await h.whisper(out2.id)
        await out2.session.audio.wait_rules(lambda r: r.whispers == {host.id: out2.id})
        assert out1.session.audio.rules.whispers == {}  # private to the pair (and hosts)
        host.talk()
        await until(lv(out2), lambda x: loudest(x) > LOUD)
        await asyncio.sleep(0.3)
        assert loudest(out1.meter.levels(0.3)) <= SILENT
        # Broadcast: heard by everyone, zones included, at the set level regardless of distance.
        await h.whisper(None)
        host.at(0.0, -40.0)
        await h.broadcast(host.id, True, 0.5)
        await z1.session.audio.wait_rules(lambda r: r.broadcast == {host.id: 0.5})
        want = -20.0 + 20 * math.log10(0.5) - 3.0
        for b in (z1, z2, out1, out2):
            await until(lv(b), lambda x, w=want: abs(loudest(x) - w) < 2.0)
        await h.broadcast(host.id, False)
        await until(lv(out1), lambda x: loudest(x) <= SILENT)  # 40 m away: beyond the maximum
        # Ignore works both ways.
        host.talk(None)
        await asyncio.sleep(0.2)  # let the host's last frames pass before it moves close
        host.at(0.0, -2.0)
        await out1.session.audio.ignore(out2.id)
        await out1.session.audio.wait_rules(lambda r: r.ignored == frozenset({out2.id}))
        assert out2.session.audio.rules.ignored == frozenset()
        out2.talk()
        await until(lv(host), lambda x: loudest(x) > LOUD)
        assert loudest(out1.meter.levels(0.4)) <= SILENT
        out2.talk(None)
        out1.talk()
        await until(lv(host), lambda x: loudest(x) > LOUD)
        assert loudest(out2.meter.levels(0.4)) <= SILENT
        # Self mute: nobody hears us, and everyone learns it.
        await out1.session.audio.mute(True)
        await host.session.audio.wait_rules(lambda r: out1.id in r.self_muted)
        await until(lv(host), lambda x: loudest(x) <= SILENT)
    # The hosts' routing changes are audited: who, for whom, what; never any audio.
    db = sqlite3.connect(srv.data_dir / DB_FILE)  # type: ignore[attr-defined]
    rows = db.execute(
        "SELECT kind, actor, subject, detail FROM entries WHERE room = ? AND kind LIKE 'audio%'",
        (room,),
    ).fetchall()
    db.close()
    kinds = [r[0] for r in rows]
    assert kinds.count("audio_zone") == 2 and kinds.count("audio_broadcast") == 2
    assert {r[2] for r in rows if r[0] == "audio_zone"} == {"z1", "z2"}
    assert all(r[1] == "host" for r in rows)


def last_loud_after(meter: LevelMeter, t0: float) -> float | None:
    """Arrival time of the last received frame after ``t0`` louder than SILENT."""
    last = None
    for arrival, left, right, _ in meter.frames:
        if arrival >= t0 and 20 * math.log10(max(left, right, 1e-9)) > SILENT:
            last = arrival
    return last


async def test_server_mute_and_pause(srv: ServerProcess) -> None:
    room = "muting"
    async with (
        bot(srv.url, room, "host", (0.0, -1.0), role="host") as host,
        bot(srv.url, room, "patient", (-1.0, 0.0)) as pat,
        bot(srv.url, room, "other", (1.0, 0.0)) as other,
    ):
        pat.talk()
        await until(lv(host), lambda x: loudest(x) > LOUD)
        await until(lv(other), lambda x: loudest(x) > LOUD)
        t0 = time.monotonic()
        await host.session.send_message(Moderate("mute", pat.id))
        # Whatever the muted client does (unmute itself, renegotiate, keep talking louder) ...
        await pat.session.audio.mute(False)
        pat.talk(-6.0)
        await asyncio.sleep(0.6)
        for b in (host, other):
            last = last_loud_after(b.meter, t0)
            # Frames mixed before the mute was applied are still on their way: the bound is
            # a listener's playout delay plus the mute's round trip on a busy machine.
            assert last is None or last - t0 <= 0.2, f"heard {last - t0:.3f} s after the mute"
        mix = await pat.session.audio.start(pat.tone)
        pat.meter.stop()
        pat.meter = LevelMeter(mix)
        await asyncio.sleep(0.6)
        assert loudest(host.meter.levels(0.5)) <= SILENT
        assert loudest(other.meter.levels(0.5)) <= SILENT
        # The muted member still hears the room.
        other.talk()
        await until(lv(pat), lambda x: loudest(x) > LOUD)
        await host.session.send_message(Moderate("allow_unmute", pat.id))
        await until(lv(host), lambda x: loudest(x) > -30.0)  # the patient (louder) again
        # Pause: heard by nobody and hears nothing, whatever it sends; back on resume.
        other.talk(None)
        await pat.session.send_message(Pause(True))
        await until(lv(host), lambda x: loudest(x) <= SILENT)
        await until(lv(other), lambda x: loudest(x) <= SILENT)
        t_paused = time.monotonic()
        other.talk()
        await until(lv(host), lambda x: loudest(x) > LOUD)
        await asyncio.sleep(0.3)
        assert loudest(pat.meter.levels(time.monotonic() - t_paused)) <= SILENT
        await pat.session.send_message(Pause(False))
        await until(lv(pat), lambda x: loudest(x) > LOUD)
        other.talk(None)
        await until(lv(host), lambda x: loudest(x) > -30.0)


# --------------------------------------------------------------------------- who may do what


async def test_roles_refused(srv: ServerProcess) -> None:
    room = "roles"
    async with connect(srv.url, room=room, name="o", token=tok(room, "obs", "observer")) as obs:
        with pytest.raises(AudioError) as err:
            await obs.audio.start(tone_track())
        assert err.value.code == "forbidden"
        # Observers listen: a receive-only offer works and they hear the room.
        mix = await obs.audio.start(None)
        meter = LevelMeter(mix)
        tk = tok(room, "quiet", grants=["annotate"])
        async with connect(srv.url, room=room, name="q", token=tk) as quiet:
            with pytest.raises(AudioError) as err:
                await quiet.audio.start(tone_track())
            assert err.value.code == "forbidden"
            # A participant without the grant may not whisper, set zones or broadcast.
            for msg in (AudioWhisper(obs.member_id), AudioZone(quiet.member_id, 1)):
                await quiet.send_message(msg)
            async with bot(srv.url, room, "talker", (0.0, -1.0)) as talker:
                talker.talk()
                await until(lambda: meter.levels(0.2), lambda x: loudest(x) > LOUD)
                await talker.session.send_message(AudioBroadcast(talker.id, True))
                codes = []
                async for ev in talker.session.events():
                    if ev.type == "error":
                        codes.append(ev.code)
                        break
                assert codes == ["forbidden"]
        meter.stop()


async def raw_member(url: str, room: str, who: str) -> tuple[RawClient, Welcome]:
    raw = await RawClient.open(url)
    hello = Hello(PROTOCOL_VERSION, room, who, 3, None, tok(room, who))
    await raw.ws.send_bytes(encode_message(hello))
    w = await raw.next_control()
    assert isinstance(w, Welcome)
    return raw, w


async def test_malformed_and_flooding_signaling(srv: ServerProcess) -> None:
    room = "badaudio"
    async with (
        bot(srv.url, room, "good-l", publish=False) as good,
        bot(srv.url, room, "good-s", (0.0, -1.0)) as speaker,
    ):
        speaker.talk()
        await until(lv(good), lambda x: loudest(x) > LOUD)
        raw, w = await raw_member(srv.url, room, "mallory")
        sdp_ok = (
            "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\n"
            "a=candidate:1 1 udp 2122194687 127.0.0.1 9 typ host\r\n"
        )

        async def expect(frame: bytes, code: str) -> None:
            await raw.ws.send_bytes(frame)
            # Generous: an offer that aiortc reads waits for the server's loop, which a busy
            # 2-core machine shares with the bots' WebRTC peers.
            err = await raw.next_error(timeout=20.0)
            assert (err.code, err.fatal) == (code, False), (frame[:60], err)

        cases: list[tuple[bytes, str]] = [
            (encode_message(AudioOffer("hello", False)), "out_of_range"),  # not SDP
            (encode_message(AudioOffer(sdp_ok + "m=video 9 x 96\r\n", False)), "bad_field"),
            (encode_message(AudioOffer(sdp_ok.replace("audio", "video"), False)), "bad_field"),
            (encode_message(AudioOffer(sdp_ok + "a=sendonly\r\n", False)), "bad_field"),
            (encode_message(AudioOffer(sdp_ok + "a=recvonly\r\n", True)), "bad_field"),
            (encode_message(AudioOffer(sdp_ok + "a=inactive\r\n", False)), "bad_field"),
            (
                encode_message(AudioOffer(sdp_ok + "x" * (MAX_SDP_CHARS + 1 - len(sdp_ok)), False)),
                "out_of_range",
            ),
            (encode_message(Moderate("mute", 2, "x" * 5000)), "oversized"),
            (
                b"\x01" + msgpack.packb({"t": "audio_offer", "sdp": 5, "publish": 1}),
                "bad_field",
            ),
            (
                b"\x01"
                + msgpack.packb({"t": "audio_offer", "sdp": sdp_ok, "publish": True, "extra": 1}),
                "bad_field",
            ),
            (encode_message(AudioZone(w.member_id, 70000)), "out_of_range"),
            (encode_message(AudioIgnore(0, True)), "out_of_range"),
            (encode_message(AudioIgnore(w.member_id, True)), "bad_field"),  # yourself
            (encode_message(AudioIgnore(999999, True)), "not_found"),
            (encode_message(AudioWhisper(w.member_id)), "bad_field"),  # yourself
            (encode_message(AudioWhisper(424242)), "not_found"),
            (encode_message(AudioMute("yes")), "bad_field"),  # type: ignore[arg-type]
            (encode_message(AudioRules((), (), (), (), ())), "unknown_type"),  # server-only
        ]
        for frame, code in cases:
            await expect(frame, code)
        # An offer that passes the checks but is no usable SDP: refused once aiortc reads it.
        await expect(encode_message(AudioOffer(sdp_ok + "a=recvonly\r\n", False)), "bad_field")
        # Flooding offers: a few are negotiated, the rest refused as rate limited. Error replies
        # have their own token bucket (error_reply_rate a second, as many in a burst), which the
        # cases above may have drained: wait for it to refill so no refusal of the flood is
        # swallowed by it.
        await asyncio.sleep(1.5)
        codes = set()
        for _ in range(15):
            await raw.ws.send_bytes(encode_message(AudioOffer(sdp_ok + "a=recvonly\r\n", False)))
        deadline = time.monotonic() + 20
        while "rate_limited" not in codes and time.monotonic() < deadline:
            codes.add((await raw.next_error(timeout=20.0)).code)
        assert "rate_limited" in codes
        # Flooding rule changes: coalesced, the server and the others carry on.
        for i in range(100):
            await raw.ws.send_bytes(encode_message(AudioMute(i % 2 == 0)))
        await raw.ws.send_bytes(encode_message(Ping(7, 1.0)))
        while not isinstance(m := await raw.next_control(timeout=20.0), Pong):
            assert m.TYPE in ("audio_rules", "error", "audio_speaking"), m
        await until(lv(good), lambda x: loudest(x) > LOUD)
        health = json.loads(srv.get("/health"))
        # The mixer kept running through the flood: a mix takes a few ms on a quiet machine;
        # the bound only says it never stalled for frames on end (a busy shared machine
        # delays some mixes by tens of ms).
        assert health["audio"]["peers"] >= 2 and health["audio"]["mix_ms"]["p99"] < 100
        assert "medverse_audio_mix_seconds" in srv.get("/metrics")
        await raw.close()


def test_mixer_degrades_to_loudest() -> None:
    """With a cap of one speaker per listener, the loudest one is the one heard."""

    async def main(url: str) -> None:
        room = "cap"
        async with (
            bot(url, room, "l", publish=False) as lis,
            bot(url, room, "near", (0.0, -1.0), freq=440.0) as near,
            bot(url, room, "far", (0.0, -4.0), freq=660.0) as far,
        ):
            near.talk()
            far.talk()
            want = -20.0 - 3.0  # the near one alone (1 m: reference level), not the sum
            await until(lv(lis), lambda x: abs(loudest(x) - want) < 1.5)
            near.talk(None)
            await until(lv(lis), lambda x: abs(loudest(x) - (want - 12.0)) < 1.5)

    with run_server(auth_secret=SECRET, audio_max_speakers=1) as s:
        asyncio.run(main(s.url))


async def test_publish_a_file(srv: ServerProcess, tmp_path: Path) -> None:
    """Any aiortc track can be published: here a WAV file through aiortc's media player."""
    path = tmp_path / "voice.wav"
    t = np.arange(48000 * 3) / 48000
    pcm = (0.1 * math.sqrt(2) * np.sin(2 * np.pi * 330 * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(pcm.tobytes())
    async with bot(srv.url, "file", "listener", publish=False) as lis:
        async with connect(srv.url, room="file", name="f", token=tok("file", "reader")) as s:
            s.send_pose(head=head(0.0, -1.0))
            track = file_track(str(path))
            try:
                await s.audio.start(track)
                # -20 dBFS, centred (-3 dB per ear), and aiortc's encoder upmixes the mono
                # file to stereo at -3 dB.
                await until(lv(lis), lambda x: abs(loudest(x) - (-20.0 - 6.0)) < 2.0)
            finally:
                # The track is the application's: stopping it ends the player's thread, which
                # would otherwise outlive this test's event loop.
                track.stop()


async def test_audio_survives_a_room_reconnect(srv: ServerProcess) -> None:
    """The WebRTC connection is the member's, not the WebSocket's: a dropped room connection
    that resumes within the grace window keeps the audio flowing, and the rules come back."""
    async with (
        bot(srv.url, "resume", "listener", publish=False) as lis,
        bot(srv.url, "resume", "speaker", (0.0, -1.0)) as spk,
    ):
        spk.talk()
        await until(lv(lis), lambda x: loudest(x) > LOUD)
        await spk.session.audio.mute(True)
        await lis.session.audio.wait_rules(lambda r: spk.id in r.self_muted)
        await spk.session.audio.mute(False)
        await lis.session.audio.wait_rules(lambda r: not r.self_muted)
        lis.session.audio.rules = RoomAudioRules(zones={999: 1})  # stale: must be replaced
        ws = lis.session._ws
        assert ws is not None
        await ws.close()  # the room connection drops (no leave message)
        events = lis.session.events()
        while (ev := await asyncio.wait_for(anext(events), 5)).type != "resumed":
            pass
        assert ev.same_member  # type: ignore[union-attr]
        await lis.session.audio.wait_rules(lambda r: r.zones == {})
        t0 = time.monotonic()
        await asyncio.sleep(0.3)
        assert loudest(lis.meter.levels(time.monotonic() - t0)) > LOUD
        assert lis.session.audio.pc is not None


async def test_revoking_publish_audio_silences_at_once(srv: ServerProcess) -> None:
    room = "revoke"
    async with (
        bot(srv.url, room, "host", (0.0, -1.0), role="host") as host,
        bot(srv.url, room, "talker", (-1.0, 0.0)) as talker,
    ):
        talker.talk()
        await until(lv(host), lambda x: loudest(x) > LOUD)
        await host.session.change_role(talker.id, grant="publish_audio", allow=False)
        await until(lv(host), lambda x: loudest(x) <= SILENT, timeout=1.0)
        # The talker still hears the room, and cannot publish again without the grant.
        host.talk()
        await until(lv(talker), lambda x: loudest(x) > LOUD)
        with pytest.raises(AudioError) as err:
            await talker.session.audio.start(talker.tone)
        assert err.value.code == "forbidden"
        await host.session.change_role(talker.id, grant="publish_audio", allow=True)
        await asyncio.sleep(0.1)
        talker.tone = tone_track(440.0, -20.0)  # the refused attempt ended the old track
        await talker.session.audio.start(talker.tone)
        host.talk(None)
        await until(lv(host), lambda x: loudest(x) > LOUD)


def test_control_frame_limits_per_type() -> None:
    """A browser's offer is larger than other control frames may be; nothing else is."""
    offer = AudioOffer(chromium_offer(), True)
    frame = encode_message(offer)
    assert 5000 < len(frame) < AUDIO_OFFER_MAX_BYTES
    assert decode_message(frame, CLIENT_MESSAGES) == offer
    # Without the audio family the decoder knows no larger type: the usual limit.
    core = message_registry(CORE_CLIENT_MESSAGES)
    assert decode_message(frame, core).code.value == "oversized"  # type: ignore[union-attr]
    refused = {
        "moderate": encode_message(Moderate("mute", 2, "x" * MAX_CONTROL_BYTES)),
        "bad msgpack": b"\x01" + bytes(8000),
        "no type": b"\x01" + msgpack.packb({"sdp": "x" * 5000}),
        "offer too long": encode_message(AudioOffer("v=0\n" + "x" * AUDIO_OFFER_MAX_BYTES, True)),
    }
    for name, data in refused.items():
        err = decode_message(data, CLIENT_MESSAGES)
        assert getattr(err, "code", None) == "oversized", name
    long_sdp = AudioOffer("v=0\n" + "x" * (MAX_SDP_CHARS - 3), True)
    assert len(encode_message(long_sdp)) <= AUDIO_OFFER_MAX_BYTES
    assert decode_message(encode_message(long_sdp), CLIENT_MESSAGES).code == "out_of_range"  # type: ignore[union-attr]


#: What a fresh member may be sent by the room's plugins while its offer is answered.
ROOM_CHATTER = ("audio_rules", "audio_speaking", "obj_synced", "img_synced", "img_pointers")


async def test_browser_sized_offer_is_answered(srv: ServerProcess) -> None:
    raw, _ = await raw_member(srv.url, "browser-offer", "chromium")
    await raw.ws.send_bytes(encode_message(AudioOffer(chromium_offer(), True)))
    while not isinstance(m := await raw.next_control(timeout=10), AudioAnswer):
        assert m.TYPE in ROOM_CHATTER, m
    assert m.publish and "opus/48000/2" in m.sdp
    await raw.close()


async def test_offer_without_a_loopback_candidate_is_refused(srv: ServerProcess) -> None:
    """A loopback-only server never checks a browser's other interfaces: an offer with no
    loopback candidate left is refused before any connectivity check, saying why."""
    sdp = chromium_offer()
    lines = [ln for ln in sdp.split("\r\n") if not ln.startswith("a=candidate:")]
    at = lines.index("a=ice-ufrag:Xk3v")
    lines[at:at] = [
        "a=candidate:1 1 udp 2122063615 192.0.2.2 52164 typ host generation 0",
        "a=candidate:2 1 udp 2122134271 fd00::2 52336 typ host generation 0",
        "a=candidate:3 1 udp 2122260223 5f1e2d3c-4b5a-4697-8877-665544332211.local 58001 typ host",
    ]
    raw, _ = await raw_member(srv.url, "browser-offer", "elsewhere")
    await raw.ws.send_bytes(encode_message(AudioOffer("\r\n".join(lines), True)))
    while (m := await raw.next_control(timeout=10)).TYPE != "error":
        assert m.TYPE in ROOM_CHATTER, m
    assert m.code == "bad_field" and "loopback" in m.message, m  # type: ignore[attr-defined]
    # The member carries on: its next offer, with loopback candidates, is answered.
    await raw.ws.send_bytes(encode_message(AudioOffer(chromium_offer(), True)))
    while not isinstance(m := await raw.next_control(timeout=10), AudioAnswer):
        assert m.TYPE in ROOM_CHATTER, m
    await raw.close()
