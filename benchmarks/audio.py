"""Spatial audio under load: every member talking, the server mixing one stream per listener.

    python -m benchmarks.audio [--seconds 10] [--only 12]

For 4, 8, 12 and 24 members, a server (pinned to core 0) and load generator processes (pinned
to core 1; at most 8 bots each) with real aiortc peers on 127.0.0.1. The bots stand on a circle
of 2 m radius facing its centre, and every one publishes a tone (its own frequency, -35 dBFS)
for the whole run, so the server decodes, mixes and encodes for everyone all the time. Bot 0
also clicks (a 2 ms burst at 0.9 of full scale) twice a second; bot 1, its neighbour, detects
the click in its mix: mouth-to-ear latency through the server, from the moment the clicked
frame leaves bot 0's track to the moment bot 1's decoded frame arrives.

Measured over the window: server CPU (% of one core, psutil on the server pid), mix time per
20 ms frame p50/p99 (decoding every speaker and mixing every listener; the server's own
clock, ``/health``) and encoding time per frame for all listeners, the mixer's late frames, speaker
frames dropped (more than three waiting) or trimmed (a standing extra frame after jitter),
listener frames dropped, frames the bots themselves sent late (load generator behind), frames
each listener received per second (50 is real time), click latency p50/p99, the longest the
mixer held the event loop at once and the room tick's work p99. Targets:
12 members <= 50 % of one core; 24 members in real time with no dropped frames; mouth-to-ear
added on loopback p50 <= 60 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import math
import os
import secrets
import subprocess
import sys
import time
from typing import Any

import av
import numpy as np
import psutil
from aiortc import MediaStreamTrack

from .harness import run_server, save_results, spawn

ROOM = "audio-bench"
SIZES = (4, 8, 12, 24)
BOTS_PER_PROCESS = 8
RADIUS = 2.0
TONE_DBFS = -35.0
SAMPLE_RATE = 48000
FRAME_SAMPLES = 960


class LoopedTone(MediaStreamTrack):
    """A load generator's voice: a tone whose frequency is a multiple of 50 Hz, so every 20 ms
    frame is the same and one Opus packet, encoded once, is sent over and over (the bots then
    cost next to nothing to run). ``click()`` sends a packet with a click instead, once."""

    kind = "audio"

    def __init__(self, frequency: float, level_dbfs: float) -> None:
        super().__init__()
        assert frequency % 50 == 0
        t = np.arange(FRAME_SAMPLES * 12) / SAMPLE_RATE
        amp = 10 ** (level_dbfs / 20) * math.sqrt(2)
        tone = amp * np.sin(2 * np.pi * frequency * t)
        clicked = tone[-FRAME_SAMPLES:].copy()
        clicked[:96] = 0.9 * np.sin(2 * np.pi * 2000.0 * np.arange(96) / SAMPLE_RATE)
        codec = av.CodecContext.create("libopus", "w")
        codec.bit_rate = 32000
        codec.format = "s16"
        codec.layout = "stereo"
        codec.sample_rate = SAMPLE_RATE
        codec.time_base = fractions.Fraction(1, SAMPLE_RATE)
        packets: list[bytes] = []
        frames = [tone[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES] for i in range(12)]
        for i, x in enumerate([*frames, clicked, frames[0]]):
            pcm = np.repeat((x * 32767).astype(np.int16), 2).reshape(1, -1)
            f = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
            f.sample_rate = SAMPLE_RATE
            f.pts = i * FRAME_SAMPLES
            packets += [bytes(p) for p in codec.encode(f)]
        self._steady = packets[10]
        self._click = packets[12]
        self._n = 0
        self._t0: float | None = None
        self._clicking = False
        self.click_times: list[float] = []
        self.late_sends = 0

    def click(self) -> None:
        self._clicking = True

    async def recv(self) -> av.Packet:
        if self._t0 is None:
            self._t0 = time.monotonic()
        delay = self._t0 + self._n * FRAME_SAMPLES / SAMPLE_RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.04:
            self.late_sends += 1  # the load generator itself fell behind (then catches up)
        data = self._steady
        if self._clicking:
            self._clicking = False
            data = self._click
            self.click_times.append(time.monotonic())
        packet = av.Packet(data)
        packet.pts = self._n * FRAME_SAMPLES
        packet.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._n += 1
        return packet


def seat(i: int, n: int) -> tuple[tuple[float, float, float], tuple[float, float, float, float]]:
    """Position and orientation of bot ``i`` of ``n`` on the circle, facing the centre."""
    a = 2 * math.pi * i / n
    x, z = RADIUS * math.sin(a), RADIUS * math.cos(a)
    # Facing the centre means -Z (forward) points along -(x, z): a yaw of atan2(x, z).
    yaw = math.atan2(x, z)
    return (x, 1.6, z), (0.0, math.sin(yaw / 2), 0.0, math.cos(yaw / 2))


def click_threshold(total: int) -> float:
    """Half the click's expected peak at bot 1 (distance and panning from bot 0's seat): far
    above the bed of everyone's tones, which are 30 dB quieter than the click."""
    from medverse.server.audio.spatial import Spatial, spatial_gains

    (p0, _), (p1, q1) = seat(0, total), seat(1, total)
    g = spatial_gains(
        np.array([True]),
        np.array([p1]),
        np.array([q1]),
        np.array([True]),
        np.array([p0]),
        Spatial(),
    )
    return 0.5 * 0.9 * float(g.max())


