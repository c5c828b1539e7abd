"""Server capacity: one room of N headsets, and 1,000 headsets in rooms of 8.

    python -m benchmarks.capacity [--seconds 15] [--only 100]

The server (``medverse serve``, default settings) and the load generator (``medverse loadtest``)
run as separate processes pinned to separate cores. For each run the load generator connects
every headset, warms up, then measures for ``--seconds``; over that window we read the server's
CPU time (user + system, as % of one core), its tick work percentiles (``/health?ticks=N``), and
from the load generator the state frames and bytes every headset received and the pose-to-peer
latency (a sender's send time to a probe's receipt of that exact pose).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from .harness import ServerProcess, run_server, save_results, spawn

SCENARIOS: list[tuple[int, int]] = [(10, 0), (50, 0), (100, 0), (200, 0), (1000, 8)]
COLYSEUS_CPU = {10: 4.5, 50: 9.8, 100: 15.8, 200: 29.0}


def run_one(
    clients: int,
    room_size: int,
    seconds: float,
    extra: Callable[[ServerProcess], list[subprocess.Popen[bytes]]] | None = None,
) -> dict[str, Any]:
    """One measured run. ``extra(server)`` may start more processes (attackers) against the
    server before the load generator connects; they are stopped before the server."""
    # Real join tokens: the server checks one per headset, the load generator mints them.
    with run_server(
        cpu=0,
        auth_secret=secrets.token_urlsafe(48),
        max_connections_per_address=clients + 64,  # every headset is 127.0.0.1
    ) as server:
        extras = extra(server) if extra is not None else []
        try:
            return _measure(server, clients, room_size, seconds)
        finally:
            for p in extras:
                p.kill()
                p.wait()


def _measure(server: ServerProcess, clients: int, room_size: int, seconds: float) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp()) / "load.json"
    args = ["--url", server.url, "--room", "cap", "--clients", str(clients)]
    args += ["--seconds", str(seconds), "--warmup", "3", "--quiet", "--markers"]
    args += ["--json", str(out)]
    if room_size:
        args += ["--room-size", str(room_size)]
    load = spawn(
        "medverse.server.cli",
        "loadtest",
        *args,
        env=server.env,  # its MEDVERSE_AUTH_SECRET mints the headsets' tokens
        cpu=1,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    proc = psutil.Process(server.pid)
    lproc = psutil.Process(load.pid)
    start = None
    assert load.stderr is not None
    for line in load.stderr:
        if "window start" in line:
            c0 = proc.cpu_times()
            l0 = lproc.cpu_times()
            t0 = time.perf_counter()
            h0 = server.get_json("/health")
            start = True
        elif "window end" in line and start:
            c1 = proc.cpu_times()
            l1 = lproc.cpu_times()
            wall = time.perf_counter() - t0
            h1 = server.get_json(f"/health?ticks={int(wall * h0['tick_rate'])}")
            break
        else:
            sys.stderr.write(line)
    load.wait(120)
    if start is None:
        raise RuntimeError("load generator did not reach its measurement window")
    report = json.loads(out.read_text())
    cpu = (c1.user + c1.system - c0.user - c0.system) / wall * 100
    lcpu = (l1.user + l1.system - l0.user - l0.system) / wall * 100
    ticks = h1.get("tick_work_ms", {})
    return {
        "clients": clients,
        "room_size": room_size or clients,
        "rooms": report["rooms"],
        "server_cpu_percent": round(cpu, 1),
        "loadgen_cpu_percent": round(lcpu, 1),
        "tick_ms_p50": ticks.get("p50"),
        "tick_ms_p99": ticks.get("p99"),
        "tick_ms_max": ticks.get("max"),
        "tick_overruns": h1["tick_overruns"] - h0["tick_overruns"],
        "latency_ms_p50": report["latency_ms_p50"],
        "latency_ms_p99": report["latency_ms_p99"],
        "latency_samples": report["latency_samples"],
        "down_bytes_per_client_per_s": report["down_bytes_per_client_per_s"],
        "state_frames_per_client_per_s_min": report["state_frames_per_client_per_s_min"],
        "missed_ticks": report["missed_ticks"],
        "rate_held": bool(report["rate_held"] and h1["tick_overruns"] == h0["tick_overruns"]),
        "connected": report["connected"],
        "seconds": report["seconds"],
    }


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__)
    p.add_argument("--seconds", type=float, default=15.0, help="measurement window per run")
    p.add_argument("--only", type=int, action="append", help="run only these client counts")
    args = p.parse_args()
    runs = []
    for clients, room_size in SCENARIOS:
        if args.only and clients not in args.only:
            continue
        print(
            f"running {clients} headsets{f' in rooms of {room_size}' if room_size else ''}...",
            file=sys.stderr,
            flush=True,
        )
        runs.append(run_one(clients, room_size, args.seconds))
    header = (
        f"{'clients':>7} {'room':>5} {'server CPU %':>12} {'Colyseus %':>10} {'tick p50 ms':>11} "
        f"{'tick p99 ms':>11} {'down KB/s/cl':>12} {'lat p50 ms':>10} {'lat p99 ms':>10} "
        f"{'min fps':>7} {'rate held':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in runs:
        col = COLYSEUS_CPU.get(r["clients"]) if r["room_size"] == r["clients"] else None
        print(
            f"{r['clients']:>7} {r['room_size']:>5} {r['server_cpu_percent']:>12.1f} "
            f"{(f'{col:.1f}' if col else '-'):>10} "
            f"{r['tick_ms_p50']:>11.3f} {r['tick_ms_p99']:>11.3f} "
            f"{r['down_bytes_per_client_per_s'] / 1024:>12.2f} {r['latency_ms_p50']:>10.1f} "
            f"{r['latency_ms_p99']:>10.1f} {r['state_frames_per_client_per_s_min']:>7.1f} "
            f"{'yes' if r['rate_held'] else 'NO':>9}"
        )
    doc = {
        "benchmark": "capacity",
        "tick_rate": 30,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "method": (
            "server and load generator in separate processes pinned to separate cores; "
            "CPU = server user+system time over the measurement window / wall time"
        ),
        "runs": runs,
    }
    save_results("capacity", doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
