"""A cluster on one machine: headsets in rooms of 8 at 30 Hz on 2 nodes against 1 node, join
latency through a redirect against a direct join, failover time after ``kill -9``, and Redis
round trips per join and per tick.

    python -m benchmarks.cluster [--clients 250 --clients 1000 ...] [--seconds 10]

Each headset count runs on 1 node and on 2 nodes. A node count *holds* a count when every
headset got >= 29.5 state frames a second and every node's tick p99 stayed <= 10 ms; the
headsets held by 2 nodes over those held by 1 node (the largest count each held) is the
scaling ratio at the same tick p99.

Every node is a ``medverse serve --redis-url`` process with a private ``redis-server``; the
load generator (``medverse loadtest``, lean WebSocket clients that follow redirects) runs in a
process of its own and enters every room through the first node, so on 2 nodes about half the
headsets are redirected. Node i keeps to core i (``cpu_affinity``), as ``medverse serve
--workers`` places its processes, so two nodes' ticks never wait for each other on one core
(``--no-pin-nodes``: the scheduler places them); the load generator is never pinned, and
``--loadgen-nice 19`` runs it at the lowest priority, as if the headsets were other machines
(a 2-core machine has no third core for it). Join latency is
measured with the Python SDK on an idle cluster (connect to welcome); failover is the time
from ``kill -9`` of a room's node until every member of the room has resumed as itself on the
other node (the lease time to live, ``--lease-ttl``, is most of it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import redis

from medverse.client_sdk import Reconnecting, Resumed, connect
from medverse.server.auth import mint_token
from tests.services import RedisServer, redis_server

from .harness import ServerProcess, progress, save_results, spawn, start_server


def start_nodes(
    r: RedisServer, n: int, secret: str, ttl: float, clients: int, pin: bool = False
) -> list[Any]:
    cores = sorted(os.sched_getaffinity(0))
    # With ``pin`` node i keeps to core i (its ``cpu_affinity``, as ``medverse serve
    # --workers`` places its processes); otherwise the scheduler moves them as it likes.
    pinned = [{"cpu_affinity": str(cores[i % len(cores)])} if pin else {} for i in range(n)]
    nodes = [
        start_server(
            cpu=None,
            redis_url=r.url,
            auth_secret=secret,
            cluster_lease_ttl=ttl,
            max_connections_per_address=clients + 64,
            resume_grace=15.0,
            # On a saturated machine the load generator's hellos can take seconds to come.
            handshake_timeout=30.0,
            **pinned[i],
        )
        for i in range(n)
    ]
    for node in nodes:
        node.wait_ready()
    time.sleep(ttl / 5 + 0.3)  # a heartbeat: every node knows the others
    return nodes


def stop_nodes(nodes: list[ServerProcess]) -> None:
    for node in nodes:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()


def redis_commands(r: RedisServer) -> int:
    client = redis.Redis.from_url(r.url)
    try:
        return int(client.info("stats")["total_commands_processed"])
    finally:
        client.close()


def load_run(
    r: RedisServer,
    n_nodes: int,
    clients: int,
    seconds: float,
    ttl: float,
    nice: int = 0,
    pin: bool = False,
) -> dict[str, Any]:
    secret = secrets.token_urlsafe(48)
    nodes = start_nodes(r, n_nodes, secret, ttl, clients, pin)
    try:
        out = Path(tempfile.mkdtemp()) / "load.json"
        args = ["--url", nodes[0].url, "--room", f"c{n_nodes}", "--clients", str(clients)]
        args += ["--room-size", "8", "--seconds", str(seconds), "--warmup", "3"]
        args += ["--quiet", "--markers", "--json", str(out)]
        cmd0 = redis_commands(r)
        load = spawn(
            "medverse.server.cli",
            "loadtest",
            *args,
            env=nodes[0].env,
            cpu=None,
            nice=nice,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        procs = [psutil.Process(n.pid) for n in nodes] + [psutil.Process(load.pid)]
        started = False
        last = ""
        assert load.stderr is not None
        for line in load.stderr:
            if "window start" in line:
                c0 = [p.cpu_times() for p in procs]
                cmd1 = redis_commands(r)
                t0 = time.perf_counter()
                h0 = [n.get_json("/health") for n in nodes]
                started = True
            elif "window end" in line and started:
                c1 = [p.cpu_times() for p in procs]
                cmd2 = redis_commands(r)
                wall = time.perf_counter() - t0
                h1 = [n.get_json(f"/health?ticks={int(wall * 30)}") for n in nodes]
                break
            else:
                sys.stderr.write(line)
                last = line.strip()
        load.wait(180)
        if not started:
            raise RuntimeError(f"the load generator stopped before measuring: {last}")
        report = json.loads(out.read_text())
        loadgen = c1[-1].user + c1[-1].system - c0[-1].user - c0[-1].system
        per_node = []
        for i in range(n_nodes):
            cpu = (c1[i].user + c1[i].system - c0[i].user - c0[i].system) / wall * 100
            ticks = h1[i].get("tick_work_ms", {})
            per_node.append(
                {
                    "members": h1[i]["members"],
                    "rooms": h1[i]["rooms"],
                    "cpu_percent": round(cpu, 1),
                    "tick_ms_p50": ticks.get("p50"),
                    "tick_ms_p99": ticks.get("p99"),
                    "tick_overruns": h1[i]["tick_overruns"] - h0[i]["tick_overruns"],
                    "redis": h1[i]["cluster"]["redis"],
                    "redis_background_round_trips_per_s": round(
                        (
                            h1[i]["cluster"]["redis"]["background_round_trips"]
                            - h0[i]["cluster"]["redis"]["background_round_trips"]
                        )
                        / wall,
                        2,
                    ),
                }
            )
        joins_asked = sum(n["redis"]["joins"] for n in per_node)
        join_rts = sum(n["redis"]["join_round_trips"] for n in per_node)
        ticks = wall * 30 * n_nodes
        return {
            "nodes": n_nodes,
            "clients": clients,
            "connected": report["connected"],
            "redirected": report["redirected"],
            "state_fps_median": report["state_frames_per_client_per_s_median"],
            "state_fps_min": report["state_frames_per_client_per_s_min"],
            "missed_ticks": report["missed_ticks"],
            "loadgen_cpu_percent": round(loadgen / wall * 100, 1),
            "latency_ms_p50": report["latency_ms_p50"],
            "latency_ms_p99": report["latency_ms_p99"],
            "join_ms_under_load": report["join_ms"],
            "per_node": per_node,
            "redis_round_trips_per_headset_join": round(join_rts / clients, 3),
            "redis_round_trips_per_join_that_asked": round(join_rts / max(1, joins_asked), 3),
            "redis_commands_during_joins": cmd1 - cmd0,
            "redis_commands_per_node_tick": round((cmd2 - cmd1) / ticks, 4),
            "window_seconds": round(wall, 2),
        }
    finally:
        stop_nodes(nodes)


async def _joins(a: ServerProcess, b: ServerProcess, secret: str, n: int) -> dict[str, Any]:
    """``n`` joins to a room straight to its node and ``n`` through the other node."""
    first = connect(a.url, "lat", token=mint_token(secret.encode(), room="lat", identity="x"))
    await first.start()
    home = a if first.url.startswith(a.url) else b
    other = b if home is a else a
    times: dict[str, list[float]] = {"direct": [], "redirect": []}
    try:
        for i in range(n):
            for label, node in (("direct", home), ("redirect", other)):
                tok = mint_token(secret.encode(), room="lat", identity=f"{label}-{i}")
                s = connect(node.url, "lat", token=tok, reconnect=False, ping_interval=0)
                t0 = time.perf_counter()
                await s.start()
                times[label].append(time.perf_counter() - t0)
                assert s.redirects == (label == "redirect"), (label, s.redirects)
                await s.close()
    finally:
        await first.close()
    out: dict[str, Any] = {"joins": n}
    for label, xs in times.items():
        ms = np.array(xs) * 1000
        out[f"{label}_p50_ms"] = round(float(np.percentile(ms, 50)), 2)
        out[f"{label}_p99_ms"] = round(float(np.percentile(ms, 99)), 2)
    return out


async def _failover(
    a: ServerProcess, b: ServerProcess, secret: str, members: int, room: str
) -> dict[str, Any]:
    sessions = [
        connect(
            a.url,
            room,
            token=mint_token(secret.encode(), room=room, identity=f"m{i}"),
            fallback_urls=[b.url],
            max_backoff=0.25,
            ping_interval=0,
        )
        for i in range(members)
    ]
    for s in sessions:
        await s.start()
    home = a if sessions[0].url.startswith(a.url) else b
    ids = [s.member_id for s in sessions]
    done: list[float] = []

    async def watch(s: Any) -> bool:
        async for ev in s.events():
            if isinstance(ev, Resumed):
                done.append(time.perf_counter())
                return ev.same_member
        return False

    watchers = [asyncio.create_task(watch(s)) for s in sessions]
    await asyncio.sleep(0.2)
    t0 = time.perf_counter()
    os.kill(home.pid, signal.SIGKILL)
    same = await asyncio.wait_for(asyncio.gather(*watchers), 30)
    result = {
        "members": members,
        "all_resumed_s": round(max(done) - t0, 3),
        "first_resumed_s": round(min(done) - t0, 3),
        "same_member_ids": all(same) and [s.member_id for s in sessions] == ids,
    }
    for s in sessions:
        await s.close()
    return result


async def _drain(
    a: ServerProcess, start_b: Any, secret: str, rooms: int, per_room: int
) -> dict[str, Any]:
    """``rooms`` rooms of ``per_room`` members on node ``a`` (alone), then a second node
    ``start_b()`` and SIGTERM to ``a``: the time until it has exited, and each member's gap
    (connection lost to resumed on the second node)."""
    sessions = []
    for i in range(rooms):
        for j in range(per_room):
            room = f"drain-{i}"
            tok = mint_token(secret.encode(), room=room, identity=f"m{j}")
            sessions.append(connect(a.url, room, token=tok, ping_interval=0))
    for s in sessions:
        await s.start()
    b = await asyncio.to_thread(start_b)
    lost: dict[int, float] = {}
    gaps: list[float] = []

    async def watch(k: int, s: Any) -> bool:
        async for ev in s.events():
            if isinstance(ev, Reconnecting) and k not in lost:
                lost[k] = time.perf_counter()
            elif isinstance(ev, Resumed):
                gaps.append(time.perf_counter() - lost.get(k, time.perf_counter()))
                return ev.same_member
        return False

    watchers = [asyncio.create_task(watch(k, s)) for k, s in enumerate(sessions)]
    await asyncio.sleep(0.3)
    t0 = time.perf_counter()
    os.kill(a.pid, signal.SIGTERM)
    same = await asyncio.wait_for(asyncio.gather(*watchers), 60)
    all_moved = time.perf_counter() - t0
    code = await asyncio.to_thread(a.proc.wait, 60)
    exited = time.perf_counter() - t0
    on_b = all(s.url.startswith(b.url) for s in sessions)
    for s in sessions:
        await s.close()
    gap_ms = np.array(gaps) * 1000
    return {
        "rooms": rooms,
        "members": len(sessions),
        "all_members_moved_s": round(all_moved, 3),
        "node_exited_s": round(exited, 3),
        "exit_code": code,
        "gap_ms_p50": round(float(np.percentile(gap_ms, 50)), 1),
        "gap_ms_max": round(float(gap_ms.max()), 1),
        "same_member_ids": all(same),
        "all_on_other_node": on_b,
    }


def drain_run(r: RedisServer, ttl: float, rooms: int) -> dict[str, Any]:
    secret = secrets.token_urlsafe(48)
    time.sleep(ttl + 0.2)  # the entries of nodes killed before have expired
    (a,) = start_nodes(r, 1, secret, ttl, 256)  # alone: every room is placed on it
    started: list[ServerProcess] = [a]

    def start_b() -> ServerProcess:
        started.extend(start_nodes(r, 1, secret, ttl, 256))
        return started[-1]

    try:
        return asyncio.run(_drain(a, start_b, secret, rooms, 2))
    finally:
        stop_nodes(started)


async def _pg_transactions(url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        # The statistics of other sessions are read as of the last report: ask for a fresh one.
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(
            await conn.fetchval(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                "WHERE datname = current_database()"
            )
        )
    finally:
        await conn.close()


async def _pg_joins(a: ServerProcess, secret: str, url: str, n: int) -> dict[str, Any]:
    """PostgreSQL transactions per join (a room with 8 members joining and leaving) and per
    node tick while 8 members sit in a room; each count includes the query that reads it."""
    await asyncio.sleep(1.5)  # pg_stat counters are reported at most every 0.5 s or so
    t0 = await _pg_transactions(url)
    sessions = []
    for i in range(n):
        tok = mint_token(secret.encode(), room="pg", identity=f"p{i}")
        s = connect(a.url, "pg", token=tok, ping_interval=0)
        await s.start()
        sessions.append(s)
    await asyncio.sleep(1.5)
    t1 = await _pg_transactions(url)
    idle = 5.0
    await asyncio.sleep(idle)
    t2 = await _pg_transactions(url)
    for s in sessions:
        await s.close()
    return {
        "joins": n,
        "transactions_per_join": round((t1 - t0 - 1) / n, 2),
        "transactions_per_s_with_members_idle": round((t2 - t1 - 1) / idle, 2),
        "transactions_per_node_tick": round((t2 - t1 - 1) / (idle * 30), 3),
    }


def pg_round_trips(r: RedisServer, ttl: float) -> dict[str, Any] | None:
    """Transactions a node makes on a shared PostgreSQL per join and per tick (None when
    PostgreSQL is not installed)."""
    from tests.pgservice import bin_dir, running_postgres

    if bin_dir() is None:
        return None
    with running_postgres() as pg:
        url = pg.create_database("bench")
        secret = secrets.token_urlsafe(48)
        time.sleep(ttl + 0.2)  # the entries of nodes killed before have expired
        node = start_server(
            cpu=None,
            redis_url=r.url,
            auth_secret=secret,
            cluster_lease_ttl=ttl,
            database_url=url,
        )
        try:
            node.wait_ready()
            return asyncio.run(_pg_joins(node, secret, url, 8))
        finally:
            stop_nodes([node])


def latency_and_failover(r: RedisServer, ttl: float, joins: int, failovers: int) -> dict[str, Any]:
    secret = secrets.token_urlsafe(48)
    nodes = start_nodes(r, 2, secret, ttl, 64)
    try:
        lat = asyncio.run(_joins(nodes[0], nodes[1], secret, joins))
    finally:
        stop_nodes(nodes)
    trials = []
    for i in range(failovers):
        # A fresh pair and room each time, once the killed nodes' entries have expired (a
        # new node cannot tell a node killed a moment before it started from a live one).
        time.sleep(ttl + 0.2)
        nodes = start_nodes(r, 2, secret, ttl, 64)
        try:
            trials.append(asyncio.run(_failover(nodes[0], nodes[1], secret, 8, f"fo-{i}")))
        finally:
            stop_nodes(nodes)
    fo = {
        "members": trials[0]["members"],
        "trials": trials,
        "first_resumed_s": round(float(np.median([t["first_resumed_s"] for t in trials])), 3),
        "all_resumed_s": round(float(np.median([t["all_resumed_s"] for t in trials])), 3),
        "first_resumed_s_max": max(t["first_resumed_s"] for t in trials),
        "all_resumed_s_max": max(t["all_resumed_s"] for t in trials),
        "same_member_ids": all(t["same_member_ids"] for t in trials),
    }
    progress("drain of a node with 20 rooms")
    drain = drain_run(r, ttl, 20)
    progress("PostgreSQL transactions per join and per tick")
    pg = pg_round_trips(r, ttl)
    return {
        "join_latency": lat,
        "failover": fo,
        "drain": drain,
        "postgresql": pg,
        "lease_ttl_s": ttl,
    }


#: What "held" means for a run: every headset at 30 Hz and every node's tick p99 in budget.
HELD_FPS_MIN = 29.5
HELD_TICK_P99_MS = 10.0


def held(run: dict[str, Any]) -> bool:
    """Whether a load run held 30 Hz with every node's tick p99 <= 10 ms."""
    if "failed" in run or run["connected"] < run["clients"]:
        return False
    return run["state_fps_min"] >= HELD_FPS_MIN and all(
        (n["tick_ms_p99"] or 0.0) <= HELD_TICK_P99_MS for n in run["per_node"]
    )


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__)
    p.add_argument(
        "--clients",
        type=int,
        action="append",
        help="headsets, repeatable (default 250, 500, 750, 1000, 1250)",
    )
    p.add_argument("--seconds", type=float, default=10.0, help="measurement window per run")
    p.add_argument("--lease-ttl", type=float, default=2.0, help="cluster_lease_ttl of the nodes")
    p.add_argument("--joins", type=int, default=40, help="joins per kind for join latency")
    p.add_argument("--failovers", type=int, default=5, help="kill -9 trials (median reported)")
    p.add_argument(
        "--loadgen-nice",
        type=int,
        default=0,
        help="CPU priority of the load generator (10-19: the nodes run first, as if the "
        "headsets were on other machines)",
    )
    p.add_argument(
        "--pin-nodes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep node i on core i, as `medverse serve --workers` does (default); "
        "--no-pin-nodes lets the scheduler move them (the load generator is never pinned)",
    )
    p.add_argument(
        "--no-load", action="store_true", help="only join latency and failover (no load runs)"
    )
    args = p.parse_args()
    counts = [] if args.no_load else args.clients or [250, 500, 750, 1000, 1250]
    runs = []
    with redis_server() as r:
        for clients in counts:
            for n_nodes in (1, 2):
                progress(f"{clients} headsets in rooms of 8 on {n_nodes} node(s)")
                try:
                    runs.append(
                        load_run(
                            r,
                            n_nodes,
                            clients,
                            args.seconds,
                            args.lease_ttl,
                            args.loadgen_nice,
                            args.pin_nodes,
                        )
                    )
                except (RuntimeError, OSError, ValueError) as exc:
                    # Reported as it is: a run this machine could not hold.
                    runs.append({"nodes": n_nodes, "clients": clients, "failed": str(exc)})
        progress("join latency and failover")
        extra = latency_and_failover(r, args.lease_ttl, args.joins, args.failovers)
    header = (
        f"{'headsets':>8} {'nodes':>5} {'connected':>9} {'redirected':>10} {'fps med':>7} "
        f"{'fps min':>7} {'tick p99 ms per node':>22} {'CPU % per node':>16} {'load CPU %':>10} "
        f"{'lat p99 ms':>10} "
        f"{'RT/join':>7} {'bg RT/s/node':>12} {'cmds/tick':>9} {'leases lost':>11} {'held':>4}"
    )
    print(header)
    print("-" * len(header))
    for run in runs:
        if "failed" in run:
            print(f"{run['clients']:>8} {run['nodes']:>5}  FAILED: {run['failed']}")
            continue
        nodes = run["per_node"]
        tick = " / ".join(f"{n['tick_ms_p99']:.2f}" for n in nodes)
        cpu = " / ".join(f"{n['cpu_percent']:.0f}" for n in nodes)
        print(
            f"{run['clients']:>8} {run['nodes']:>5} {run['connected']:>9} {run['redirected']:>10} "
            f"{run['state_fps_median']:>7.1f} {run['state_fps_min']:>7.1f} {tick:>22} {cpu:>16} "
            f"{run['loadgen_cpu_percent']:>10.0f} "
            f"{run['latency_ms_p99'] or float('nan'):>10.1f} "
            f"{run['redis_round_trips_per_headset_join']:>7.3f} "
            f"{max(n['redis_background_round_trips_per_s'] for n in nodes):>12.2f} "
            f"{run['redis_commands_per_node_tick']:>9.4f} "
            f"{sum(n['redis']['leases_lost'] for n in nodes):>11} "
            f"{'yes' if held(run) else 'no':>4}"
        )
    most = {
        n: max((r["clients"] for r in runs if r["nodes"] == n and held(r)), default=0)
        for n in (1, 2)
    }
    if counts:
        ratio = most[2] / most[1] if most[1] else float("nan")
        print(
            f"headsets held at 30 Hz with tick p99 <= {HELD_TICK_P99_MS:.0f} ms: 1 node "
            f"{most[1]}, 2 nodes {most[2]} (2 nodes / 1 node: {ratio:.2f})"
        )
    ratios = {}
    for clients in counts:
        one = next(x for x in runs if x["clients"] == clients and x["nodes"] == 1)
        two = next(x for x in runs if x["clients"] == clients and x["nodes"] == 2)
        if "failed" in one or "failed" in two:
            continue
        ratios[clients] = {
            "fps_median_2_over_1": round(two["state_fps_median"] / one["state_fps_median"], 3),
            "fps_min_2_over_1": round(two["state_fps_min"] / max(0.001, one["state_fps_min"]), 3),
            "max_node_cpu_2_over_1": round(
                max(n["cpu_percent"] for n in two["per_node"])
                / max(0.1, one["per_node"][0]["cpu_percent"]),
                3,
            ),
        }
        print(
            f"{clients} headsets, 2 nodes / 1 node: state fps median "
            f"{ratios[clients]['fps_median_2_over_1']:.3f}, min "
            f"{ratios[clients]['fps_min_2_over_1']:.3f}, busiest node's CPU "
            f"{ratios[clients]['max_node_cpu_2_over_1']:.3f}"
        )
    lat, fo = extra["join_latency"], extra["failover"]
    print(
        f"join latency ({lat['joins']} each, idle cluster): direct p50 {lat['direct_p50_ms']:.1f} "
        f"ms p99 {lat['direct_p99_ms']:.1f} ms; via redirect p50 {lat['redirect_p50_ms']:.1f} "
        f"ms p99 {lat['redirect_p99_ms']:.1f} ms"
    )
    print(
        f"failover after kill -9 (lease TTL {extra['lease_ttl_s']:.1f} s, {fo['members']} "
        f"members, median of {len(fo['trials'])}): room serving again (first member resumed) "
        f"{fo['first_resumed_s']:.2f} s (max {fo['first_resumed_s_max']:.2f}), all members "
        f"{fo['all_resumed_s']:.2f} s (max {fo['all_resumed_s_max']:.2f}), same member ids: "
        f"{'yes' if fo['same_member_ids'] else 'NO'}"
    )
    dr = extra["drain"]
    print(
        f"drain (SIGTERM) of a node with {dr['rooms']} rooms, {dr['members']} members: all "
        f"resumed on the other node in {dr['all_members_moved_s']:.2f} s, node exited "
        f"(code {dr['exit_code']}) after {dr['node_exited_s']:.2f} s; each member's gap p50 "
        f"{dr['gap_ms_p50']:.0f} ms, max {dr['gap_ms_max']:.0f} ms; same member ids: "
        f"{'yes' if dr['same_member_ids'] else 'NO'}"
    )
    pg = extra["postgresql"]
    if pg is not None:
        print(
            f"PostgreSQL (one node, a room of {pg['joins']}): {pg['transactions_per_join']:.2f} "
            f"transactions per join; with the members idle "
            f"{pg['transactions_per_s_with_members_idle']:.2f} a second "
            f"({pg['transactions_per_node_tick']:.3f} per tick, none on the tick path)"
        )
    save_results(
        "cluster" if counts else "cluster-failover",
        {
            "benchmark": "cluster",
            "tick_rate": 30,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "runs": runs,
            "ratios_2_over_1": ratios,
            "held_criterion": {"fps_min": HELD_FPS_MIN, "tick_p99_ms": HELD_TICK_P99_MS},
            "loadgen_nice": args.loadgen_nice,
            "pin_nodes": args.pin_nodes,
            "headsets_held": {"1": most[1], "2": most[2]},
            **extra,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
