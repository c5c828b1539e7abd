"""Opus loss concealment in the mixer: a speaker's lost or late frame is not 20 ms of silence.

No network here: a speaker's packets go straight into its inbox, some of them left out (lost),
held back a tick (late) or carrying in-band FEC, and the listener's mix is measured with numpy.
``tests/test_impairment.py`` does the same through a lossy network path.
"""

from __future__ import annotations

import fractions
import math
from typing import Any

import av
import numpy as np
import pytest

from medverse.rtc import JitterFrame
from medverse.server.audio.codec import DecodeError, OpusDecoder
from medverse.server.audio.mixing import MAX_CONCEAL
from medverse.server.audio.signaling import SpeakerInbox

from .test_audio_mixer import _room_audio

FRAME = 960
#: Level blocks of 5 ms: a 20 ms hole is four of them.
BLOCK = 240


def voice_packets(
    frames: int, fec: bool = False, bitrate: int = 32000
) -> tuple[list[bytes], np.ndarray]:
    """Opus packets (as aiortc's encoder makes them: "voip", 20 ms) of a voiced sound about
    -24 dBFS (a 150 Hz fundamental with falling harmonics and a slow vibrato), and the
    samples encoded."""
    enc = av.CodecContext.create("libopus", "w")
    enc.bit_rate = bitrate
    enc.format = "s16"
    enc.layout = "mono"
    enc.sample_rate = 48000
    enc.time_base = fractions.Fraction(1, 48000)
    enc.options = {"application": "voip", **({"fec": "1", "packet_loss": "10"} if fec else {})}
    t = np.arange(FRAME * frames) / 48000
    phase = 2 * np.pi * (150 * t + 3 * np.sin(2 * np.pi * 4 * t))
    x = sum(np.sin(k * phase) / k for k in range(1, 8)) * 0.04
    pcm = np.round(x * 32767).astype(np.int16)
    packets: list[bytes] = []
    for i in range(frames):
        f = av.AudioFrame.from_ndarray(
            pcm[i * FRAME : (i + 1) * FRAME].reshape(1, -1), "s16", "mono"
        )
        f.sample_rate = 48000
        f.pts = i * FRAME
        f.time_base = enc.time_base
        packets += [bytes(p) for p in enc.encode(f)]
    assert len(packets) == frames
    return packets, pcm


def frame(packets: list[bytes], k: int) -> JitterFrame:
    """Packet ``k`` as aiortc's receiver hands it on (RTP timestamp in samples)."""
    return JitterFrame(packets[k], (1234567 + k * FRAME) & 0xFFFFFFFF)


def listen(
    packets: list[bytes],
    arrivals: dict[int, list[int]],
    ticks: int,
    **settings: Any,
) -> tuple[np.ndarray, Any]:
    """Mix ``ticks`` frames with member 1 speaking: ``arrivals[tick]`` are the packets that
    reach its inbox before that tick's mix. Returns what member 2 hears (mono) and the
    counters."""
    ra, counters, _ = _room_audio(2, **settings)
    inbox = ra.mix.inboxes[0]
    assert isinstance(inbox, SpeakerInbox)
    out = np.zeros((ticks, FRAME), np.float64)
    for tick in range(ticks):
        for k in arrivals.get(tick, []):
            inbox.put((None, frame(packets, k)))
        jobs = {id(t): pcm for t, pcm in ra.mix_frame(float(tick) * 0.02, cap=0)}
        out[tick] = jobs[id(ra.peers[2].out)].astype(np.float64).sum(axis=1)
    return out.reshape(-1), counters


def block_levels(mono: np.ndarray, skip_frames: int = 10) -> np.ndarray:
    """Level in dB of every 5 ms block, after the first frames (the codec warming up)."""
    x = mono[skip_frames * FRAME :]
    x = x[: x.size - x.size % BLOCK].reshape(-1, BLOCK)
    rms = np.sqrt(np.mean(np.square(x), axis=1))
    return 20 * np.log10(np.maximum(rms, 1e-3))


