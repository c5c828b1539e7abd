"""Uploaded models and image series on SQLite and on PostgreSQL, in the same run: what an upload
and a listing cost, through a server and in database round trips.

    python -m benchmarks.media [--uploads 40] [--listings 200] [--repeat 3]

A private PostgreSQL server (``initdb`` in a temporary folder, 127.0.0.1, ``fsync`` on, as a
deployment runs it) is started first. Then, for each backend in turn (rounds alternate them):

* **round trips**: in this process, the stores on that backend (``medverse.server.assets``,
  ``.imaging``) count the database operations of a model upload (the room's count, then the
  listing), a repeated upload to another room, a listing, a series upload and a series listing
  (PostgreSQL only: SQLite has none, it reads a local file);
* **server**: ``medverse serve`` on that backend with its blob directory, and a load process
  (another process) that uploads ``--uploads`` distinct small models to one room one after the
  other (request to answer), then lists the room's models and its series ``--listings`` times
  each, one request at a time.

The machine is shared, so figures vary between runs; the medians of ``--repeat`` rounds are
shown.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .harness import progress, run_server, save_results, spawn

BACKENDS = ("sqlite", "postgresql")
SECRET = "b" * 48


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50 and p99 of latencies in seconds, as milliseconds."""
    a = np.array(samples) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
    }


# --------------------------------------------------------------------------- round trips


def round_trips(url: str) -> dict[str, int]:
    """Database operations (each one statement, so one round trip) per store call."""
    from medverse.server.assets import AssetStore
    from medverse.server.auth import Identity
    from medverse.server.gltf import validate_glb
    from medverse.server.imaging import ImageStore, prepare
    from medverse.server.mediastore import PostgresAssetIndex, PostgresSeriesIndex
    from medverse.server.pg import Database
    from tests.models import triangle_glb

    from .dicomgen import synthetic_ct

    who = Identity("dr-a", "Dr A", "r", "host", frozenset())
    data = tempfile.mkdtemp(prefix="medverse-bench-media-")
    db = Database(url)
    db.start()
    assets = AssetStore(data, index=PostgresAssetIndex(db))
    images = ImageStore(data, index=PostgresSeriesIndex(db))
    out: dict[str, int] = {}

    def cost(name: str, fn: Any, *args: Any) -> None:
        before = db.calls
        fn(*args)
        out[name] = out.get(name, 0) + db.calls - before

    try:
        room = f"rt-{os.getpid()}-{time.monotonic_ns()}"
        model = triangle_glb(extra=time.monotonic_ns() % 100_000)
        sha = hashlib.sha256(model).hexdigest()
        for target in (room, room + "-b"):
            staged = assets.tmp / f"{sha}.glb"
            staged.write_bytes(model)
            key = "model upload" if target == room else "same model, another room"
            cost(key, assets.count, target)
            cost(key, assets.add, target, "m.glb", who, staged, sha, validate_glb(model))
        cost("model listing", assets.list, room)
        files = list(synthetic_ct(16, 16, 4).items())
        p = prepare(
            files,
            allow_identifiable=True,
            deidentify_requested=False,
            uid_key=images.uid_key_for(room),
            staging_dir=images.tmp,
        )
        cost("series upload", images.count, room)
        cost("series upload", images.add, room, "CT", who, p.staged, p.sha256, p.meta)
        cost("series listing", images.listings, room)
        cost("viewer state load", images.load_viewer, room)
    finally:
        assets.close()
        images.close()
        db.close()
    return out


# --------------------------------------------------------------------------- through a server


