"""The spatial audio plugin: a :class:`RoomAudio` per room and the server-wide mixer clock.

:class:`RoomAudio` (a room plugin) follows the room's members, negotiates their peers
(:mod:`.signaling`), applies the routing-rule messages to its mix state (:mod:`.mixing`) and
sends members the rules and who is speaking. :class:`SpatialAudio` (the server plugin) makes
one per room and, every 20 ms on a :class:`~medverse.server.clock.FixedRateClock`, has each room
decode and mix a frame, then encodes every listener's frame (:mod:`.codec`) into its outgoing
track, which aiortc sends; it degrades the mix when it falls behind and keeps the metrics.

Dependencies run one way: the service drives the rooms, a room drives its mix state, and the
mix state only counts into the :class:`~.mixing.MixCounters` it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from medverse.protocol.audio import (
    CLIENT_AUDIO,
    SERVER_AUDIO,
    AudioAnswer,
    AudioBroadcast,
    AudioIgnore,
    AudioMute,
    AudioOffer,
    AudioRules,
    AudioSpeaking,
    AudioWhisper,
    AudioZone,
)
from medverse.protocol.errors import ErrorCode, ProtocolError
from medverse.protocol.messages import Message

from ..clock import FixedRateClock
from ..config import ServerConfig
from ..plugins import MemberView, RoomContext, RoomPlugin, ServerContext, ServerPlugin
from .mixing import MixCounters, RoomMix
from .signaling import (
    MixTrack,
    OfferLimiter,
    Peer,
    PeerCloser,
    check_offer,
    negotiate,
    read_track,
    restrict_ice,
)
from .spatial import FRAME_SAMPLES, SAMPLE_RATE

log = logging.getLogger("medverse.audio")

FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
#: Listener frames encoded, and speaker frames decoded, between two yields to the event loop
#: (about 0.15 and 0.05 ms each).
ENCODE_CHUNK = 4
DECODE_CHUNK = 8
#: How long the mixer stays degraded after it last fell behind, in frames.
DEGRADE_FRAMES = 50

#: The rules every member sees alike (zones, broadcast, self-muted) and every whisper.
SharedRules = tuple[list[int], list[int], list[int], list[tuple[int, int]]]


class RoomAudio(RoomPlugin):
    """A room's audio: its peers, its mix state and its routing rules.

    The server-wide :class:`SpatialAudio` runs the mixer clock and calls :meth:`decode` and
    :meth:`mix_frame` every 20 ms; this plugin handles the room's signaling and rule messages.
    """

    name = "audio"
    messages = CLIENT_AUDIO
    server_messages = SERVER_AUDIO

    def __init__(self, ctx: RoomContext, counters: MixCounters, closer: PeerCloser) -> None:
        super().__init__(ctx)
        self.mix = RoomMix(ctx.config, ctx.entities, counters)
        self._counters = counters
        self._closer = closer
        self.peers: dict[int, Peer] = {}  # member id -> peer
        #: Set when the room has closed (the service then forgets it).
        self.closed = False
        self.rules_dirty = False
        #: The rules each member was last sent (so unchanged rules are not sent again).
        self.sent_rules: dict[int, AudioRules] = {}
        self._negotiating: dict[int, asyncio.Task[None]] = {}  # member id -> task
        self._offers = OfferLimiter()
        self._rules_timer: asyncio.TimerHandle | None = None

    # ----------------------------------------------------------------- the mixer's side

    @property
    def peer_count(self) -> int:
        """WebRTC peers of the room's members (0: nothing to mix)."""
        return len(self.peers)

    def speaker_slots(self) -> list[int]:
        """The publishing slots whose frames :meth:`decode` reads."""
        return list(self.mix.inboxes)

    def decode(self, slots: list[int]) -> None:
        """Decode what these speakers sent since the last frame (see RoomMix.decode_pending)."""
        self.mix.decode_pending(slots)

    def mix_frame(
        self, now: float, cap: int, decode: bool = True
    ) -> list[tuple[MixTrack, np.ndarray]]:
        """Mix one 20 ms frame for every listener (each hears at most its ``cap`` loudest
        speakers, 0: all); returns (track, frame) pairs to encode. Tells the room who speaks
        when that changed."""
        frame = self.mix.mix_frame(now, self.ctx.tick, cap, decode)
        if frame.speaking is not None:
            self.ctx.broadcast(AudioSpeaking(frame.speaking))
        if frame.pcm is None:
            return []
        jobs: list[tuple[MixTrack, np.ndarray]] = []
        peers = self.peers
        for member_id, pcm in zip(frame.listeners, frame.pcm, strict=True):  # bytes out
            peer = peers.get(member_id)
            if peer is not None:
                jobs.append((peer.out, pcm))
        return jobs

    async def shutdown(self) -> None:
        """Cancel negotiations and close every peer now (the server is stopping)."""
        for t in list(self._negotiating.values()):
            t.cancel()
        for p in list(self.peers.values()):
            await p.close()
        self.peers.clear()

    # ----------------------------------------------------------------- members

    def _add(self, member: MemberView) -> int:
        if member.id not in self.mix.slot_of:
            self.rules_dirty = True
        return self.mix.add(member)

    def _remove(self, member: MemberView) -> None:
        self.sent_rules.pop(member.id, None)
        if self.mix.remove(member.id) is not None:
            self.rules_dirty = True

    # ----------------------------------------------------------------- rules

    def _shared_rules(self) -> SharedRules:
        """The parts of the rules every member sees alike (zones, broadcast, self-muted), and
        every whisper as (speaker id, target id)."""
        mx = self.mix
        used = np.flatnonzero(mx.used).tolist()
        visible = [s for s in used if not mx.hidden(s)]
        ids = mx.member_id
        zones = [x for s in visible if mx.zone[s] for x in (int(ids[s]), int(mx.zone[s]))]
        bc = [
            x
            for s in visible
            if mx.broadcast[s] > 0
            for x in (int(ids[s]), round(float(mx.broadcast[s]) * 100))
        ]
        muted = [int(ids[s]) for s in visible if mx.self_muted[s]]
        whispers = [(int(ids[s]), int(ids[int(mx.whisper[s])])) for s in used if mx.whisper[s] >= 0]
        return zones, bc, muted, whispers

    def rules_for(self, member: MemberView, shared: SharedRules | None = None) -> AudioRules:
        """The rules as ``member`` may know them: whispers only its own unless it hosts."""
        zones, bc, muted, all_whispers = shared if shared is not None else self._shared_rules()
        host = member.identity.can("moderate")
        whispers = [x for pair in all_whispers if host or member.id in pair for x in pair]
        me = self.mix.slot_of.get(member.id)
        ids = self.mix.member_id
        ignored = [] if me is None else [int(ids[t]) for t in np.flatnonzero(self.mix.ignore[me])]
        rules = AudioRules(tuple(zones), tuple(bc), tuple(whispers), tuple(muted), tuple(ignored))
        self.sent_rules[member.id] = rules
        return rules

    def send_rules(self) -> None:
        """Send every member its rules if they changed since it last got them (a join or a
        leave that touches no rule sends nothing to the others)."""
        self.rules_dirty = False
        shared = self._shared_rules()
        for m in self.ctx.members.values():
            if not m.connected or m.paused:
                continue
            before = self.sent_rules.get(m.id)
            rules = self.rules_for(m, shared)
            if rules != before:
                self.ctx.send(m, rules)

    # ----------------------------------------------------------------- lifecycle

    def on_close(self) -> None:
        self.closed = True
        for t in list(self._negotiating.values()):
            t.cancel()
        for p in self.peers.values():
            self._closer.close_later(p)
        self.peers.clear()

    def on_join(self, member: MemberView) -> None:
        self._add(member)
        self._schedule_rules()

    def on_resume(self, member: MemberView) -> None:
        s = self._add(member)
        self.mix.set_paused(s, member.paused)
        peer = self.peers.get(member.id)
        if peer is not None:
            self.mix.set_listening(s, True)  # its WebRTC peer lived on: mix for it again
        self.ctx.send(member, self.rules_for(member))

    def on_disconnect(self, member: MemberView) -> None:
        """The member's connection dropped (it may resume): nobody hears it and its mix is
        no longer made or encoded. Its WebRTC peer stays for a resume within the grace."""
        s = self.mix.slot_of.get(member.id)
        if s is not None:
            self.mix.set_paused(s, True)
            self.mix.set_listening(s, False)

    def on_leave(self, member: MemberView, reason: str) -> None:
        task = self._negotiating.pop(member.id, None)
        if task is not None:
            task.cancel()
        self._offers.forget(member.id)
        peer = self.peers.pop(member.id, None)
        if peer is not None:
            self._closer.close_later(peer)
        self._remove(member)
        self._schedule_rules()

    def on_pause(self, member: MemberView, paused: bool) -> None:
        s = self.mix.slot_of.get(member.id)
        if s is not None:
            self.mix.set_paused(s, paused)
        if not paused:
            self.ctx.send(member, self.rules_for(member))

    def on_member_changed(self, member: MemberView, what: str) -> None:
        s = self.mix.slot_of.get(member.id)
        if s is None:
            return
        if what == "muted":
            self.mix.set_server_muted(s, member.muted)
        elif what == "grants" and not member.can("publish_audio"):
            # Whatever the client keeps sending is no longer read or mixed; it may still listen.
            self.mix.silence(s)

    # ----------------------------------------------------------------- messages

    def on_message(self, member: MemberView, msg: Message) -> None:
        mx = self.mix
        if isinstance(msg, AudioOffer):
            self._on_offer(member, msg)
        elif isinstance(msg, AudioMute):
            mx.set_self_muted(self._target(member.id), msg.muted)
            self._schedule_rules()
        elif isinstance(msg, AudioZone):
            self._host(member)
            mx.set_zone(self._other(msg.member_id), msg.zone)
            self._audit(member, "audio_zone", msg.member_id, zone=msg.zone)
            self._schedule_rules()
        elif isinstance(msg, AudioBroadcast):
            self._host(member)
            gain = (100 if msg.gain is None else msg.gain) / 100.0
            mx.set_broadcast(self._other(msg.member_id), gain if msg.on else 0.0)
            self._audit(member, "audio_broadcast", msg.member_id, on=msg.on, gain=round(gain * 100))
            self._schedule_rules()
        elif isinstance(msg, AudioWhisper):
            if not member.can("publish_audio"):
                raise ProtocolError(
                    ErrorCode.FORBIDDEN, f"role {member.identity.role} may not publish_audio"
                )
            me = self._target(member.id)
            if msg.target is None:
                mx.set_whisper(me, -1)
            else:
                if msg.target == member.id:
                    raise ProtocolError(ErrorCode.BAD_FIELD, "cannot whisper to yourself")
                mx.set_whisper(me, self._other(msg.target))
            self._schedule_rules()
        elif isinstance(msg, AudioIgnore):
            if msg.member_id == member.id:
                raise ProtocolError(ErrorCode.BAD_FIELD, "cannot ignore yourself")
            mx.set_ignore(self._target(member.id), self._other(msg.member_id), msg.ignore)
            self._schedule_rules()

    @staticmethod
    def _host(member: MemberView) -> None:
        if not member.can("moderate"):
            raise ProtocolError(
                ErrorCode.FORBIDDEN, f"role {member.identity.role} may not moderate"
            )

    def _target(self, member_id: int) -> int:
        """The mix slot of ``member_id`` (the sender itself, or a member it names)."""
        s = self.mix.slot_of.get(member_id)
        if s is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, "no such member")
        return s

    def _other(self, member_id: int) -> int:
        """The mix slot of a member another one names. A hidden member (an observer) is
        answered exactly as an id nobody has: trying ids must not find observers."""
        m = self.ctx.members.get(member_id)
        if m is None or m.hidden:
            raise ProtocolError(ErrorCode.NOT_FOUND, "no such member")
        return self._target(member_id)

    def _audit(self, host: MemberView, kind: str, target_id: int, **fields: object) -> None:
        """Hosts' routing changes go to the audit log (who changed what for whom, no audio)."""
        target = self.ctx.members.get(target_id)
        self.ctx.audit(
            kind,
            actor=host.identity.subject,
            subject=target.identity.subject if target is not None else str(target_id),
            **fields,
        )

    def _schedule_rules(self) -> None:
        """Coalesce rule changes: members get the new rules at most every 50 ms (the mixer
        applies them from the next frame)."""
        self.rules_dirty = True
        self.mix.changed()
        if self._rules_timer is None:
            self._rules_timer = self.ctx.call_later(0.05, self._flush_rules)

    def _flush_rules(self) -> None:
        self._rules_timer = None
        if self.rules_dirty:
            self.send_rules()

    # ----------------------------------------------------------------- signaling

    def _on_offer(self, member: MemberView, msg: AudioOffer) -> None:
        check_offer(member, msg)
        key = member.id
        if key in self._negotiating:
            raise ProtocolError(ErrorCode.RATE_LIMITED, "a negotiation is already under way")
        self._offers.take(key)
        task = self.ctx.spawn(self._negotiate(member, msg))
        self._negotiating[key] = task
        task.add_done_callback(lambda _t: self._negotiating.pop(key, None))

    async def _negotiate(self, member: MemberView, offer: AudioOffer) -> None:
        old = self.peers.pop(member.id, None)
        s = self._add(member)
        if old is not None:
            self.mix.detach(s)
            await old.close()

        def failed(peer: Peer) -> None:
            if self.peers.get(member.id) is peer:
                log.info("audio peer of member %d failed", member.id)
                self._drop_peer(member, peer)

        try:
            peer = await negotiate(offer, self.ctx.config, self._counters.drop_out, failed)
        except Exception as exc:
            log.info("audio offer of member %d refused: %r", member.id, exc)
            self.ctx.error(
                member, ProtocolError(ErrorCode.BAD_FIELD, "the audio offer could not be used")
            )
            return
        if self.mix.members.get(member.id) is not member or self.closed:
            await peer.close()  # left while we negotiated
            return
        self.peers[member.id] = peer
        self.mix.attach(s, peer.inbox)
        if peer.track is not None:
            peer.start_reader(self._read(member, peer))
        self.ctx.send(member, AudioAnswer(peer.answer, offer.publish))

    def _drop_peer(self, member: MemberView, peer: Peer) -> None:
        self.peers.pop(member.id, None)
        s = self.mix.slot_of.get(member.id)
        if s is not None:
            self.mix.detach(s)
        self._closer.close_later(peer)

    async def _read(self, member: MemberView, peer: Peer) -> None:
        """Mix a speaker whose encoded frames we could not take (see ``read_track``)."""
        s = self.mix.slot_of.get(member.id)
        if s is None or peer.track is None:
            return
        self.mix.set_speaking_source(s, True)

        def write(mono: np.ndarray) -> bool:
            if self.mix.slot_of.get(member.id) != s:
                return False
            self.mix.write(s, mono)
            return True

        try:
            await read_track(peer.track, write)
        finally:
            if self.mix.slot_of.get(member.id) == s:
                self.mix.set_speaking_source(s, False)


