"""Good members under attack: update rate and tick time while hostile clients flood.

    python -m benchmarks.hostile [--seconds 10] [--clients 50]

Each run starts a server (default settings, real join tokens), a load generator with ``clients``
good headsets in one room at 30 Hz, and 0, 1 or 4 attacker processes. Every attacker joins the
same room with a valid token, then floods as fast as it can with a rotating mix of hostile
frames (random bytes, truncated and oversized frames, NaN and absurd poses, bad and deeply
nested msgpack, unknown types, text frames, ping floods and pose floods), reconnecting whenever
the server closes it. We compare good members' state frames per second and the server's tick
work p99 against the run without attackers. Target: >= 95 % of the update rate, tick p99 grows
by <= 2 ms.

The machine has two cores: the server gets one, the load generator and the attackers share the
other. Attackers run at the lowest CPU priority (nice 19): real attackers are on other machines
and take no CPU from the members' headsets, so here they may use all the CPU the load
generator leaves, but must not starve it (which would count against the server's update rate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable

import aiohttp

from medverse.protocol.messages import PROTOCOL_VERSION, Hello, Ping, encode_message, encode_pose

from .capacity import run_one
from .harness import ServerProcess, save_results, spawn

ROOM = "cap"


def _hostile_frames(rng: random.Random) -> list[bytes]:
    nested = b"\x01" + b"\x91" * 2000 + b"\xc0"
    return [
        rng.randbytes(rng.randint(1, 200)),
        b"\x03" + rng.randbytes(40),
        encode_pose(rng.randint(1, 1 << 30), [((math.nan, 0, 0), (0, 0, 0, 1)), None, None]),
        encode_pose(rng.randint(1, 1 << 30), [((0, 1e12, 0), (0, 0, 0, 1)), None, None]),
        encode_pose(rng.randint(1, 1 << 30), [((0, 1, 0), (0, 0, 0, 1))] * 5),
        b"\x01\xc1\xc1\xc1",
        nested,
        b"\x01\x81\xa1t\xa4nope",
        b"\x01" + bytes(8000),
        encode_message(Ping(1, 1.0)),
        encode_pose(rng.randint(1, 1 << 30), [((0, 1.6, 0), (0, 0, 0, 1)), None, None]),
    ]


async def attack(url: str, token: str, seconds: float, seed: int) -> dict[str, int]:
    """Flood the server until ``seconds`` pass; reconnect whenever it closes us."""
    rng = random.Random(seed)
    stats = {"sent": 0, "connections": 0, "closed_by_server": 0}
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.ws_connect(url + "/ws", max_msg_size=0) as ws:
                    stats["connections"] += 1
                    await ws.send_bytes(
                        encode_message(Hello(PROTOCOL_VERSION, ROOM, "attacker", 3, None, token))
                    )
                    frames = _hostile_frames(rng)
                    while time.monotonic() < deadline and not ws.closed:
                        f = rng.choice(frames)
                        if rng.random() < 0.02:
                            await ws.send_str("text frames are refused")
                        else:
                            await ws.send_bytes(f)
                        stats["sent"] += 1
                        if stats["sent"] % 64 == 0:
                            await asyncio.sleep(0)  # let the reader drain replies
                    stats["closed_by_server"] += ws.closed
            except (aiohttp.ClientError, ConnectionError, OSError):
                await asyncio.sleep(0.05)
    return stats


def _attackers(n: int, seconds: float) -> Callable[[ServerProcess], list[subprocess.Popen]]:
    def start(server: ServerProcess) -> list[subprocess.Popen]:
        procs = [
            spawn(
                *("benchmarks.hostile", "--attacker", server.url),
                *("--seconds", str(seconds), "--seed", str(i)),
                env=server.env,  # its MEDVERSE_AUTH_SECRET mints the attackers' tokens
                cpu=1,  # share the load generator's core, not the server's
                nice=19,
                stdout=subprocess.DEVNULL,
            )
            for i in range(n)
        ]
        time.sleep(1.0)  # the flood is on before the good members join
        return procs

    return start


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hostile", description=__doc__)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--attacker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.attacker:
        from medverse.protocol.tokens import mint_token

        token = mint_token(
            os.environ["MEDVERSE_AUTH_SECRET"].encode(), room=ROOM, identity=f"attacker-{args.seed}"
        )
        stats = asyncio.run(attack(args.attacker, token, args.seconds, args.seed))
        print(json.dumps(stats))
        return 0
    runs = []
    for n in (0, 1, 4):
        print(f"running {args.clients} good members with {n} attacker(s)...", file=sys.stderr)
        run = run_one(
            args.clients, 0, args.seconds, _attackers(n, args.seconds + 60) if n else None
        )
        run["attackers"] = n
        runs.append(run)
    base = runs[0]
    header = (
        f"{'attackers':>9} {'good fps min':>12} {'rate vs base':>12} {'tick p50 ms':>11} "
        f"{'tick p99 ms':>11} {'p99 growth ms':>13} {'server CPU %':>12} {'lat p99 ms':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in runs:
        r["rate_ratio"] = round(
            r["state_frames_per_client_per_s_min"] / base["state_frames_per_client_per_s_min"], 4
        )
        r["tick_p99_growth_ms"] = round(r["tick_ms_p99"] - base["tick_ms_p99"], 3)
        print(
            f"{r['attackers']:>9} {r['state_frames_per_client_per_s_min']:>12.2f} "
            f"{r['rate_ratio'] * 100:>11.1f}% {r['tick_ms_p50']:>11.3f} {r['tick_ms_p99']:>11.3f} "
            f"{r['tick_p99_growth_ms']:>13.3f} {r['server_cpu_percent']:>12.1f} "
            f"{r['latency_ms_p99']:>10.1f}"
        )
    save_results("hostile", {"benchmark": "hostile", "good_clients": args.clients, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
