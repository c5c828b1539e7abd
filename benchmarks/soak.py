"""A soak: everything a clinic does at once, for long enough to see anything that grows.

    python -m benchmarks.soak [--minutes 10] [--interval 30] [--headsets 160]

One server (pinned to core 0) and, on core 1, in separate processes: ``--headsets`` steady
headsets in rooms of 8 (``medverse loadtest``); a driver with members who join and leave over
and over, members whose connection drops and resumes, four audio bots talking in one room,
two members grabbing and moving shared models and one annotating; and one attacker flooding a
room at the lowest priority. Every ``--interval`` seconds it prints the server's RSS, open file
descriptors, asyncio tasks, tick p99 and audio late frames; at the end it compares the last
third of the samples with the first third (after a warm-up sample) and fails (exit 1) if any
of them trends upward. JSON in ``benchmarks/results/soak.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import secrets
import subprocess
import sys
import time
from typing import Any

import psutil

from medverse.client_sdk import Pose, connect, tone_track
from medverse.protocol.tokens import mint_token

from .harness import RESULTS, run_server, save_results, spawn

ROOMS = ("churn-a", "churn-b", "drop-a")
AUDIO_ROOM = "soak-audio"
OBJECT_ROOM = "soak-review"


def _token(room: str, who: str, role: str = "participant") -> str:
    return mint_token(
        os.environ["MEDVERSE_AUTH_SECRET"].encode(), room=room, identity=who, role=role
    )


async def _churner(url: str, i: int, stop: float, counts: dict[str, int]) -> None:
    """Joins a room, moves for a few seconds, leaves; again and again."""
    rng = random.Random(i)
    while time.monotonic() < stop:
        room = rng.choice(ROOMS[:2])
        try:
            s = connect(url, room, f"churn{i}", token=_token(room, f"churn{i}"), ping_interval=0)
            async with s:
                counts["joins"] += 1
                until = time.monotonic() + rng.uniform(2.0, 6.0)
                while time.monotonic() < min(until, stop):
                    s.send_pose(head=Pose((rng.uniform(-2, 2), 1.6, rng.uniform(-2, 2))))
                    await asyncio.sleep(1 / 30)
        except Exception:
            counts["errors"] += 1
        await asyncio.sleep(rng.uniform(0.1, 1.0))


async def _dropper(url: str, i: int, stop: float, counts: dict[str, int]) -> None:
    """Stays in a room but loses its connection now and then (the SDK resumes it)."""
    room = ROOMS[2]
    s = connect(url, room, f"drop{i}", token=_token(room, f"drop{i}"), ping_interval=0)
    async with s:
        while time.monotonic() < stop:
            for _ in range(150):
                s.send_pose(head=Pose((float(i), 1.6, 0.0)))
                await asyncio.sleep(1 / 30)
            ws = s._ws  # a dropped connection, as a network would drop it
            if ws is not None:
                await ws.close()
                counts["drops"] += 1


async def _objects(url: str, stop: float, counts: dict[str, int]) -> None:
    """Two members grab and move models, a third annotates them."""
    from tests.models import HEART, provide

    host = _token(OBJECT_ROOM, "curator", "host")
    (asset,) = await provide(url.replace("ws://", "http://"), OBJECT_ROOM, host, HEART)
    members = [
        connect(url, OBJECT_ROOM, f"m{i}", token=_token(OBJECT_ROOM, f"m{i}"), ping_interval=0)
        for i in range(3)
    ]
    for m in members:
        await m.start()
    try:
        oids = [await members[0].spawn(asset, (float(k), 1.0, -1.0)) for k in range(4)]
        t = 0
        while time.monotonic() < stop:
            for k, m in enumerate(members[:2]):
                oid = oids[(t + k) % len(oids)]
                try:
                    await m.grab(oid)
                    for step in range(30):
                        m.move(oid, (float(k), 1.0 + 0.01 * step, -1.0))
                        await asyncio.sleep(1 / 30)
                    await m.release(oid)
                    counts["grabs"] += 1
                except Exception:
                    counts["refused"] += 1
            aid = await members[2].annotate(oids[t % len(oids)], "pin", [(0.0, 0.0, 0.0)], "x")
            await members[2].delete_annotation(aid)
            counts["annotations"] += 1
            t += 1
    finally:
        for m in members:
            await m.close()


async def _audio(url: str, stop: float, counts: dict[str, int]) -> None:
    """Four bots talking in one room (real WebRTC peers on 127.0.0.1)."""
    bots = [
        connect(url, AUDIO_ROOM, f"bot{i}", token=_token(AUDIO_ROOM, f"bot{i}"), ping_interval=0)
        for i in range(4)
    ]
    for i, b in enumerate(bots):
        await b.start()
        await b.audio.start(tone_track(300 + 100 * i), decode=False)
        counts["audio_bots"] += 1
    try:
        while time.monotonic() < stop:
            await asyncio.sleep(0.5)
    finally:
        for b in bots:
            await b.close()


async def drive(url: str, seconds: float) -> dict[str, int]:
    counts = dict.fromkeys(
        ("joins", "errors", "drops", "grabs", "refused", "annotations", "audio_bots"), 0
    )
    stop = time.monotonic() + seconds
    await asyncio.gather(
        *(_churner(url, i, stop, counts) for i in range(20)),
        *(_dropper(url, i, stop, counts) for i in range(4)),
        _objects(url, stop, counts),
        _audio(url, stop, counts),
    )
    return counts


def _sample(server: Any, proc: psutil.Process) -> dict[str, Any]:
    health = server.get_json("/health?ticks=900")
    audio = health.get("audio", {})
    return {
        "t": round(time.monotonic(), 1),
        "rss_mb": round(proc.memory_info().rss / 2**20, 1),
        "fds": proc.num_fds(),
        "tasks": health.get("tasks"),
        "members": health.get("members"),
        "tick_p99_ms": health.get("tick_work_ms", {}).get("p99"),
        "audio_late": audio.get("late", 0) if isinstance(audio, dict) else 0,
    }


def trends(samples: list[dict[str, Any]]) -> list[str]:
    """What grew from the first third of the samples (after the first) to the last third."""
    body = samples[1:]
    if len(body) < 3:
        return []
    k = max(1, len(body) // 3)
    first, last = body[:k], body[-k:]

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return sum(float(r[key] or 0) for r in rows) / len(rows)

    out = []
    rss0, rss1 = mean(first, "rss_mb"), mean(last, "rss_mb")
    if rss1 - rss0 > max(30.0, 0.2 * rss0):
        out.append(f"RSS {rss0:.0f} -> {rss1:.0f} MB")
    fds0, fds1 = mean(first, "fds"), mean(last, "fds")
    if fds1 - fds0 > 20:
        out.append(f"open files {fds0:.0f} -> {fds1:.0f}")
    t0, t1 = mean(first, "tasks"), mean(last, "tasks")
    if t1 - t0 > 50:
        out.append(f"tasks {t0:.0f} -> {t1:.0f}")
    p0, p1 = mean(first, "tick_p99_ms"), mean(last, "tick_p99_ms")
    if p1 > 2 * p0 + 1.0:
        out.append(f"tick p99 {p0:.1f} -> {p1:.1f} ms")
    late = [float(r["audio_late"] or 0) for r in body]
    steps = [b - a for a, b in itertools.pairwise(late)]
    if len(steps) >= 4 and sum(steps[len(steps) // 2 :]) > 2 * sum(steps[: len(steps) // 2]) + 50:
        out.append(f"audio late frames rising: {late[0]:.0f} -> {late[-1]:.0f}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    p.add_argument("--headsets", type=int, default=160, help="steady headsets, rooms of 8")
    p.add_argument("--driver", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.driver:
        print(json.dumps(asyncio.run(drive(args.driver, args.seconds))))
        return 0
    seconds = args.minutes * 60.0
    samples: list[dict[str, Any]] = []
    with run_server(
        cpu=0,
        auth_secret=secrets.token_urlsafe(48),
        max_connections_per_address=args.headsets + 256,
        max_unidentified_per_address=256,
    ) as server:
        env = server.env
        common: dict[str, Any] = {"env": env, "cpu": 1, "stdout": subprocess.DEVNULL}
        load = spawn(
            *("medverse.server.cli", "loadtest", "--url", server.url, "--room", "soak"),
            *("--clients", str(args.headsets), "--room-size", "8", "--quiet"),
            *("--seconds", str(seconds + 30), "--warmup", "5"),
            stderr=subprocess.DEVNULL,
            **common,
        )
        driver = spawn(
            "benchmarks.soak",
            *("--driver", server.url, "--seconds", str(seconds)),
            stderr=subprocess.PIPE,
            **{**common, "stdout": subprocess.PIPE},
        )
        attacker = spawn(
            *("benchmarks.hostile", "--attacker", server.url, "--seconds", str(seconds)),
            nice=19,
            stderr=subprocess.DEVNULL,
            **common,
        )
        proc = psutil.Process(server.pid)
        print(f"soak for {args.minutes:g} min, a sample every {args.interval:g} s", flush=True)
        header = (
            f"{'min':>5} {'RSS MB':>7} {'fds':>5} {'tasks':>6} {'members':>8} "
            f"{'tick p99 ms':>11} {'audio late':>10}"
        )
        print(header)
        print("-" * len(header))
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            time.sleep(min(args.interval, max(0.0, seconds - (time.monotonic() - start))))
            s = _sample(server, proc)
            samples.append(s)
            print(
                f"{(time.monotonic() - start) / 60:>5.1f} {s['rss_mb']:>7.1f} {s['fds']:>5} "
                f"{s['tasks']!s:>6} {s['members']!s:>8} {s['tick_p99_ms']!s:>11} "
                f"{s['audio_late']:>10}",
                flush=True,
            )
        out, err = driver.communicate(timeout=120)
        counts = json.loads(out or "{}") if driver.returncode == 0 else {"driver_failed": 1}
        if driver.returncode != 0:
            sys.stderr.write(err.decode()[-2000:])
        attacker.kill()
        load.kill()
        for q in (attacker, load):
            q.wait()
    grown = trends(samples)
    print("activity:", json.dumps(counts))
    print("trends:", "; ".join(grown) if grown else "nothing grew")
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "soak", "minutes": args.minutes, "samples": samples, "activity": counts}
    save_results("soak", {**doc, "trends": grown})
    return 1 if grown or "driver_failed" in counts else 0


if __name__ == "__main__":
    sys.exit(main())