def continuity(mono: np.ndarray) -> tuple[float, int, float]:
    """(share of 5 ms blocks within 20 dB of the median level, blocks more than 20 dB below
    it, largest level drop between neighbouring blocks in dB)."""
    db = block_levels(mono)
    median = float(np.median(db))
    dropouts = int(np.count_nonzero(db < median - 20.0))
    steps = np.diff(db)
    return 1.0 - dropouts / db.size, dropouts, float(-steps.min())


def lossy_arrivals(frames: int, loss: float, seed: int) -> tuple[dict[int, list[int]], list[int]]:
    """Each packet arrives in its own tick, except a random ``loss`` share (never the first
    ten: the warm-up is left out of the measurement), which never arrive."""
    rng = np.random.default_rng(seed)
    lost = np.flatnonzero(rng.random(frames) < loss)
    lost = lost[lost >= 12].tolist()
    arrivals = {k: [k] for k in range(frames) if k not in set(lost)}
    return arrivals, lost


def test_lost_frames_are_concealed_not_silent() -> None:
    frames = 250  # 5 s
    packets, _ = voice_packets(frames)
    arrivals, lost = lossy_arrivals(frames, 0.05, seed=7)
    assert 6 <= len(lost) <= 25
    clean, _ = listen(packets, {k: [k] for k in range(frames)}, frames)
    with_plc, counters = listen(packets, arrivals, frames)
    without, counters_off = listen(packets, arrivals, frames, audio_conceal=False)

    share_clean, drops_clean, step_clean = continuity(clean)
    share_plc, drops_plc, step_plc = continuity(with_plc)
    share_off, drops_off, step_off = continuity(without)
    print(
        f"\n{len(lost)} of {frames} frames lost: 5 ms blocks within 20 dB of the median level "
        f"{share_clean:.1%} lossless (largest drop {step_clean:.1f} dB), "
        f"{share_plc:.1%} with concealment ({drops_plc} dropouts, "
        f"largest drop {step_plc:.1f} dB), {share_off:.1%} without ({drops_off} dropouts, "
        f"largest drop {step_off:.1f} dB)"
    )
    assert drops_clean == 0
    # Without concealment every lost frame is a 20 ms hole: about four silent blocks each.
    assert drops_off >= 3 * len(lost)
    assert step_off > 40.0
    # With it the level carries on: nearly no dropout, and no cliff (a drop between two 5 ms
    # blocks at most a little larger than the voice's own).
    assert drops_plc <= max(2, drops_off // 10)
    assert step_plc < step_clean + 12.0
    assert counters.concealed == len(lost) and counters_off.concealed == 0
    assert counters.recovered == 0  # this sender puts no FEC in its packets


def test_the_next_packets_fec_rebuilds_a_lost_frame() -> None:
    """With a frame of jitter buffering (the packet after a lost one is there before the lost
    one's turn), a sender's in-band FEC rebuilds the lost frame, closer to what was sent than
    concealment gets."""
    frames = 150
    packets, _ = voice_packets(frames, fec=True, bitrate=24000)
    has_fec = [OpusDecoder.has_fec(p) for p in packets]
    assert sum(has_fec) > frames // 2
    lost = [k for k in range(15, frames - 2, 9) if has_fec[k + 1]]
    # Every packet arrives one tick early: the mixer always has the next one waiting.
    arrivals = {0: [0, 1]}
    for t in range(1, frames - 1):
        arrivals[t] = [t + 1]
    arrivals = {t: [k for k in ks if k not in lost] for t, ks in arrivals.items()}
    clean, _ = listen(packets, {0: [0, 1], **{t: [t + 1] for t in range(1, frames - 1)}}, frames)
    fec_out, counters = listen(packets, arrivals, frames)
    assert counters.recovered == len(lost) and counters.concealed == 0

    # The decoder alone: FEC against concealment for the same losses.
    def run(use_fec: bool) -> np.ndarray:
        d = OpusDecoder()
        out = []
        for k, p in enumerate(packets):
            if k in lost:
                if use_fec:
                    continue  # rebuilt when the next packet comes
                out.append(d.conceal())
            elif k - 1 in lost and use_fec:
                out.append(d.recover(p))
                out.append(d.decode(p))
            else:
                out.append(d.decode(p))
        return np.concatenate(out).astype(np.float64)

    d = OpusDecoder()
    reference = np.concatenate([d.decode(p) for p in packets]).astype(np.float64)

    def snr(x: np.ndarray) -> float:
        idx = np.concatenate([np.arange(k * FRAME, (k + 1) * FRAME) for k in lost])
        err = np.sum(np.square(x[idx] - reference[idx]))
        return 10 * math.log10(np.sum(np.square(reference[idx])) / max(err, 1e-9))

    snr_fec, snr_plc = snr(run(True)), snr(run(False))
    print(
        f"\nlost frames' SNR against the lossless decode: "
        f"FEC {snr_fec:.1f} dB, PLC {snr_plc:.1f} dB"
    )
    assert snr_fec > snr_plc + 3.0
    assert continuity(fec_out)[1] == 0 == continuity(clean)[1]


def test_a_late_frame_is_concealed_then_played_and_not_concealed_twice() -> None:
    packets, _ = voice_packets(40)
    # Packet 20 arrives a tick late (with 21); packet 30 is lost.
    arrivals = {k: [k] for k in range(40) if k not in (20, 21, 30)}
    arrivals[21] = [20, 21]
    _, counters = listen(packets, arrivals, 40)
    # Tick 20 and tick 30 were concealed; the late packet 20 was played after all (nothing
    # dropped), and packet 31 did not make the mixer conceal frame 30 a second time.
    assert counters.concealed == 2
    assert counters.dropped_in == 0


def test_concealment_stops_when_the_speaker_stops() -> None:
    packets, _ = voice_packets(40)
    out, counters = listen(packets, {k: [k] for k in range(20)}, 40)
    assert counters.concealed == MAX_CONCEAL
    tail = out[(20 + MAX_CONCEAL) * FRAME :]
    assert not tail.any()  # digital silence once the concealment ran out
    # Concealment fades: its last frame is quieter than the voice was.
    db = block_levels(out[: (20 + MAX_CONCEAL) * FRAME], skip_frames=0)
    assert db[-4:].mean() < np.median(db[40:80]) - 6.0


def test_no_concealment_after_silence_or_mute() -> None:
    packets, _ = voice_packets(30)
    ra, counters, _ = _room_audio(2)
    inbox = ra.mix.inboxes[0]
    for k in range(10):
        f = frame(packets, k)
        f.audio_level = -127  # type: ignore[attr-defined]
        inbox.put((None, f))
        ra.mix_frame(k * 0.02, cap=0)
    for k in range(10, 20):  # the sender went quiet (DTX): nothing to extrapolate
        ra.mix_frame(k * 0.02, cap=0)
    assert counters.concealed == 0
    for k in range(20, 25):
        inbox.put((None, frame(packets, k)))
        ra.mix_frame(k * 0.02, cap=0)
    ra.mix.set_server_muted(0, True)
    for k in range(25, 30):
        ra.mix_frame(k * 0.02, cap=0)
    assert counters.concealed == 0


def test_a_gap_before_a_malformed_packet_is_an_error_not_a_crash() -> None:
    packets, _ = voice_packets(20)
    ra, counters, _ = _room_audio(2)
    inbox = ra.mix.inboxes[0]
    for k in range(10):
        inbox.put((None, frame(packets, k)))
        ra.mix_frame(k * 0.02, cap=0)
    bad = JitterFrame(b"\xff\xfe\xfd", (1234567 + 12 * FRAME) & 0xFFFFFFFF)
    inbox.put((None, bad))
    ra.mix_frame(0.2, cap=0)  # decode finds the hole, then the packet cannot be decoded
    assert counters.decode_errors == 1
    inbox.put((None, frame(packets, 13)))
    jobs = ra.mix_frame(0.22, cap=0)
    assert any(pcm.any() for _, pcm in jobs)


def test_timestamps_wrap_and_big_jumps_are_not_losses() -> None:
    packets, _ = voice_packets(20)
    ra, counters, _ = _room_audio(2)
    inbox = ra.mix.inboxes[0]
    ts = 0xFFFFFFFF - 3 * FRAME + 1
    for k in range(8):  # wraps past 2**32 with no hole
        inbox.put((None, JitterFrame(packets[k], (ts + k * FRAME) & 0xFFFFFFFF)))
        ra.mix_frame(k * 0.02, cap=0)
    assert counters.concealed == 0
    # A jump of 10 s (a new talk spurt after DTX) is not filled with concealment.
    inbox.put((None, JitterFrame(packets[8], (ts + 500 * FRAME) & 0xFFFFFFFF)))
    ra.mix_frame(0.16, cap=0)
    assert counters.concealed == 0


@pytest.mark.parametrize("data", [b"", b"\xff\xff\xff\xff"])
def test_decoder_refuses_malformed_packets(data: bytes) -> None:
    d = OpusDecoder()
    with pytest.raises(DecodeError):
        d.decode(data)
    with pytest.raises(DecodeError):
        d.recover(data)
    assert d.conceal().size == FRAME  # and the decoder still works


def test_the_answer_asks_for_inband_fec() -> None:
    from medverse.rtc import with_inband_fec

    offer_like = "\r\n".join(
        [
            "v=0",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111 9",
            "a=rtpmap:111 opus/48000/2",
            "a=rtpmap:9 G722/8000",
            "",
        ]
    )
    out = with_inband_fec(offer_like).split("\r\n")
    assert (
        out[out.index("a=rtpmap:111 opus/48000/2") + 1] == "a=fmtp:111 minptime=10;useinbandfec=1"
    )
    assert sum(line.startswith("a=fmtp:") for line in out) == 1
    had = offer_like.replace(
        "a=rtpmap:9 G722/8000",
        "a=fmtp:111 minptime=10;useinbandfec=0;stereo=1\r\na=rtpmap:9 G722/8000",
    )
    out = with_inband_fec(had).split("\r\n")
    assert "a=fmtp:111 minptime=10;stereo=1;useinbandfec=1" in out
    assert with_inband_fec("v=0\r\n") == "v=0\r\n"  # no Opus: left alone


def test_frames_dropped_to_bound_latency_are_not_concealed_back() -> None:
    """Frames that pile up while the mixer itself was held up (no mix ran to conceal
    anything) lose their oldest on purpose, to keep latency bounded: those are not a hole for
    the concealment to fill again."""
    packets, _ = voice_packets(40)
    ra, counters, _ = _room_audio(2)
    inbox = ra.mix.inboxes[0]
    for k in range(10):
        inbox.put((None, frame(packets, k)))
        ra.mix_frame(k * 0.02, cap=0)
    assert counters.concealed == 0
    mx = ra.mix
    assert mx.owed[0] == 0 and mx.streaming[0]
    for k in range(10, 16):  # six frames at once
        inbox.put((None, frame(packets, k)))
    ra.mix_frame(0.2, cap=0)
    assert counters.dropped_in >= 2
    assert counters.concealed == 0
    assert mx.wpos[0] - mx.rpos[0] <= 3


def test_a_reordered_pair_arriving_before_its_mix_is_played_in_order() -> None:
    """Packets the network swapped (21 before 20) that both arrive before frame 20's mix are
    put back in order by the speaker's inbox: nothing is concealed, the listener hears exactly
    what it hears without the swap. One that comes after its successor was mixed is dropped."""
    packets, _ = voice_packets(40)
    clean, _ = listen(packets, {k: [k] for k in range(40)}, 40)
    swapped = {k: [k] for k in range(40)}
    swapped[20], swapped[21] = [21, 20], []
    heard, counters = listen(packets, swapped, 40)
    assert counters.concealed == 0
    assert np.array_equal(heard, clean)
    # 31 overtakes 30 by a whole frame: 30 comes after 31 was mixed (too late to use).
    late = {k: [k] for k in range(40)}
    late[30], late[31] = [31], [30]
    _, counters = listen(packets, late, 40)
    assert counters.concealed == 1  # frame 30, filled when 31 showed the hole