async def load(url: str, first: int, count: int, total: int) -> dict[str, Any]:
    """Run bots ``first .. first+count-1``; wait for the window on stdin; report JSON."""
    from medverse.client_sdk import LevelMeter, Pose, connect
    from medverse.protocol.tokens import mint_token

    secret = os.environ["MEDVERSE_AUTH_SECRET"].encode()
    sessions = []
    meters = []
    tones = []
    for i in range(first, first + count):
        who = f"bot{i}"
        # Bots need the room connection for signaling only: they leave avatar state unread, so
        # 24 bots on one core spend their time on audio, not on decoding everyone's poses.
        token = mint_token(secret, room=ROOM, identity=who)
        s = connect(url, room=ROOM, name=who, token=token, receive_state=False)
        await s.start()
        pos, rot = seat(i, total)
        s.send_pose(head=Pose(pos, rot))
        tone = LoopedTone(200.0 + 50.0 * i, TONE_DBFS)
        detector = i == 1  # only bot 1 decodes its mix (to find bot 0's clicks)
        mix = await s.audio.start(tone, decode=detector)
        sessions.append(s)
        tones.append(tone)
        meters.append(LevelMeter(mix, keep=4000) if detector else None)
    print("connected", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    t_start, t_end = (float(v) for v in line.split())
    clicker = tones[0] if first == 0 else None
    while time.monotonic() < t_start:
        await asyncio.sleep(0.01)
    for tone in tones:
        tone.late_sends = 0
    while time.monotonic() < t_end:
        if clicker is not None:
            clicker.click()
        await asyncio.sleep(0.5)
    late_sends = sum(t.late_sends for t in tones)
    await asyncio.sleep(0.5)
    received = []
    for s, m in zip(sessions, meters, strict=True):
        times = [f[0] for f in m.frames] if m is not None else list(s.audio.inbox.arrivals)
        received.append(sum(1 for t in times if t_start <= t < t_end) / (t_end - t_start))
    latencies = []
    if clicker is not None and count > 1:
        times = [t for t in clicker.click_times if t_start <= t < t_end - 0.3]
        threshold = click_threshold(total)
        for t in times:
            hit = meters[1].first_peak_after(t, threshold)
            if hit is not None and hit - t < 0.4:
                latencies.append((hit - t) * 1000.0)
        report_clicks = len(times)
    else:
        report_clicks = 0
    for m in meters:
        if m is not None:
            m.stop()
    for s in sessions:
        await s.close()
    return {
        "fps": received,
        "latency_ms": latencies,
        "clicks": report_clicks,
        "bot_late_sends": late_sends,
    }


def run_one(members: int, seconds: float) -> dict[str, Any]:
    with run_server(
        cpu=0,
        auth_secret=secrets.token_urlsafe(48),
        max_connections_per_address=512,
        rtc_host_addresses="127.0.0.1",
    ) as server:
        loads: list[subprocess.Popen[str]] = []
        try:
            for first in range(0, members, BOTS_PER_PROCESS):
                count = min(BOTS_PER_PROCESS, members - first)
                p = spawn(
                    *("benchmarks.audio", "--load", server.url, "--first", str(first)),
                    *("--count", str(count), "--total", str(members)),
                    env=server.env,  # its MEDVERSE_AUTH_SECRET mints the bots' tokens
                    cpu=1,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                loads.append(p)
            for p in loads:
                assert p.stdout is not None
                if p.stdout.readline().strip() != "connected":
                    raise RuntimeError("a load generator failed to connect")
            t_start = time.monotonic() + 2.0  # let every mix settle first
            t_end = t_start + seconds
            for p in loads:
                assert p.stdin is not None
                p.stdin.write(f"{t_start} {t_end}\n")
                p.stdin.flush()
            proc = psutil.Process(server.pid)
            lprocs = [psutil.Process(p.pid) for p in loads]
            time.sleep(max(0.0, t_start - time.monotonic()))
            c0 = proc.cpu_times()
            l0 = [lp.cpu_times() for lp in lprocs]
            h0 = server.get_json("/health")
            w0 = time.monotonic()
            time.sleep(max(0.0, t_end - time.monotonic()))
            c1 = proc.cpu_times()
            l1 = [lp.cpu_times() for lp in lprocs]
            wall = time.monotonic() - w0
            h1 = server.get_json(f"/health?ticks={int(wall * h0['tick_rate'])}")
            reports = []
            for p in loads:
                out, _ = p.communicate(timeout=60)
                reports.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for p in loads:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    cpu = (c1.user + c1.system - c0.user - c0.system) / wall * 100
    lcpu = sum(b.user + b.system - a.user - a.system for a, b in zip(l0, l1, strict=True))
    a0, a1 = h0["audio"], h1["audio"]
    fps = [f for r in reports for f in r["fps"]]
    lat = np.array([x for r in reports for x in r["latency_ms"]])
    clicks = sum(r["clicks"] for r in reports)
    mix_ms = a1.get("mix_ms", {})
    return {
        "members": members,
        "seconds": round(wall, 2),
        "server_cpu_percent": round(cpu, 1),
        "loadgen_cpu_percent": round(lcpu / wall * 100, 1),
        "loadgen_processes": len(loads),
        "mix_ms_p50": mix_ms.get("p50"),
        "mix_ms_p99": mix_ms.get("p99"),
        "encode_ms_p50": a1.get("encode_ms", {}).get("p50"),
        "encode_ms_p99": a1.get("encode_ms", {}).get("p99"),
        "loop_hold_ms_p99": a1.get("loop_hold_ms", {}).get("p99"),
        "loop_hold_ms_max": a1.get("loop_hold_ms", {}).get("max"),
        "late_frames": a1["late"] - a0["late"],
        "dropped_speaker_frames": a1["dropped_in"] - a0["dropped_in"],
        "trimmed_speaker_frames": a1["trimmed"] - a0["trimmed"],
        "dropped_listener_frames": a1["dropped_out"] - a0["dropped_out"],
        "degraded_frames": a1["degraded"] - a0["degraded"],
        "frames_mixed": a1["frames_mixed"] - a0["frames_mixed"],
        "listener_fps_min": round(min(fps), 1),
        "listener_fps_median": round(float(np.median(fps)), 1),
        "click_latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
        "click_latency_ms_p99": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
        "clicks_sent": clicks,
        "bot_late_sends": sum(r["bot_late_sends"] for r in reports),
        "clicks_detected": int(lat.size),
        "tick_ms_p99": h1.get("tick_work_ms", {}).get("p99"),
        "tick_overruns": h1["tick_overruns"] - h0["tick_overruns"],
    }


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.audio", description=__doc__)
    p.add_argument("--seconds", type=float, default=10.0, help="measurement window per run")
    p.add_argument("--only", type=int, action="append", help="run only these member counts")
    p.add_argument("--load", default=None, help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--total", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.load:
        result = asyncio.run(load(args.load, args.first, args.count, args.total))
        print(json.dumps(result), flush=True)
        return 0
    runs = []
    for n in args.only or SIZES:
        print(f"running {n} members, all talking...", file=sys.stderr)
        runs.append(run_one(n, args.seconds))
    header = (
        f"{'members':>7} {'server CPU %':>12} {'mix p50 ms':>10} {'mix p99 ms':>10} "
        f"{'enc p50 ms':>10} {'enc p99 ms':>10} "
        f"{'late':>5} {'drop in':>7} {'trim':>5} {'drop out':>8} {'degraded':>8} {'fps min':>7} "
        f"{'m2e p50 ms':>10} {'m2e p99 ms':>10} {'clicks':>7} {'loadgen CPU %':>13} "
        f"{'bot late':>8} {'hold p99 ms':>11} {'tick p99 ms':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in runs:
        print(
            f"{r['members']:>7} {r['server_cpu_percent']:>12.1f} {r['mix_ms_p50']:>10.3f} "
            f"{r['mix_ms_p99']:>10.3f} {r['encode_ms_p50']:>10.3f} {r['encode_ms_p99']:>10.3f} "
            f"{r['late_frames']:>5} {r['dropped_speaker_frames']:>7} "
            f"{r['trimmed_speaker_frames']:>5} "
            f"{r['dropped_listener_frames']:>8} {r['degraded_frames']:>8} "
            f"{r['listener_fps_min']:>7.1f} {r['click_latency_ms_p50'] or float('nan'):>10.1f} "
            f"{r['click_latency_ms_p99'] or float('nan'):>10.1f} "
            f"{r['clicks_detected']:>3}/{r['clicks_sent']:<3} {r['loadgen_cpu_percent']:>13.1f} "
            f"{r['bot_late_sends']:>8} {r['loop_hold_ms_p99']:>11.3f} {r['tick_ms_p99']:>11.3f}"
        )
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    save_results("audio", {"benchmark": "audio", "ran": when, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
