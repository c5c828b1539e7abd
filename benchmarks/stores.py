"""Durable state on SQLite and on PostgreSQL, in the same run: annotation append throughput and
the latency of acknowledged writes.

    python -m benchmarks.stores [--seconds 5] [--clients 4]

A private PostgreSQL server (``initdb`` in a temporary folder, 127.0.0.1, ``fsync`` on, as a
deployment runs it) is started first. Then, for each backend in turn:

* **store**: one thread calls the object store's ``put_annotation`` back to back for
  ``--seconds`` (what the server's storage thread does for each annotation): appends per second
  and the latency of each (call to durable return);
* **server**: ``medverse serve`` on that backend, and a load process (another process) with
  ``--clients`` SDK members, each in a room of its own, each annotating one annotation after
  the other for ``--seconds``: acknowledged annotations per
  second over all members, and the latency from the call to the acknowledgement (the server
  commits before it acknowledges).

SQLite commits with ``synchronous=FULL`` (an fsync per commit); PostgreSQL commits a transaction
per change over a loopback socket (its WAL is flushed at commit). The machine is shared, so
figures vary between runs; the two backends are measured back to back to compare them. (No
process is pinned to a core: on a machine shared with other pinned work, a pinned load
process waited for seconds behind it.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tests.models import HEART, provide, sha256_of

from .harness import progress, run_server, save_results, spawn

ASSET = sha256_of(HEART)
#: Annotations one object may carry by default (a member moves to a new object before).
PER_OBJECT = 1000


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50, p99 and max of latencies in seconds, as milliseconds."""
    if not samples:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    a = np.array(samples) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "max_ms": round(float(a.max()), 3),
    }


# --------------------------------------------------------------------------- the store alone


def store_run(name: str, data_dir: str, url: str | None, seconds: float) -> dict[str, Any]:
    """``put_annotation`` back to back on one thread, as the server's storage thread does."""
    from medverse.server.store import (
        ObjectStore,
        PostgresObjectStore,
        SQLiteObjectStore,
        StoredAnnotation,
        StoredObject,
    )

    db = None
    store: ObjectStore
    if url is None:
        store = SQLiteObjectStore(data_dir)
    else:
        from medverse.server.pg import Database

        db = Database(url)
        db.start()
        store = PostgresObjectStore(db)
    room = f"store-{name}"
    store.put_object(
        StoredObject(room, 1, ASSET, "heart", "a", "a", time.time(), (0, 0, 0), (0, 0, 0, 1), 1)
    )
    latencies: list[float] = []
    end = time.monotonic() + seconds
    n = 0
    t0 = time.monotonic()
    while time.monotonic() < end and n < 1_000_000:
        n += 1
        anno = StoredAnnotation(
            room, n, 1, "pin", ((0.0, 0.01, 0.0),), f"note {n}", None, "a", "a", 1, time.time(),
            None, n,
        )  # fmt: skip
        t = time.perf_counter()
        store.put_annotation(anno)
        latencies.append(time.perf_counter() - t)
    elapsed = time.monotonic() - t0
    store.close()
    if db is not None:
        db.close()
    return {"appends": n, "per_second": round(n / elapsed, 1), **percentiles(latencies)}


# --------------------------------------------------------------------------- through a server


async def load(url: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` members annotating one after the other; acknowledged annotations."""
    from medverse.client_sdk import connect

    latencies: list[float] = []
    counts = [0] * clients
    start = asyncio.Event()

    async def member(i: int) -> None:
        room = f"bench-{i}"
        async with connect(url, room=room, name=f"member {i}", ping_interval=0) as s:
            await s.objects.wait_synced()
            oid = await s.spawn(ASSET)
            await start.wait()
            end = time.monotonic() + seconds
            k = 0
            while time.monotonic() < end and k < 200_000:
                if k and k % PER_OBJECT == 0:
                    oid = await s.spawn(ASSET)
                t = time.perf_counter()
                await s.annotate(oid, "pin", [(0.0, 0.001 * (k % 100), 0.0)], text=f"n{k}")
                latencies.append(time.perf_counter() - t)
                k += 1
            counts[i] = k

    for i in range(clients):  # one upload at a time (the server limits them per address)
        await provide(url, f"bench-{i}")
    tasks = [asyncio.ensure_future(member(i)) for i in range(clients)]
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    start.set()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - t0
    total = sum(counts)
    return {
        "acknowledged": total,
        "per_second": round(total / elapsed, 1),
        **percentiles(latencies),
    }


def server_run(name: str, url: str | None, seconds: float, clients: int) -> dict[str, Any]:
    settings: dict[str, object] = {"room_linger": 30}
    if url is not None:
        settings["database_url"] = url
    with run_server(**settings) as srv:
        out = tempfile.NamedTemporaryFile("r", suffix=".json", delete=False)
        proc = spawn(
            "benchmarks.stores",
            "--load", srv.url, "--clients", str(clients), "--seconds", str(seconds),
            "--out", out.name,
        )  # fmt: skip
        proc.wait(timeout=seconds + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"the load process failed ({proc.returncode})")
        return json.loads(Path(out.name).read_text())  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0 < args.seconds <= 120 or not 1 <= args.clients <= 64:
        parser.error("--seconds must be in (0, 120] and --clients 1-64")
    if args.load:  # the load process
        result = asyncio.run(load(args.load, args.clients, args.seconds))
        Path(args.out).write_text(json.dumps(result))
        return

    from tests.pgservice import running_postgres

    progress("starting a private PostgreSQL server (fsync on)")
    results: dict[str, Any] = {"seconds": args.seconds, "clients": args.clients, "backends": {}}
    with running_postgres(fsync=True) as pg:
        for name in ("sqlite", "postgresql"):
            url = pg.create_database("bench") if name == "postgresql" else None
            progress(f"{name}: put_annotation on one thread for {args.seconds:g} s")
            store = store_run(name, tempfile.mkdtemp(prefix="medverse-bench-"), url, args.seconds)
            progress(f"{name}: {args.clients} members annotating through a server")
            server = server_run(name, url, args.seconds, args.clients)
            results["backends"][name] = {"store": store, "server": server}
    print()
    print(f"{'backend':<11} {'path':<7} {'writes/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, r in results["backends"].items():
        for path in ("store", "server"):
            x = r[path]
            print(
                f"{name:<11} {path:<7} {x['per_second']:>9.1f} {x['p50_ms']:>8.2f} "
                f"{x['p99_ms']:>8.2f} {x['max_ms']:>8.2f}"
            )
    print(
        "\nstore: put_annotation back to back on one thread (durable on return); server: "
        f"{args.clients} members annotating, call to acknowledgement"
    )
    save_results("stores", results)


if __name__ == "__main__":
    try:
        main()
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"benchmarks.stores: {exc}", file=sys.stderr)
        sys.exit(1)
