"""A case review around shared models: state bytes, grab and annotation round trips, recovery.

    python -m benchmarks.objects [--seconds 5] [--rooms 10]

A server (``medverse serve``, defaults, authentication off, a fresh data directory) and a load
process (12 SDK members in room ``review``) run in separate processes pinned to separate cores.
The load process measures, on one observer's state frames:

* a baseline with 12 still avatars and no objects, then 20 spawned objects at rest, then 2 of
  them grabbed and moved continuously (turning and sliding at 60 Hz, sent at the tick rate)
  while other members keep grabbing free objects and annotating;
* objects' own bytes per tick, exactly: every decoded snapshot is cut down to the object
  entities and re-encoded against the previous one (the object part of the shared delta);
* grab round trip (call to acknowledgement: the lease is in memory) and annotation round trip
  (call to acknowledgement: committed to SQLite with fsync first).

It also fills ``--rooms`` more rooms with 20 objects and 10 annotations each. Then the server is
killed with SIGKILL, restarted on the same data directory, and recovery is the time from
starting the new process until every room has been joined and shows all its acknowledged
objects and annotations. Targets: objects at rest <= 1 byte per object per tick in aggregate;
grab round trip p99 <= 1 tick + 10 ms; recovery with all rooms restored <= 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from medverse.client_sdk import ObjectError, Pose, Session, connect
from medverse.protocol.snapshot import (
    FRAME_STATE,
    HEADER_SIZE,
    OBJECT_ID_BASE,
    Snapshot,
    SnapshotEncoder,
)
from tests.models import HEART, provide, sha256_of

from .harness import ServerProcess, free_port, progress, save_results, spawn, start_server

MEMBERS = 12
OBJECTS = 20
MOVERS = 2
ASSET = sha256_of(HEART)
ROOM = "review"


class MeteredSession(Session):
    """Records the size of every state frame, and the objects' own encoded bytes."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.frame_sizes: list[int] = []
        self.object_bytes: list[float] = []
        self._obj_encoder = SnapshotEncoder()
        self._obj_tick: int | None = None

    def _on_frame(self, data: bytes, text: bool = False) -> None:
        super()._on_frame(data, text)
        if data[0] != FRAME_STATE or self.tick is None:
            return
        self.frame_sizes.append(len(data))
        sub = objects_only(self.snapshot)
        tick = self.tick
        if self._obj_tick is not None and 0 < tick - self._obj_tick <= 255:
            frame = self._obj_encoder.encode(tick, sub)
            # The object part of the shared body: its own body minus the 3 count bits that
            # the shared frame has once (the padding makes this an upper bound).
            self.object_bytes.append(len(frame) - HEADER_SIZE - 3 / 8)
        else:
            self._obj_encoder = SnapshotEncoder()
            self._obj_encoder.encode(tick, sub)
        self._obj_tick = tick


def objects_only(snap: Snapshot) -> Snapshot:
    keep = snap.ids >= OBJECT_ID_BASE
    rows = np.repeat(keep, snap.slots.astype(np.int64))
    return Snapshot(
        ids=snap.ids[keep],
        slots=snap.slots[keep],
        flags=snap.flags[keep],
        present=snap.present[rows],
        pos=snap.pos[rows],
        rot_index=snap.rot_index[rows],
        rot=snap.rot[rows],
    )


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def phase(observer: MeteredSession, seconds: float) -> dict[str, float]:
    observer.frame_sizes.clear()
    observer.object_bytes.clear()
    await asyncio.sleep(seconds)
    return {
        "frame_bytes_median": pct(observer.frame_sizes, 50),  # type: ignore[arg-type]
        "frame_bytes_mean": float(np.mean(observer.frame_sizes)),
        "object_bytes_per_tick_mean": float(np.mean(observer.object_bytes)),
        "object_bytes_per_tick_median": pct(observer.object_bytes, 50),
        "ticks": len(observer.frame_sizes),
    }


async def mover(s: Session, oid: int, stop: asyncio.Event, phase_off: float) -> int:
    """Turn and slide an object at 60 Hz until stopped; returns the moves made."""
    await s.grab(oid)
    n = 0
    t0 = time.monotonic()
    while not stop.is_set():
        t = time.monotonic() - t0 + phase_off
        a = 0.8 * t
        s.move(
            oid,
            (0.3 * math.sin(t), 1.2 + 0.05 * math.sin(2 * t), -0.6),
            (0.0, math.sin(a / 2), 0.0, math.cos(a / 2)),
            1.0 + 0.2 * math.sin(0.5 * t),
        )
        n += 1
        await asyncio.sleep(1 / 60)
    await s.release(oid)
    return n


