"""A room's mix state in numpy: one slot per member, a ring buffer of decoded frames per speaker,
the routing rules as arrays, and one 20 ms frame mixed for every listener at once.

No asyncio and no aiortc. Encoded Opus frames arrive in each publishing slot's input (filled by
aiortc's receiver, see :mod:`.signaling`) and are decoded here (:mod:`.codec`) into the
speaker's ring; :meth:`RoomMix.mix_frame` mixes them with the gains of :mod:`.spatial` and
returns every listener's stereo int16 frame to the caller (:mod:`.plugin`), which encodes it
and sends it. What happens to frames (mixed, dropped, trimmed, ...) is counted in the
:class:`MixCounters` the caller passes in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from medverse.protocol.quant import dequantize_positions, dequantize_rotations
from medverse.protocol.snapshot import FLAG_SPEAKING

from ..config import ServerConfig
from ..plugins import Entities, MemberView
from .codec import DecodeError, OpusDecoder
from .spatial import (
    FRAME_SAMPLES,
    MAX_ITD,
    RING,
    Spatial,
    dbfs,
    interaural_delays,
    keep_loudest,
    mix,
    mix_delayed,
    route_mask,
    spatial_gains,
)

#: Seconds the speaking flag holds after the voice falls below the lower threshold.
SPEAKING_HANGOVER = 0.3
#: Frames over which a speaker's smallest backlog is watched (see RoomMix.mix_frame).
TRIM_WINDOW = 50
#: Longest run of a speaker's missing frames the mixer conceals when their time comes (100 ms:
#: beyond that the speaker has stopped sending, or the network is down, and silence is right).
MAX_CONCEAL = 5
#: Largest hole in a speaker's RTP timestamps filled when the packet after it arrives (60 ms,
#: what the ring holds); a larger jump is a new talk spurt or a restarted sender, not a loss.
MAX_GAP = (RING - 1) * FRAME_SAMPLES
_TS_MASK = 0xFFFFFFFF  # RTP timestamps are 32 bits and wrap


@dataclass(slots=True)
class MixCounters:
    """What happened to audio frames, summed over every room (``/health`` and Prometheus).

    One object is shared by all rooms' mix states; the mixer clock adds ``late`` and
    ``dropped_out`` itself.
    """

    mixed: int = 0  # room frames mixed
    late: int = 0  # frames the mixer clock skipped (it was behind)
    dropped_in: int = 0  # speaker frames skipped: more than RING - 1 waiting
    trimmed: int = 0  # a speaker's standing extra frame dropped to bring latency down
    dropped_out: int = 0  # listener frames not encoded in time, or dropped by a full track
    degraded: int = 0  # room frames mixed with each listener's loudest speakers only
    decode_errors: int = 0
    silent_skipped: int = 0  # speaker frames left undecoded: their sender marked them silent
    concealed: int = 0  # speaker frames lost or late, made up by Opus's loss concealment
    recovered: int = 0  # lost speaker frames rebuilt from the next packet's in-band FEC

    def drop_out(self) -> None:
        """Count one listener frame dropped (a listener's outgoing track was full)."""
        self.dropped_out += 1


class SpeakerInput(Protocol):
    """A publishing slot's encoded frames and its decoder (a ``signaling.SpeakerInbox``)."""

    @property
    def frames(self) -> deque[tuple[Any, Any]]:
        """(codec parameters, encoded frame with ``data`` and maybe ``audio_level``), oldest
        first; the mix state pops them."""

    @property
    def decoder(self) -> OpusDecoder:
        """The speaker's own Opus decoder (decoder state carries from frame to frame)."""


@dataclass(frozen=True, slots=True)
class MixedFrame:
    """One room frame: each listener's stereo frame, and who speaks if that changed."""

    #: Member ids of the listeners, one per row of ``pcm``.
    listeners: list[int]
    #: (listeners, FRAME_SAMPLES, 2) interleaved int16, or None without listeners.
    pcm: np.ndarray | None
    #: Members speaking now, loudest first (observers left out), when that changed.
    speaking: tuple[int, ...] | None


class RoomMix:
    """A room's audio state: one slot per member in numpy arrays (grown by doubling).

    The caller adds and removes members, attaches their inputs and outputs, writes rule changes
    into the rule arrays (then calls :meth:`changed`), and calls :meth:`mix_frame` every 20 ms
    (or :meth:`decode_pending` a few slots at a time first, then ``mix_frame(decode=False)``).
    """

    # The slot arrays (see _alloc), one row per slot.
    used: np.ndarray
    member_id: np.ndarray
    row: np.ndarray
    speaker: np.ndarray
    listener: np.ndarray
    server_muted: np.ndarray
    self_muted: np.ndarray
    paused: np.ndarray
    zone: np.ndarray
    broadcast: np.ndarray
    whisper: np.ndarray
    ignore: np.ndarray
    ring: np.ndarray
    wpos: np.ndarray
    rpos: np.ndarray
    min_backlog: np.ndarray
    tail: np.ndarray
    speaking: np.ndarray
    speak_until: np.ndarray
    level: np.ndarray
    next_ts: np.ndarray
    owed: np.ndarray
    streaming: np.ndarray

    def __init__(self, config: ServerConfig, entities: Entities, counters: MixCounters) -> None:
        self.config = config
        self.entities = entities
        self.counters = counters
        self.spatial = Spatial(
            config.audio_ref_distance, config.audio_rolloff, config.audio_max_distance
        )
        self.slot_of: dict[int, int] = {}  # member id -> slot
        self.members: dict[int, MemberView] = {}  # member id -> member
        self._free: list[int] = []
        self._carry: dict[int, np.ndarray] = {}  # slot -> samples short of a whole frame
        #: Publishing slots whose encoded frames we take from aiortc's receiver directly.
        self.inboxes: dict[int, SpeakerInput] = {}
        self.speaking_ids: tuple[int, ...] = ()
        self.version = 0  # bumped by every membership or rule change
        self._frames_in_window = 0
        self._gains: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None
        self.cap = 0
        self._alloc(8)

    # ----------------------------------------------------------------- slots

    def _alloc(self, cap: int) -> None:
        old = self.cap
        self.cap = cap

        def grow(name: str, shape: tuple[int, ...], dtype: Any, fill: Any = 0) -> None:
            a = np.full(shape, fill, dtype)
            if old:
                prev = getattr(self, name)
                a[tuple(slice(0, s) for s in prev.shape)] = prev
            setattr(self, name, a)

        grow("used", (cap,), np.bool_)
        grow("member_id", (cap,), np.int64)
        grow("row", (cap,), np.int64, -1)
        grow("speaker", (cap,), np.bool_)  # a publishing track is attached
        grow("listener", (cap,), np.bool_)  # an outgoing mix track exists
        grow("server_muted", (cap,), np.bool_)
        grow("self_muted", (cap,), np.bool_)
        grow("paused", (cap,), np.bool_)
        grow("zone", (cap,), np.int32)
        grow("broadcast", (cap,), np.float32)
        grow("whisper", (cap,), np.int64, -1)  # target slot
        grow("ignore", (cap, cap), np.bool_)  # [a, b]: a ignores b
        grow("ring", (cap, RING, FRAME_SAMPLES), np.float32)
        grow("wpos", (cap,), np.int64)
        grow("rpos", (cap,), np.int64)
        grow("min_backlog", (cap,), np.int64, RING)
        grow("tail", (cap, MAX_ITD), np.float32)
        grow("speaking", (cap,), np.bool_)
        grow("speak_until", (cap,), np.float64)
        grow("level", (cap,), np.float64, -120.0)
        # Loss concealment (see decode_pending and _conceal_missing): the RTP timestamp the
        # speaker's next packet should have (-1: unknown), frames concealed at mix time that
        # stand in for packets not yet received, and whether the speaker's last packet was
        # decoded voice (concealing after silence or a stop would only extrapolate noise).
        grow("next_ts", (cap,), np.int64, -1)
        grow("owed", (cap,), np.int64)
        grow("streaming", (cap,), np.bool_)
        self._free.extend(range(cap - 1, old - 1, -1))

    def add(self, member: MemberView) -> int:
        """The member's slot, given a fresh one if it has none."""
        if member.id in self.slot_of:
            return self.slot_of[member.id]
        if not self._free:
            self._alloc(self.cap * 2)
        s = self._free.pop()
        self.slot_of[member.id] = s
        self.members[member.id] = member
        self.used[s] = True
        self.member_id[s] = member.id
        self.row[s] = member.row
        self.server_muted[s] = member.muted
        self.paused[s] = member.paused
        for name in ("speaker", "listener", "self_muted", "speaking"):
            getattr(self, name)[s] = False
        self.zone[s] = 0
        self.broadcast[s] = 0.0
        self.whisper[s] = -1
        self.ignore[s, :] = False
        self.ignore[:, s] = False
        self.wpos[s] = self.rpos[s] = 0
        self.level[s] = -120.0
        self._reset_stream(s)
        self.version += 1
        return s

    def _reset_stream(self, s: int) -> None:
        """Slot ``s`` starts a new stream: nothing is known of its timestamps."""
        self.next_ts[s] = -1
        self.owed[s] = 0
        self.streaming[s] = False

    def remove(self, member_id: int) -> int | None:
        """Free the member's slot (and every rule naming it); returns it, or None if it had
        none."""
        s = self.slot_of.pop(member_id, None)
        self.members.pop(member_id, None)
        if s is None:
            return None
        self.used[s] = False
        # The avatar row is freed with the member (and may soon be another entity's): no
        # speaking flag may be written to it any more.
        self.row[s] = -1
        self.speaker[s] = self.listener[s] = False
        self.whisper[self.whisper == s] = -1
        self.ignore[s, :] = False
        self.ignore[:, s] = False
        self._carry.pop(s, None)
        self.inboxes.pop(s, None)
        self._free.append(s)
        self.version += 1
        return s

    def attach(self, s: int, inbox: SpeakerInput | None) -> None:
        """Slot ``s`` has a peer now: it listens, and speaks if it has an ``inbox``."""
        self.listener[s] = True
        if inbox is not None:
            self.inboxes[s] = inbox
            self.speaker[s] = True
            self._reset_stream(s)

    def detach(self, s: int) -> None:
        """Slot ``s`` lost its peer: it neither speaks nor listens."""
        self.speaker[s] = self.listener[s] = False
        self.inboxes.pop(s, None)
        self._reset_stream(s)

    def set_listening(self, s: int, on: bool) -> None:
        """Make (or stop making) slot ``s``'s mix; its peer and what it sends stay."""
        self.listener[s] = on

    def silence(self, s: int) -> None:
        """Stop reading what slot ``s`` sends (it may still listen)."""
        self.speaker[s] = False
        self.inboxes.pop(s, None)
        self._reset_stream(s)

    def set_speaking_source(self, s: int, on: bool) -> None:
        """Slot ``s`` has (or no longer has) decoded audio coming from a fallback reader."""
        self.speaker[s] = on

    # The rules, one setter each (the gains are recomputed for the next frame).

    def set_paused(self, s: int, paused: bool) -> None:
        """A paused member is heard by nobody and hears nothing."""
        self.paused[s] = paused

    def set_server_muted(self, s: int, muted: bool) -> None:
        """A host's mute: the next frame already leaves the member out."""
        self.server_muted[s] = muted

    def set_self_muted(self, s: int, muted: bool) -> None:
        self.self_muted[s] = muted
        self.changed()

    def set_zone(self, s: int, zone: int) -> None:
        """Members of a zone other than 0 hear only that zone (and broadcasts)."""
        self.zone[s] = zone
        self.changed()

    def set_broadcast(self, s: int, gain: float) -> None:
        """Everyone hears slot ``s`` at ``gain``, wherever they are (0: off)."""
        self.broadcast[s] = gain
        self.changed()

    def set_whisper(self, s: int, target: int) -> None:
        """Slot ``s`` is heard by slot ``target`` only (-1: by everyone again)."""
        self.whisper[s] = target
        self.changed()

    def set_ignore(self, s: int, other: int, ignore: bool) -> None:
        """Slot ``s`` does not hear slot ``other``."""
        self.ignore[s, other] = ignore
        self.changed()

    def changed(self) -> None:
        """A rule array changed: the gains are recomputed for the next frame."""
        self.version += 1

    def hidden(self, s: int) -> bool:
        """Whether slot ``s`` is an observer (or free)."""
        m = self.members.get(int(self.member_id[s]))
        return m is None or m.hidden

    def write(self, s: int, mono: np.ndarray) -> None:
        """Store a speaker's decoded mono samples; whole 20 ms frames go into its ring."""
        carry = self._carry.pop(s, None)
        if carry is not None:
            mono = np.concatenate((carry, mono))
        n = mono.size // FRAME_SAMPLES
        for i in range(n):  # one iteration per 20 ms frame of audio, normally exactly one
            self.ring[s, self.wpos[s] % RING] = mono[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]
            self.wpos[s] += 1
        if mono.size > n * FRAME_SAMPLES:
            self._carry[s] = mono[n * FRAME_SAMPLES :]

    # ----------------------------------------------------------------- the mix

    def decode_pending(self, slots: list[int] | None = None) -> None:
        """Decode what each publishing speaker (of ``slots``, default all) sent since the last
        frame (one decode per speaker and frame; more only after network jitter) into its
        ring.

        A hole in a speaker's RTP timestamps (packets lost, or reordered too late for the
        inbox to put them back in order)
        of up to ``MAX_GAP`` is filled before the packet after it is decoded: the frame right
        before that packet from its in-band FEC when the sender put one in, anything else by
        Opus's loss concealment, less what the mixer already concealed at mix time for the
        same frames (see :meth:`_conceal_missing`)."""
        counters = self.counters
        quiet = self.config.audio_silence_dbfs - 10.0  # senders' level estimates are rough
        conceal = self.config.audio_conceal
        next_ts, owed, streaming = self.next_ts, self.owed, self.streaming
        for s in list(self.inboxes) if slots is None else slots:
            box = self.inboxes.get(s)
            if box is None:
                continue
            frames = box.frames
            while len(frames) > RING:  # far behind: keep latency bounded
                _codec, dropped = frames.popleft()
                counters.dropped_in += 1
                ts = getattr(dropped, "timestamp", None)
                if ts is not None:  # dropped on purpose: not a hole to fill
                    next_ts[s] = (int(ts) + FRAME_SAMPLES) & _TS_MASK
            while frames:  # only Opus is negotiated (see signaling.OPUS)
                _codec, encoded = frames.popleft()
                ts = getattr(encoded, "timestamp", None)
                gap = 0
                if ts is not None and next_ts[s] >= 0:
                    gap = (int(ts) - int(next_ts[s])) & _TS_MASK
                    if gap > MAX_GAP:  # a new talk spurt, a restart, or an old packet
                        gap = 0
                level = getattr(encoded, "audio_level", None)
                if level is not None and level < quiet and s not in self._carry:
                    # The sender says this frame is silence: no need to decode it (a client
                    # that lies about it only silences itself).
                    self.ring[s, self.wpos[s] % RING] = 0.0
                    self.wpos[s] += 1
                    counters.silent_skipped += 1
                    if ts is not None:
                        next_ts[s] = (int(ts) + FRAME_SAMPLES) & _TS_MASK
                    owed[s] = 0
                    streaming[s] = False
                    continue
                decoder = box.decoder
                data = encoded.data
                try:
                    fill = gap - int(owed[s]) * FRAME_SAMPLES
                    if conceal and streaming[s] and fill > 0:
                        lost = decoder.recover(data, fill)
                        if lost.size:
                            if decoder.has_fec(data):
                                counters.recovered += 1
                                counters.concealed += max(0, lost.size // FRAME_SAMPLES - 1)
                            else:
                                counters.concealed += lost.size // FRAME_SAMPLES
                            self.write(s, lost * np.float32(1 / 32768))
                    pcm = decoder.decode(data)
                except DecodeError:
                    counters.decode_errors += 1
                    continue
                owed[s] = 0
                streaming[s] = pcm.size > 0
                if ts is not None:
                    next_ts[s] = (int(ts) + pcm.size) & _TS_MASK
                if pcm.size == FRAME_SAMPLES and s not in self._carry:
                    k = self.wpos[s] % RING
                    np.multiply(pcm, np.float32(1 / 32768), out=self.ring[s, k])
                    self.wpos[s] += 1
                elif pcm.size:
                    self.write(s, pcm * np.float32(1 / 32768))

    def mix_frame(self, now: float, tick: int, cap: int, decode: bool = True) -> MixedFrame:
        """Mix one 20 ms frame for every listener of the room (decoding the speakers first
        unless the caller did), each listener hearing at most its ``cap`` loudest speakers (0:
        all). ``tick`` is the room's tick: poses change only with it."""
        counters = self.counters
        cfg = self.config
        if decode and self.inboxes:
            self.decode_pending()
        if cfg.audio_conceal and self.inboxes:
            self._conceal_missing()
        spk = np.flatnonzero(self.speaker & (self.wpos > self.rpos))
        backlog = self.wpos[spk] - self.rpos[spk]
        late = backlog > RING - 1
        if late.any():  # keep latency bounded: skip to the newest complete frame
            counters.dropped_in += int((backlog[late] - 1).sum())
            self.rpos[spk[late]] = self.wpos[spk[late]] - 1
            backlog[late] = 1
        # A speaker whose backlog never fell below two frames for a whole second (after a
        # burst: a stalled sender catching up) loses one frame, so latency comes back down.
        low = np.zeros(self.cap, np.int64)
        low[spk] = backlog
        np.minimum(self.min_backlog, low, out=self.min_backlog)
        self._frames_in_window += 1
        if self._frames_in_window >= TRIM_WINDOW:
            trim = np.flatnonzero(self.min_backlog >= 2)
            if trim.size:
                self.rpos[trim] += 1
                counters.trimmed += int(trim.size)
            self.min_backlog[:] = RING
            self._frames_in_window = 0
            spk = np.flatnonzero(self.speaker & (self.wpos > self.rpos))
        frames = self.ring[spk, self.rpos[spk] % RING]  # (S, N)
        self.rpos[spk] += 1
        history = None
        if cfg.audio_interaural_delay:  # each speaker's last samples, for the far ear's delay
            history = np.concatenate((self.tail[spk], frames), axis=1)  # (S, MAX_ITD + N)
            self.tail[:] = 0.0
            self.tail[spk] = frames[:, -MAX_ITD:]
        level = dbfs(np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1)))
        allowed = ~(self.server_muted | self.self_muted | self.paused)
        self.level[:] = -120.0
        self.level[spk] = np.where(allowed[spk], level, -120.0)
        speaking = self._update_speaking(now)
        live = allowed[spk] & (level > cfg.audio_silence_dbfs)
        spk, frames, level = spk[live], frames[live], level[live]
        if history is not None:
            history = history[live]
        lis = np.flatnonzero(self.listener)
        if lis.size == 0:
            return MixedFrame([], None, speaking)
        if spk.size == 0:
            out = np.zeros((lis.size, FRAME_SAMPLES, 2), np.int16)
        else:
            gains, delays = self.gains(lis, spk, tick)
            if cap > 0 and spk.size > cap:
                loud = gains.max(axis=2) * (10.0 ** (level / 20.0))[None, :]
                gains *= keep_loudest(loud, cap)[:, :, None]
                counters.degraded += 1
            if history is not None:
                out = mix_delayed(gains.astype(np.float32), delays, history)
            else:
                out = mix(gains.astype(np.float32), frames)
        counters.mixed += 1
        return MixedFrame(self.member_id[lis].tolist(), out, speaking)

    def _conceal_missing(self) -> None:
        """A speaker in the middle of talking whose next frame has not arrived when the mix
        needs it (lost, or late) gets Opus's loss concealment for it instead of 20 ms of
        silence, for up to ``MAX_CONCEAL`` frames in a row. A late frame that arrives after
        all is still played (the speaker's latency grows by a frame, which the trim takes back
        if it stays); a lost one is not concealed twice when the packet after it shows the
        hole (see :meth:`decode_pending`)."""
        want = self.speaker & self.streaming & (self.wpos <= self.rpos)
        want &= (self.owed < MAX_CONCEAL) & ~(self.server_muted | self.self_muted | self.paused)
        if not want.any():
            return
        for s in np.flatnonzero(want).tolist():  # only speakers whose frame is missing
            box = self.inboxes.get(s)
            if box is None or s in self._carry:
                continue
            pcm = box.decoder.conceal(FRAME_SAMPLES)
            if pcm.size != FRAME_SAMPLES:
                continue
            k = self.wpos[s] % RING
            np.multiply(pcm, np.float32(1 / 32768), out=self.ring[s, k])
            self.wpos[s] += 1
            self.owed[s] += 1
            self.counters.concealed += 1

    def gains(self, lis: np.ndarray, spk: np.ndarray, tick: int) -> tuple[np.ndarray, np.ndarray]:
        """Gains (L, S, 2) under head poses and every routing rule (a paused listener hears
        nothing), and each ear's delay in samples."""
        g_all, d_all = self.all_gains(tick)
        pick = np.ix_(lis, spk)
        g = g_all[pick]
        g *= ~self.paused[lis][:, None, None]
        return g, d_all[pick]

    def all_gains(self, tick: int) -> tuple[np.ndarray, np.ndarray]:
        """Gains and ear delays (cap, cap, 2) between every pair of slots. Poses change once
        per world tick and rules rarely, while frames come at 50 Hz: recomputed only when
        either changed."""
        key = (tick, self.version)
        if self._gains is not None and self._gains[0] == key:
            return self._gains[1], self._gains[2]
        slots = np.arange(self.cap)
        rows = self.row
        has_row = (rows >= 0) & self.used
        present = np.zeros(self.cap, np.bool_)
        pos = np.zeros((self.cap, 3))
        quat = np.zeros((self.cap, 4))
        quat[:, 3] = 1.0
        if has_row.any():
            p, mm, ri, rc = self.entities.poses(rows[has_row])
            present[has_row] = p
            pos[has_row] = dequantize_positions(mm)
            quat[has_row] = dequantize_rotations(ri, rc)
        g = spatial_gains(present, pos, quat, present, pos, self.spatial)
        heard, fixed = route_mask(
            slots, slots, self.zone, self.broadcast, self.whisper, self.ignore
        )
        # Broadcast and whisper: a fixed level, centred (sqrt(1/2) per ear, like a source ahead).
        level = np.where(self.whisper >= 0, 1.0, self.broadcast) * np.sqrt(0.5)
        g = np.where(fixed[:, :, None], level[None, :, None], g)
        g *= heard[:, :, None]
        if self.config.audio_interaural_delay:
            delays = interaural_delays(present, pos, quat, present, pos)
            delays *= ~fixed[:, :, None]
        else:
            delays = np.zeros(g.shape, np.int64)
        self._gains = (key, g, delays)
        return g, delays

    def _update_speaking(self, now: float) -> tuple[int, ...] | None:
        """Set the speaking flags (and the avatars' FLAG_SPEAKING) from this frame's levels;
        returns who speaks, loudest first, if that changed."""
        cfg = self.config
        on = self.level > cfg.audio_speaking_dbfs
        hold = self.level > cfg.audio_speaking_dbfs - 10.0
        self.speak_until[on | (self.speaking & hold)] = now + SPEAKING_HANGOVER
        speaking = self.used & (on | (self.speaking & (now < self.speak_until)))
        changed = np.flatnonzero(speaking != self.speaking)
        if changed.size == 0:
            return None
        self.speaking = speaking
        entities = self.entities
        for s in changed.tolist():  # only members whose flag flips
            row = int(self.row[s])
            if row >= 0:
                flags = entities.flags(row)
                on_flag = flags | FLAG_SPEAKING if speaking[s] else flags & ~FLAG_SPEAKING
                entities.set_flags(row, on_flag)
        now_speaking = np.flatnonzero(speaking)
        order = now_speaking[np.argsort(-self.level[now_speaking], kind="stable")]
        ids = tuple(int(self.member_id[s]) for s in order.tolist() if not self.hidden(int(s)))
        if ids == self.speaking_ids:
            return None
        self.speaking_ids = ids
        return ids