class SpatialAudio(ServerPlugin):
    """Spatial audio for every room: one mixer clock, the metrics, and a :class:`RoomAudio`
    per room (see the module docstring)."""

    room_plugin = RoomAudio

    def __init__(self) -> None:
        self.config = ServerConfig()
        self.rooms: dict[str, RoomAudio] = {}
        self.counters = MixCounters()
        self._closer = PeerCloser()
        self._task: asyncio.Task[None] | None = None
        self._degrade_left = 0
        self.mix_times: deque[float] = deque(maxlen=3000)  # decode + mix, per frame
        self.encode_times: deque[float] = deque(maxlen=3000)  # all listeners, per frame
        #: Per frame, the longest the mixer held the event loop without yielding.
        self.slice_times: deque[float] = deque(maxlen=3000)
        self._slice = 0.0
        self._reported = dict.fromkeys(
            (
                "mixed",
                "late",
                "dropped_in",
                "trimmed",
                "dropped_out",
                "degraded",
                "concealed",
                "recovered",
            ),
            0,
        )

    def create(self, ctx: RoomContext) -> RoomPlugin:
        ra = RoomAudio(ctx, self.counters, self._closer)
        self.rooms[ctx.name] = ra
        return ra

    def _open_rooms(self) -> list[RoomAudio]:
        """The rooms still open (closed ones are forgotten here)."""
        for name, ra in list(self.rooms.items()):
            if ra.closed:
                del self.rooms[name]
        return list(self.rooms.values())

    # ----------------------------------------------------------------- lifecycle

    async def start(self, server: ServerContext) -> None:
        self.config = server.config
        r = server.registry
        self.m_mix = Histogram(
            "medverse_audio_mix_seconds",
            "Time to mix one 20 ms frame for every listener of every room",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05),
            registry=r,
        )
        self.m_frames = Counter(
            "medverse_audio_frames_total",
            "Audio frames: mixed, late (mixer behind), dropped_in (speaker frames skipped: more "
            "than three waiting), trimmed (a speaker's standing extra frame dropped to bring "
            "latency down), dropped_out (listener frames not encoded in time), degraded (mixed "
            "with each listener's loudest speakers only), concealed (speaker frames lost or late, "
            "made up by Opus loss concealment), recovered (lost speaker frames rebuilt from "
            "in-band FEC)",
            ["kind"],
            registry=r,
        )
        self.m_peers = Gauge("medverse_audio_peers", "WebRTC audio peers", registry=r)
        # Read when scraped: the rooms own their peers, the service only counts them.
        self.m_peers.set_function(self._peer_count)
        self.m_cap = Gauge(
            "medverse_audio_speaker_cap",
            "Speakers mixed per listener now (0: all; set when the mixer degrades)",
            registry=r,
        )
        restrict_ice(self.config)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="medverse-mixer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for ra in self._open_rooms():
            await ra.shutdown()
        await self._closer.wait()

    def _peer_count(self) -> float:
        """Peers of every room, for the ``medverse_audio_peers`` gauge."""
        return float(sum(ra.peer_count for ra in self.rooms.values()))

    # ----------------------------------------------------------------- the mixer clock

    def speaker_cap(self) -> int:
        """Speakers mixed per listener now: the configured cap, or the degraded one."""
        cfg = self.config
        if self._degrade_left > 0:
            return cfg.audio_degraded_speakers
        return cfg.audio_max_speakers

    async def _run(self) -> None:
        """Mix every 20 ms on the fixed-rate clock; a frame whose time has passed is skipped."""
        budget = self.config.audio_mix_budget_ms / 1000.0
        clock = FixedRateClock(FRAME_SECONDS)
        counters = self.counters
        while True:
            n, skip = await clock.next()
            due = clock.due(n)
            if skip:
                counters.late += skip
                self._degrade_left = DEGRADE_FRAMES
            self._slice = 0.0
            work = 0.0
            jobs: list[tuple[MixTrack, np.ndarray]] = []
            cap = self.speaker_cap()
            for ra in self._open_rooms():
                if not ra.peer_count:
                    continue
                try:
                    # Decode a few speakers at a time, yielding in between: the tick loop
                    # never waits for more than one chunk (or the mix itself).
                    slots = ra.speaker_slots()
                    for i in range(0, len(slots), DECODE_CHUNK):
                        work += self._timed(ra.decode, slots[i : i + DECODE_CHUNK])
                        await asyncio.sleep(0)
                    t0 = time.perf_counter()
                    jobs += ra.mix_frame(time.monotonic(), cap, decode=False)
                    work += self._took(t0)
                except Exception:
                    log.exception("audio mix failed in room %s", ra.ctx.name)
            if work > budget:
                self._degrade_left = DEGRADE_FRAMES
            elif self._degrade_left > 0:
                self._degrade_left -= 1
            if jobs:
                self.mix_times.append(work)
                self.m_mix.observe(work)
                await self._encode(jobs, due + 2 * FRAME_SECONDS)
                self.slice_times.append(self._slice)
            if n % 50 == 0:
                self._flush_metrics()

    def _took(self, t0: float) -> float:
        """Seconds since ``t0``; keeps the longest stretch the mixer held the loop this frame."""
        spent = time.perf_counter() - t0
        self._slice = max(self._slice, spent)
        return spent

    def _timed(self, fn: Callable[..., object], *args: Any) -> float:
        t0 = time.perf_counter()
        fn(*args)
        return self._took(t0)

    async def _encode(self, jobs: list[tuple[MixTrack, np.ndarray]], deadline: float) -> None:
        """Encode this frame for every listener, a few at a time, yielding to the event loop
        between chunks so that no tick waits for more than one chunk. Listeners not reached by
        ``deadline`` (a whole frame late: the tracks hold a few, so being late by less costs
        nothing) lose this frame, counted as dropped."""
        loop = asyncio.get_running_loop()
        spent = 0.0
        for i in range(0, len(jobs), ENCODE_CHUNK):
            if loop.time() > deadline:
                self.counters.dropped_out += len(jobs) - i
                self._degrade_left = DEGRADE_FRAMES
                break
            t0 = time.perf_counter()
            for track, pcm in jobs[i : i + ENCODE_CHUNK]:
                if track.readyState == "live":
                    track.push(track.encoder.encode(pcm))
            spent += self._took(t0)
            await asyncio.sleep(0)
        self.encode_times.append(spent)

    def _flush_metrics(self) -> None:
        for kind in self._reported:
            v = getattr(self.counters, kind)
            if v > self._reported[kind]:
                self.m_frames.labels(kind).inc(v - self._reported[kind])
                self._reported[kind] = v
        self.m_cap.set(self.speaker_cap())

    def health(self) -> dict[str, object]:
        """Summary for ``/health``: peers, mix time percentiles, late/dropped/degraded frames."""
        c = self.counters
        body: dict[str, object] = {
            "peers": sum(ra.peer_count for ra in self.rooms.values()),
            "frames_mixed": c.mixed,
            "late": c.late,
            "dropped_in": c.dropped_in,
            "trimmed": c.trimmed,
            "silent_undecoded": c.silent_skipped,
            "dropped_out": c.dropped_out,
            "degraded": c.degraded,
            "concealed": c.concealed,
            "recovered": c.recovered,
            "speaker_cap": self.speaker_cap(),
        }
        for name, values in (
            ("mix_ms", self.mix_times),
            ("encode_ms", self.encode_times),
            ("loop_hold_ms", self.slice_times),
        ):
            times = np.array(values) * 1000.0
            if times.size:
                body[name] = {
                    "frames": int(times.size),
                    "p50": round(float(np.percentile(times, 50)), 3),
                    "p99": round(float(np.percentile(times, 99)), 3),
                    "max": round(float(times.max()), 3),
                }
        return {"audio": body}
