"""Image series in a case review: upload and parse time, slice latency, viewer-state bytes, and
12 reviewers scrolling at once.

``python -m benchmarks.images`` starts a server (authentication off) on core 0 and, from this
process or a load process on core 1:

1. uploads a synthetic 512 x 512 x 300 CT (``benchmarks.dicomgen``: 300 single-frame files,
   157 MB, with 12 HU of noise, as one stored zip) and reports upload + parse + store time per
   slice, and the parse + store part alone (the same work in this process);
2. fetches images nobody fetched before (the first of each plane right after the upload, then
   more of each plane) and the same images again (cached), from one client, one at a time:
   wall time from request to the last byte;
3. measures the bytes of one viewer-state change: the request a client sends and the
   ``img_panel`` each member receives;
4. runs 12 reviewers (4 panels, 3 reviewers each, SDK sessions in a separate process on
   core 1), each scrolling its panel at 10 changes per second and fetching the image it
   scrolled to: the answer time of a change, the time until the other reviewers of the panel
   see it, image fetch times and the server's CPU. The reviewers are image-viewer clients that
   do not decode the avatars' tick state (``receive_state=False``): twelve state decoders in
   one Python process would measure the load generator, not the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil

from benchmarks.dicomgen import synthetic_ct
from benchmarks.harness import free_port, progress, save_results, spawn, start_server
from medverse.client_sdk import connect
from medverse.client_sdk.images import ImageClient, zip_files
from medverse.protocol.images import ImageAck, PanelState, SetImageView
from medverse.protocol.messages import encode_message
from medverse.server.imaging import prepare

ROOM = "case-review"
#: Noise of the synthetic CT (HU): a flat phantom would compress to nothing.
NOISE_HU = 12.0
REVIEWERS = 12
PANELS = 4


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    async with http.get(url) as r:
        body = await r.read()
        assert r.status == 200, (r.status, body[:200])
    return (time.perf_counter() - t0) * 1000.0, len(body)


async def single(url: str, rows: int, cols: int, slices: int) -> dict[str, Any]:
    """Phases 1-3, from this process."""
    progress(f"making a {cols} x {rows} x {slices} CT...")
    files = synthetic_ct(rows, cols, slices, noise=NOISE_HU)
    body = zip_files(files)
    # The server's own work, in this process on the same files: parse, gate, validate, build
    # the volume, write and hash it (the upload's time adds the HTTP transfer of the zip).
    t0 = time.perf_counter()
    staged = prepare(
        list(files.items()),
        allow_identifiable=False,
        deidentify_requested=False,
        uid_key=b"k" * 32,
        staging_dir=Path(tempfile.mkdtemp(prefix="medverse-bench-stage-")),
    ).staged
    parse_s = time.perf_counter() - t0
    staged.unlink()
    del files
    client = ImageClient(url, ROOM)
    progress(f"uploading {len(body) / 1e6:.0f} MB...")
    t0 = time.perf_counter()
    listing = await client.upload(body, "synthetic CT")
    upload_s = time.perf_counter() - t0
    await client.close()
    sha = listing.sha256
    base = url.replace("ws://", "http://") + f"/rooms/{ROOM}/series/{sha}"
    res: dict[str, Any] = {
        "series": {"rows": rows, "cols": cols, "slices": slices, "zip_bytes": len(body)},
        "upload_s": upload_s,
        "upload_ms_per_slice": upload_s * 1000.0 / slices,
        "parse_ms_per_slice": parse_s * 1000.0 / slices,
    }
    progress("first and cached images...")
    async with aiohttp.ClientSession() as http:
        counts = {"axial": slices, "coronal": rows, "sagittal": cols}
        first: dict[str, float] = {}
        for plane in ("axial", "coronal", "sagittal"):
            first[plane], _ = await fetch(http, f"{base}/{plane}/{counts[plane] // 2}.png")
        uncached: dict[str, list[float]] = {p: [] for p in counts}
        cached: dict[str, list[float]] = {p: [] for p in counts}
        sizes: list[int] = []
        for plane, n in counts.items():
            for i in range(20):
                index = (n // 2 + 7 * (i + 1)) % n
                ms, size = await fetch(http, f"{base}/{plane}/{index}.png?window=40,400")
                uncached[plane].append(ms)
                sizes.append(size)
                ms, _ = await fetch(http, f"{base}/{plane}/{index}.png?window=40,400")
                cached[plane].append(ms)
        res["first_image_ms"] = first
        res["uncached_ms"] = {
            p: {"p50": pct(v, 50), "p99": pct(v, 99)} for p, v in uncached.items()
        }
        res["cached_ms"] = {p: {"p50": pct(v, 50), "p99": pct(v, 99)} for p, v in cached.items()}
        res["png_bytes_mean"] = statistics.fmean(sizes)
    # Phase 3: the bytes of one change.
    received: list[int] = []
    async with connect(url, room=ROOM, name="measure", ping_interval=0) as s:
        await s.panels.wait_synced()
        panel = await s.open_panel(sha)
        s.add_handler(PanelState, lambda m: received.append(len(encode_message(m))))
        for k in range(10):
            await s.set_image_view(panel, slices=((slices // 3 + k) % slices, rows // 2, cols // 2))
        await s.panels.wait_version(panel, 10)
        request = len(
            encode_message(SetImageView(12345, panel, slices=(110, 256, 256)))
        )  # sizes as a 512 x 512 x 300 series has them
        window = len(encode_message(SetImageView(12346, panel, window=(40.0, 400.0))))
    res["change_bytes"] = {
        "request_slices": request,
        "request_window": window,
        "broadcast_per_member": statistics.fmean(received[-10:]),
        "ack": len(encode_message(ImageAck(12345, panel))),
    }
    res["sha256"] = sha
    return res


async def load(url: str, sha: str, seconds: float, rate: float) -> dict[str, Any]:
    """Phase 4 (run in the load process): 12 reviewers on 4 panels, each scrolling."""
    sessions = [
        connect(url, room=ROOM, name=f"reviewer-{i}", ping_interval=0, receive_state=False)
        for i in range(REVIEWERS)
    ]
    await asyncio.gather(*(s.start() for s in sessions))
    await asyncio.gather(*(s.panels.wait_synced() for s in sessions))
    panels = [await sessions[i * 3].open_panel(sha, (i * 1.0, 1.5, -1.0)) for i in range(PANELS)]
    planes = (await sessions[0].series(sha))["planes"]
    ns, nr, nc = (planes[p]["count"] for p in ("axial", "coronal", "sagittal"))
    sent: dict[tuple[int, tuple[int, int, int]], float] = {}
    seen: list[float] = []
    seen_keys: set[tuple[int, int, tuple[int, int, int]]] = set()

    def watcher(s: Any) -> Any:
        def on_state(m: PanelState) -> None:
            t = sent.get((m.panel_id, m.slices))
            key = (id(s), m.panel_id, m.slices)
            if t is not None and m.by != s.member_id and key not in seen_keys:
                seen_keys.add(key)
                seen.append((time.perf_counter() - t) * 1000.0)

        return on_state

    for s in sessions:
        s.add_handler(PanelState, watcher(s))
    acks: list[float] = []
    fetches: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    http = aiohttp.ClientSession()
    base = url.replace("ws://", "http://") + f"/rooms/{ROOM}/series/{sha}"

    async def reviewer(i: int) -> None:
        nonlocal errors
        s = sessions[i]
        panel = panels[i // 3]
        n = 0
        while time.perf_counter() < stop:
            n += 1
            # A unique state per change: the axial index scrolls, the others count.
            slices = ((n * 3 + i) % ns, (n + 37 * i) % nr, (n // nr + 11 * i) % nc)
            t0 = time.perf_counter()
            sent[(panel, slices)] = t0
            try:
                await s.set_image_view(panel, slices=slices)
            except Exception:
                errors += 1
                continue
            acks.append((time.perf_counter() - t0) * 1000.0)
            ms, _ = await fetch(http, f"{base}/axial/{slices[0]}.png?window=40,400")
            fetches.append(ms)
            await asyncio.sleep(max(0.0, 1.0 / rate - (time.perf_counter() - t0)))

    t_start = time.perf_counter()
    await asyncio.gather(*(reviewer(i) for i in range(REVIEWERS)))
    elapsed = time.perf_counter() - t_start
    await asyncio.sleep(0.3)
    await http.close()
    received = [s.bytes_received for s in sessions]
    await asyncio.gather(*(s.close() for s in sessions))
    return {
        "reviewers": REVIEWERS,
        "panels": PANELS,
        "seconds": elapsed,
        "changes": len(acks),
        "changes_per_s": len(acks) / elapsed,
        "errors": errors,
        "ack_ms": {"p50": pct(acks, 50), "p99": pct(acks, 99)},
        "seen_by_others_ms": {"p50": pct(seen, 50), "p99": pct(seen, 99), "n": len(seen)},
        "fetch_ms": {"p50": pct(fetches, 50), "p99": pct(fetches, 99)},
        "down_bytes_per_reviewer_per_s": statistics.fmean(received) / elapsed,
    }


async def first_after_restart(url: str, res: dict[str, Any]) -> float:
    base = url.replace("ws://", "http://") + f"/rooms/{ROOM}/series/{res['sha256']}"
    async with aiohttp.ClientSession() as http:
        ms, _ = await fetch(http, f"{base}/axial/{res['series']['slices'] // 2 + 1}.png")
    return ms


def report(res: dict[str, Any]) -> None:
    s = res["series"]
    print(
        f"series: {s['cols']} x {s['rows']} x {s['slices']} CT, zip {s['zip_bytes'] / 1e6:.0f} MB"
    )
    print()
    header = f"{'measure':<44} {'value':>10} {'target':>10}"
    print(header)
    print("-" * len(header))
    rows = [
        ("upload + parse + store, ms per slice", res["upload_ms_per_slice"], ""),
        ("  of which parse + validate + store (in-process)", res["parse_ms_per_slice"], ""),
        ("upload + parse + store, whole series s", res["upload_s"], ""),
        ("first axial image after upload, ms", res["first_image_ms"]["axial"], "<= 200"),
        ("first coronal image, ms", res["first_image_ms"]["coronal"], ""),
        ("first sagittal image, ms", res["first_image_ms"]["sagittal"], ""),
        ("first axial image after a restart, ms", res["first_image_after_restart_ms"], ""),
    ]
    for plane in ("axial", "coronal", "sagittal"):
        u, c = res["uncached_ms"][plane], res["cached_ms"][plane]
        rows.append(
            (f"{plane} uncached p50 / p99, ms", f"{u['p50']:.1f} / {u['p99']:.1f}", "<= 200")
        )
        rows.append((f"{plane} cached p50 / p99, ms", f"{c['p50']:.2f} / {c['p99']:.2f}", "<= 10"))
    rows.append(("PNG bytes (mean)", res["png_bytes_mean"], ""))
    b = res["change_bytes"]
    rows.append(("view change: request (slices), B", b["request_slices"], ""))
    rows.append(("view change: request (window), B", b["request_window"], ""))
    rows.append(("view change: img_ack to the sender, B", b["ack"], ""))
    rows.append(("view change: img_panel to each member, B", b["broadcast_per_member"], ""))
    load_ = res["load"]
    rows += [
        (f"{load_['reviewers']} reviewers: changes per second", load_["changes_per_s"], ""),
        (
            "  change answered p50 / p99, ms",
            f"{load_['ack_ms']['p50']:.1f} / {load_['ack_ms']['p99']:.1f}",
            "",
        ),
        (
            "  seen by the others p50 / p99, ms",
            f"{load_['seen_by_others_ms']['p50']:.1f} / {load_['seen_by_others_ms']['p99']:.1f}",
            "",
        ),
        (
            "  image fetch p50 / p99, ms",
            f"{load_['fetch_ms']['p50']:.1f} / {load_['fetch_ms']['p99']:.1f}",
            "",
        ),
        ("  down per reviewer, B/s (state + control)", load_["down_bytes_per_reviewer_per_s"], ""),
        ("  server CPU, % of a core", res["server_cpu_percent"], ""),
        ("  refused or failed changes", load_["errors"], ""),
    ]
    for name, value, target in rows:
        v = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{name:<44} {v:>10} {target:>10}")


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.images", description=__doc__)
    p.add_argument("--seconds", type=float, default=10.0, help="length of the scrolling phase")
    p.add_argument("--rate", type=float, default=10.0, help="changes per second per reviewer")
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512, help="rows and columns")
    p.add_argument("--load", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.load:
        url, sha = args.load
        print(json.dumps(asyncio.run(load(url, sha, args.seconds, args.rate))))
        return 0
    data = tempfile.mkdtemp(prefix="medverse-bench-images-")
    server = start_server(port=free_port(), cpu=0, data_dir=data, log_level="error")
    try:
        server.wait_ready()
        res = asyncio.run(single(server.url, args.size, args.size, args.slices))
        progress(f"{REVIEWERS} reviewers scrolling for {args.seconds:g} s...")
        proc = psutil.Process(server.pid)
        proc.cpu_percent()
        gen = spawn(
            *("benchmarks.images", "--load", server.url, res["sha256"]),
            *("--seconds", str(args.seconds), "--rate", str(args.rate)),
            cpu=1,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = gen.communicate()
        res["server_cpu_percent"] = proc.cpu_percent()
        if gen.returncode:
            raise subprocess.CalledProcessError(gen.returncode, gen.args, out, err)
        res["load"] = json.loads(out)
        # After a restart the first image of a series opens its file and checks it against
        # its SHA-256 first (157 MB read and hashed once per file version).
        progress("restart: the first image again...")
        server.stop()
        server = start_server(port=server.port, cpu=0, data_dir=data, log_level="error")
        server.wait_ready()
        res["first_image_after_restart_ms"] = asyncio.run(first_after_restart(server.url, res))
        res["run_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    finally:
        server.stop()
    report(res)
    save_results("images", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
