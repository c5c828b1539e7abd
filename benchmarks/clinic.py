"""A clinic session: how long a move between rooms takes and when the avatar follows.

    python -m benchmarks.clinic [--patients 8] [--rounds 20]

A server (``medverse serve --clinic examples/clinic.toml``, a fresh data directory) and this
load process run in separate processes, pinned to separate cores where there are two. Patients
wait in ``waiting``; two clinicians in ``consult-1`` and ``consult-2`` take turns: ``call_next``
then ``send_back``, ``--rounds`` times each, half a second apart (the clinic allows a member 2
requests a second). Measured per move:

* request: from the host's call to its ``ack`` (the server has checked everything, taken the
  member out of its room and sent ``moved``);
* arrived: from the call to the patient's ``Arrived`` (the target room's consent answered by
  the patient's SDK, then its ``welcome``: a real move's whole path, on the same connection);
* avatar gap: ticks between the patient's first state in the new room and the first state of
  the clinician (or, going back, of a waiting patient) that contains its avatar;
* queue: from a move out of the waiting room to every waiting patient having its new place.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from medverse.client_sdk import Pose, Session
from medverse.server.auth import mint_token

from .harness import ROOT, pin, progress, run_server, save_results

SECRET = "b" * 48
#: Seconds between a clinician's requests: under the clinic's limit of 2 a second per member.
PACE = 0.5


def tok(room: str, who: str, role: str = "participant") -> str:
    return mint_token(SECRET.encode(), room=room, identity=who, name=who.upper(), role=role)


async def member(url: str, room: str, who: str, role: str = "participant") -> Session:
    s = Session(
        url,
        room,
        who.upper(),
        token=tok(room, who, role),
        consent=lambda version, text: True,
        ping_interval=0,
        connect_timeout=30,
    )
    await s.start()
    return s


class Watch:
    """Which room ticks a session's state frames carried, and the entity ids in each."""

    def __init__(self, s: Session) -> None:
        self.frames: list[tuple[str, int, set[int]]] = []
        s.on_state = lambda now, snap: self.frames.append(
            (s.room, s.tick or 0, {int(i) for i in snap.ids})
        )


async def until(cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.002)


async def run(url: str, patients: int, rounds: int) -> dict[str, Any]:
    progress(f"joining {patients} patients and 2 clinicians")
    waiting = [await member(url, "waiting", f"p{i}") for i in range(patients)]
    for p in waiting:
        p.send_pose(head=Pose((0.0, 1.6, 0.0)))
    doctors = [await member(url, f"consult-{i + 1}", f"dr{i}", "host") for i in range(2)]
    watches = {id(s): Watch(s) for s in [*waiting, *doctors]}
    request: list[float] = []
    arrived: list[float] = []
    queue: list[float] = []
    gaps: list[int] = []
    await until(lambda: all(p.queue is not None for p in waiting))
    progress(f"{rounds} rounds of call_next and send_back by each of 2 clinicians")
    for _ in range(rounds):
        for dr in doctors:
            await asyncio.sleep(PACE)
            before = {id(p): p.room for p in waiting}
            t0 = time.perf_counter()
            await dr.call_next()
            request.append(time.perf_counter() - t0)
            moved = next(p for p in waiting if p.room != before[id(p)])
            await until(lambda m=moved, d=dr: m.room == d.room and m.moving_to is None)
            arrived.append(time.perf_counter() - t0)
            rest = [p for p in waiting if p.room == "waiting"]
            await until(
                lambda rest=rest: all(
                    p.queue is not None and p.queue.waiting == len(rest) for p in rest
                )
            )
            queue.append(time.perf_counter() - t0)
            moved.send_pose(head=Pose((0.0, 1.6, -1.0)))
            gaps.append(await _gap(watches[id(moved)], watches[id(dr)], moved, dr.room))
            await asyncio.sleep(PACE)
            t0 = time.perf_counter()
            await dr.send_back(moved.member_id)
            request.append(time.perf_counter() - t0)
            await until(lambda m=moved: m.room == "waiting" and m.moving_to is None)
            arrived.append(time.perf_counter() - t0)
            other = next(p for p in waiting if p is not moved and p.room == "waiting")
            gaps.append(await _gap(watches[id(moved)], watches[id(other)], moved, "waiting"))
    for s in [*waiting, *doctors]:
        await s.close()

    def ms(values: list[float]) -> dict[str, float]:
        a = np.asarray(values) * 1000.0
        return {
            "n": len(a),
            "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2),
            "max_ms": round(float(a.max()), 2),
        }

    return {
        "patients": patients,
        "rounds": rounds,
        "request": ms(request),
        "arrived": ms(arrived),
        "queue_updated": ms(queue),
        "avatar_gap_ticks": {"max": max(gaps), "mean": round(float(np.mean(gaps)), 2)},
    }


async def _gap(mover: Watch, viewer: Watch, moved: Session, room: str) -> int:
    """Ticks between the moved member's first state in ``room`` and the viewer's first state
    there that shows it."""
    mid = moved.member_id
    await until(lambda: any(r == room and mid in ids for r, _, ids in viewer.frames))
    await until(lambda: any(r == room for r, _, _ in mover.frames))
    first_own = next(t for r, t, _ in mover.frames if r == room)
    first_seen = next(t for r, t, ids in viewer.frames if r == room and mid in ids)
    mover.frames.clear()
    viewer.frames.clear()
    return first_seen - first_own


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    if args.patients < 2 or args.rounds < 1:
        ap.error("--patients must be >= 2 and --rounds >= 1")
    two = (os.cpu_count() or 1) >= 2
    data = tempfile.mkdtemp(prefix="medverse-clinic-bench-")
    # The machine may be shared: its load is part of the result.
    load_before = os.getloadavg()[0]
    with run_server(
        auth_secret=SECRET,
        data_dir=data,
        clinic=Path(ROOT) / "examples" / "clinic.toml",
        cpu=0 if two else None,
    ) as srv:
        if two:
            pin(os.getpid(), 1)
        doc = asyncio.run(run(srv.url, args.patients, args.rounds))
    doc["time"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    doc["load_average_1min"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    header = f"{'move':<28}{'n':>5}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}"
    print(header)
    print("-" * len(header))
    for key, label in (
        ("request", "request to ack"),
        ("arrived", "request to arrived"),
        ("queue_updated", "queue places updated"),
    ):
        m = doc[key]
        print(f"{label:<28}{m['n']:>5}{m['p50_ms']:>10.2f}{m['p99_ms']:>10.2f}{m['max_ms']:>10.2f}")
    g = doc["avatar_gap_ticks"]
    gap = f"{g['mean']} ticks after the member's own (max {g['max']})"
    print(f"\navatar in the new room's state: {gap}")
    print(f"machine load average (1 min) before and after: {doc['load_average_1min']}")
    save_results("clinic", doc)


if __name__ == "__main__":
    main()