async def grabber(s: Session, oids: list[int], stop: asyncio.Event, out: list[float]) -> None:
    i = 0
    while not stop.is_set():
        oid = oids[i % len(oids)]
        i += 1
        t0 = time.perf_counter()
        try:
            await s.grab(oid)
        except ObjectError:
            continue
        out.append(time.perf_counter() - t0)
        await s.release(oid)
        await asyncio.sleep(0.02)


async def annotator(s: Session, oids: list[int], stop: asyncio.Event, out: list[float]) -> None:
    i = 0
    while not stop.is_set():
        oid = oids[i % len(oids)]
        i += 1
        t0 = time.perf_counter()
        await s.annotate(oid, "pin", [(0.0, 0.01 * (i % 10), 0.0)], text=f"note {i}")
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(0.05)


async def load(url: str, seconds: float, rooms: int) -> dict[str, Any]:
    sessions: list[Session] = []
    observer = MeteredSession(url, ROOM, "observer", ping_interval=0)
    await observer.start()
    sessions.append(observer)
    for i in range(1, MEMBERS):
        s = connect(url, room=ROOM, name=f"clinician {i}", ping_interval=0)
        await s.start()
        sessions.append(s)
    for i, s in enumerate(sessions):
        await s.objects.wait_synced()
        s.send_pose(
            head=Pose((math.cos(i), 1.6, math.sin(i)), (0.0, 0.0, 0.0, 1.0)),
            left=Pose((math.cos(i) - 0.2, 1.2, math.sin(i))),
            right=Pose((math.cos(i) + 0.2, 1.2, math.sin(i))),
        )
    await asyncio.sleep(1.0)
    res: dict[str, Any] = {"members": MEMBERS, "objects": OBJECTS, "moving": MOVERS}
    res["no_objects"] = await phase(observer, seconds)
    lead = sessions[1]
    await provide(url, ROOM, None, HEART)  # authentication is off: anyone may upload
    oids = [
        await lead.spawn(ASSET, (0.3 * (k % 5), 1.0, -0.5 * (k // 5)), name=f"model {k}")
        for k in range(OBJECTS)
    ]
    await asyncio.sleep(0.5)
    res["at_rest"] = await phase(observer, seconds)
    stop = asyncio.Event()
    grabs: list[float] = []
    annos: list[float] = []
    free = oids[MOVERS:]
    tasks = [
        asyncio.ensure_future(mover(sessions[1 + k], oids[k], stop, 1.7 * k)) for k in range(MOVERS)
    ]
    await asyncio.sleep(0.5)
    res["in_motion"] = await phase(observer, seconds)
    tasks += [
        asyncio.ensure_future(grabber(sessions[3 + k], free[k::4], stop, grabs)) for k in range(4)
    ]
    tasks += [
        asyncio.ensure_future(annotator(sessions[7 + k], free, stop, annos)) for k in range(4)
    ]
    res["in_motion_with_grabs_and_annotations"] = await phase(observer, seconds)
    stop.set()
    moves = await asyncio.gather(*tasks)
    res["moves_sent"] = sum(m for m in moves if isinstance(m, int))
    res["grab_rtt_ms"] = {
        "n": len(grabs),
        "p50": pct(grabs, 50) * 1e3,
        "p99": pct(grabs, 99) * 1e3,
    }
    res["annotation_rtt_ms"] = {
        "n": len(annos),
        "p50": pct(annos, 50) * 1e3,
        "p99": pct(annos, 99) * 1e3,
    }
    expected = {ROOM: (OBJECTS, len(annos))}
    # More rooms, so that recovery restores several.
    for r in range(rooms):
        name = f"ward-{r}"
        await provide(url, name, None, HEART)
        async with connect(url, room=name, name="lead", ping_interval=0) as s:
            await s.objects.wait_synced()
            ids = [await s.spawn(ASSET, (0.1 * k, 1.0, 0.0)) for k in range(OBJECTS)]
            for k in range(10):
                await s.annotate(ids[k], "measure", [(0, 0, 0), (0.01 * (k + 1), 0, 0)])
        expected[name] = (OBJECTS, 10)
    res["expected"] = expected
    await asyncio.gather(*(s.close() for s in sessions))
    return res


async def recover(url: str, expected: dict[str, list[int]], deadline: float) -> float:
    """Join every room until each shows all its objects and annotations; returns when done."""

    async def one(room: str, objects: int, annotations: int) -> None:
        while time.monotonic() < deadline:
            try:
                async with connect(url, room=room, name="checker", ping_interval=0) as s:
                    await s.objects.wait_synced()
                    got = (
                        len(s.objects),
                        sum(len(o.annotations) for o in s.objects.values()),
                    )
                    if got != (objects, annotations):
                        raise RuntimeError(f"room {room}: {got} != {(objects, annotations)}")
                    return
            except (OSError, ConnectionError, TimeoutError):
                await asyncio.sleep(0.02)
        raise TimeoutError(f"room {room} not restored in time")

    await asyncio.gather(*(one(r, o, a) for r, (o, a) in expected.items()))
    return time.monotonic()


def serve(port: int, data: str) -> ServerProcess:
    """The server under test (authentication off) on core 0, on ``data``."""
    return start_server(port=port, cpu=0, data_dir=data, log_level="error")


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.objects", description=__doc__)
    p.add_argument("--seconds", type=float, default=5.0, help="length of each measured phase")
    p.add_argument("--rooms", type=int, default=10, help="extra rooms to restore after kill -9")
    p.add_argument("--load", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.load:
        print(json.dumps(asyncio.run(load(args.load, args.seconds, args.rooms))))
        return 0
    data = tempfile.mkdtemp(prefix="medverse-bench-objects-")
    port = free_port()
    server = serve(port, data)
    try:
        server.wait_ready()
        progress(f"{args.seconds:g} s per phase: at rest, moving, grabs and annotations...")
        gen = spawn(
            *("benchmarks.objects", "--load", server.url),
            *("--seconds", str(args.seconds), "--rooms", str(args.rooms)),
            cpu=1,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = gen.communicate()
        if gen.returncode:
            raise subprocess.CalledProcessError(gen.returncode, gen.args, out, err)
        res = json.loads(out)
        progress(f"kill -9, restart and rejoin of {len(res['expected'])} rooms...")
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        t0 = time.monotonic()
        server = serve(port, data)
        server.wait_ready(step=0.01)  # fine-grained: this is the measured recovery
        t_listen = time.monotonic()
        t_done = asyncio.run(recover(server.url, res["expected"], t0 + 30))
        res["recovery_s"] = {
            "rooms": len(res["expected"]),
            "listening": t_listen - t0,
            "all_rooms_restored": t_done - t0,
        }
    finally:
        server.stop()
    report(res)
    return 0


def report(res: dict[str, Any]) -> None:
    tick = 1000 / 30
    rows = [
        ("12 avatars, no objects", res["no_objects"]),
        ("+ 20 objects at rest", res["at_rest"]),
        ("+ 2 of them moving", res["in_motion"]),
        ("+ grabs and annotations", res["in_motion_with_grabs_and_annotations"]),
    ]
    header = f"{'scenario':<26} {'frame B/tick':>12} {'objects B/tick':>14} {'B/object':>9}"
    print(header)
    print("-" * len(header))
    for name, r in rows:
        per = r["object_bytes_per_tick_mean"] / OBJECTS if "no objects" not in name else 0.0
        print(
            f"{name:<26} {r['frame_bytes_mean']:>12.2f} {r['object_bytes_per_tick_mean']:>14.2f} "
            f"{per:>9.3f}"
        )
    g, a, rec = res["grab_rtt_ms"], res["annotation_rtt_ms"], res["recovery_s"]
    moving = (
        res["in_motion"]["object_bytes_per_tick_mean"]
        - res["at_rest"]["object_bytes_per_tick_mean"]
    )
    print()
    print(f"moving object: {moving / MOVERS:.2f} B/tick each (vs at rest)")
    print(
        f"grab round trip:       p50 {g['p50']:6.2f} ms  p99 {g['p99']:6.2f} ms  (n={g['n']}, "
        f"target p99 <= {tick + 10:.1f} ms)"
    )
    print(
        f"annotation round trip: p50 {a['p50']:6.2f} ms  p99 {a['p99']:6.2f} ms  (n={a['n']}, "
        "durable before the ack)"
    )
    print(
        f"recovery after kill -9: listening {rec['listening']:.2f} s, all {rec['rooms']} rooms "
        f"restored {rec['all_rooms_restored']:.2f} s (target <= 2 s)"
    )
    res["targets"] = {
        "at_rest_bytes_per_object_per_tick_le_1": res["at_rest"]["object_bytes_per_tick_mean"]
        / OBJECTS
        <= 1.0,
        "grab_p99_le_tick_plus_10ms": g["p99"] <= tick + 10,
        "recovery_le_2s": rec["all_rooms_restored"] <= 2.0,
    }
    res["ran_at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    save_results("objects", {"benchmark": "objects", **res})


if __name__ == "__main__":
    sys.exit(main())