async def load(url: str, uploads: int, listings: int) -> dict[str, Any]:
    """The load process: uploads one after the other, then listings one after the other."""
    from medverse.client_sdk import AssetClient
    from medverse.client_sdk.images import ImageClient
    from medverse.server.auth import mint_token
    from tests.models import triangle_glb

    from .dicomgen import synthetic_ct

    room = f"bench-{os.getpid()}"
    token = mint_token(SECRET.encode(), room=room, identity="bench", name="bench", role="host")
    assets = AssetClient(url, room, token)
    images = ImageClient(url, room, token)
    try:
        up: list[float] = []
        for i in range(uploads):
            model = triangle_glb(extra=1000 + i)  # distinct content: a new file each time
            t = time.perf_counter()
            await assets.upload(model, f"m{i}.glb")
            up.append(time.perf_counter() - t)
        await images.upload(synthetic_ct(16, 16, 4))
        listed: list[float] = []
        for _ in range(listings):
            t = time.perf_counter()
            got = await assets.list()
            listed.append(time.perf_counter() - t)
        assert len(got) == uploads
        series: list[float] = []
        for _ in range(listings):
            t = time.perf_counter()
            await images.list_series()
            series.append(time.perf_counter() - t)
    finally:
        await assets.close()
        await images.close()
    return {
        "model upload": percentiles(up),
        "model listing": percentiles(listed),
        "series listing": percentiles(series),
    }


def server_run(url: str | None, data_dir: str, uploads: int, listings: int) -> dict[str, Any]:
    settings: dict[str, object] = {
        "auth_secret": SECRET,
        "data_dir": data_dir,
        "blob_dir": tempfile.mkdtemp(prefix="medverse-bench-blobs-"),
    }
    if url is not None:
        settings["database_url"] = url
    with run_server(**settings) as srv:
        out = tempfile.NamedTemporaryFile("r", suffix=".json", delete=False)
        proc = spawn(
            "benchmarks.media",
            "--load", srv.url, "--uploads", str(uploads), "--listings", str(listings),
            "--out", out.name,
        )  # fmt: skip
        proc.wait(timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"the load process failed ({proc.returncode})")
        return json.loads(Path(out.name).read_text())  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--uploads", type=int, default=40)
    parser.add_argument("--listings", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3, help="rounds (medians are shown)")
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.uploads <= 200 or not 1 <= args.listings <= 5000:
        parser.error("--uploads must be 1-200 and --listings 1-5000")
    if not 1 <= args.repeat <= 20:
        parser.error("--repeat must be 1-20")
    if args.load:  # the load process
        result = asyncio.run(load(args.load, args.uploads, args.listings))
        Path(args.out).write_text(json.dumps(result))
        return

    from tests.pgservice import running_postgres

    progress("starting a private PostgreSQL server (fsync on)")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in BACKENDS}
    with running_postgres(fsync=True) as pg:
        urls = {"sqlite": None, "postgresql": pg.create_database("bench")}
        progress("counting database round trips per store call")
        trips = round_trips(pg.create_database("trips"))
        # One data directory per backend for all rounds' servers (one audit signing key).
        dirs = {name: tempfile.mkdtemp(prefix=f"medverse-bench-{name}-") for name in BACKENDS}
        for r in range(args.repeat):
            for name in BACKENDS:
                progress(f"round {r + 1}/{args.repeat}, {name}: uploads and listings")
                runs[name].append(server_run(urls[name], dirs[name], args.uploads, args.listings))
    ops = ("model upload", "model listing", "series listing")
    median = {
        name: {
            op: {k: round(float(np.median([r[op][k] for r in rs])), 3) for k in rs[0][op]}
            for op in ops
        }
        for name, rs in runs.items()
    }
    results = {
        "uploads": args.uploads,
        "listings": args.listings,
        "repeat": args.repeat,
        "round_trips_postgresql": trips,
        "median": median,
        "runs": runs,
    }
    print()
    print(f"{'backend':<11} {'operation':<16} {'p50 ms':>8} {'p99 ms':>8} {'db round trips':>15}")
    for name in BACKENDS:
        for op in ops:
            x = median[name][op]
            n = "0 (file)" if name == "sqlite" else str(trips[op])
            print(f"{name:<11} {op:<16} {x['p50_ms']:>8.2f} {x['p99_ms']:>8.2f} {n:>15}")
    print("\nround trips per store call on PostgreSQL:")
    for op, n in trips.items():
        print(f"  {op:<26} {n}")
    print(
        f"\nmedians of {args.repeat} rounds: {args.uploads} uploads of distinct small models, "
        f"then {args.listings} listings of each kind, one request at a time"
    )
    save_results("media", results)


if __name__ == "__main__":
    try:
        main()
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"benchmarks.media: {exc}", file=sys.stderr)
        sys.exit(1)
