"""The JavaScript SDK in real browser pages: N headsets' pages in one room.

    python -m benchmarks.browser [--pages 4 8 12] [--seconds 15]

It needs what the browser tests need: the ``test`` extra (Playwright for Python) and Debian's
``chromium``; it launches the browser as ``tests/browser.py`` does.

A server (``medverse serve``, pinned to core 0) and one headless Chromium (Debian's, driven by
Playwright, as ``tests/browser.py`` launches it) with N pages, each a member joined with its
own token through the SDK (``web/sdk`` as ES modules, served on 127.0.0.1 by this process with
``benchmarks/pages/avatars.html``). Each page sends a head and two hands at the tick rate and
draws every avatar each animation frame from ``client.sample()`` (interpolated), on a 2D
canvas: the SDK's work and a little drawing, not a 3D scene.

Measured over the window, per page, then summed up over the pages:

* decode: the window's state frames (N avatars, 3 poses each) decoded again in the page,
  20 times from the join's keyframe, once every page has stopped (so pages do not compete):
  microseconds per frame in a page's fastest round (the one the machine's other work
  interrupted least) and its median round, median over pages (target: well under 1 ms); and a
  keyframe of the window's last state (every avatar), decoded 1000 times;
  and the client's whole handling of each live frame (decode, history, avatars), p50/p99 (the
  browser's clock is coarse for one frame: read the replay for the decode itself);
* pose-to-frame and pose-to-screen latency: page 0 jumps its head 1 m every 600 ms; every
  other page notes when the jump arrives in a state frame and when it is first drawn (after
  the SDK's interpolation delay of three ticks, 100 ms at 30 Hz, by design). Epoch clocks
  are shared by the pages of one machine;
* page CPU: main-thread task time over the window (Chrome DevTools Protocol
  ``Performance.getMetrics`` ``TaskDuration``), % of one core, mean and max over pages;
* frames: animation frames per second and dropped ones (an interval longer than 1.5 frames
  counts the frames it skipped), mean and worst page.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web
from playwright.async_api import Page, async_playwright

from medverse.protocol.tokens import mint_token

from .harness import ROOT, free_port, progress, run_server, save_results

ROOM = "browser-bench"
MARK_EVERY_MS = 600
REPLAY_ROUNDS = 20
#: An animation frame interval above this many frame times counts the frames it skipped.
DROP_FACTOR = 1.5


async def serve_pages() -> tuple[web.AppRunner, str]:
    """``web/sdk`` and ``benchmarks/pages`` over HTTP on 127.0.0.1."""
    app = web.Application()
    app.router.add_static("/sdk/", ROOT / "web" / "sdk")
    app.router.add_static("/pages/", Path(__file__).resolve().parent / "pages")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def frame_stats(rafs: list[float]) -> tuple[float, int]:
    """Frames per second and frames dropped, from animation frame times (ms)."""
    if len(rafs) < 3:
        return 0.0, 0
    gaps = [b - a for a, b in itertools.pairwise(rafs)]
    period = statistics.median(gaps)
    dropped = sum(round(g / period) - 1 for g in gaps if g > DROP_FACTOR * period)
    return 1000.0 * (len(rafs) - 1) / (rafs[-1] - rafs[0]), dropped


def latencies(marks: list[list[float]], arrivals: list[list[float]]) -> tuple[list[float], ...]:
    """Pose-to-frame and pose-to-screen (ms) of each jump: an arrival is matched to the latest
    jump of the same side sent before it."""
    to_frame, to_screen = [], []
    for side, at_frame, at_screen in arrivals:
        sent = [t for s, t in marks if s == side and t <= at_frame]
        if sent and at_frame - sent[-1] < MARK_EVERY_MS:
            to_frame.append(at_frame - sent[-1])
            to_screen.append(at_screen - sent[-1])
    return to_frame, to_screen


async def task_seconds(cdp: Any) -> float:
    metrics = (await cdp.send("Performance.getMetrics"))["metrics"]
    return float(next(m["value"] for m in metrics if m["name"] == "TaskDuration"))


async def run(pages: int, seconds: float, warmup: float) -> dict[str, Any]:
    # tests/ is beside benchmarks/ in the repository (run from its root): the same launch.
    sys.path.insert(0, str(ROOT))
    from tests.browser import console_errors, launch, new_page

    secret = secrets.token_hex(32)
    with run_server(cpu=0, auth_secret=secret) as srv:
        runner, site = await serve_pages()
        try:
            async with async_playwright() as pw:
                browser = await launch(pw)
                try:
                    progress(f"opening {pages} pages")
                    tabs: list[Page] = []
                    ids = []
                    for i in range(pages):
                        page = await new_page(browser, viewport={"width": 480, "height": 360})
                        await page.goto(f"{site}/pages/avatars.html")
                        token = mint_token(
                            secret.encode(), room=ROOM, identity=f"p{i}", role="participant"
                        )
                        args = {
                            "url": srv.url,
                            "room": ROOM,
                            "token": token,
                            "index": i,
                            "count": pages,
                            "markEvery": MARK_EVERY_MS,
                        }
                        ids.append(await page.evaluate("(a) => window.start(a)", args))
                        tabs.append(page)
                    for page in tabs[1:]:
                        await page.evaluate("(id) => window.watch(id)", ids[0])
                    cdps = []
                    for page in tabs:
                        cdp = await page.context.new_cdp_session(page)
                        await cdp.send("Performance.enable")
                        cdps.append(cdp)
                    progress(f"warming up {warmup:.0f} s")
                    await asyncio.sleep(warmup)
                    for page in tabs:
                        await page.evaluate("() => window.reset()")
                    cpu0 = [await task_seconds(c) for c in cdps]
                    server = psutil.Process(srv.pid)
                    server.cpu_percent()
                    t0 = time.monotonic()
                    progress(f"measuring {seconds:.0f} s")
                    await asyncio.sleep(seconds)
                    wall = time.monotonic() - t0
                    server_cpu = server.cpu_percent()
                    cpu1 = [await task_seconds(c) for c in cdps]
                    results = [await p.evaluate("() => window.bench") for p in tabs]
                    for p in tabs:
                        await p.evaluate("() => window.halt()")
                    progress("replaying the window's frames")
                    replays = [
                        await p.evaluate("(r) => window.replay(r)", REPLAY_ROUNDS) for p in tabs
                    ]
                    errors = [e for p in tabs for e in console_errors(p)]
                finally:
                    await browser.close()
        finally:
            await runner.cleanup()

    marks = results[0]["marks"]
    to_frame: list[float] = []
    to_screen: list[float] = []
    for r in results[1:]:
        f, s = latencies(marks, r["arrivals"])
        to_frame += f
        to_screen += s
    handle = [h for r in results for h in r["handle"]]
    fps_drop = [frame_stats(r["rafs"]) for r in results]
    cpu = [100.0 * (b - a) / wall for a, b in zip(cpu0, cpu1, strict=True)]
    return {
        "pages": pages,
        "seconds": round(wall, 1),
        "avatars_in_frame": replays[0]["avatars"],
        "frame_bytes": round(replays[0]["bytes"], 1),
        # Per page, its fastest round (least interrupted by the machine's other work) and its
        # median round; then the median over pages.
        "decode_us_best": round(statistics.median(min(r["perRound"]) for r in replays), 2),
        "decode_us_median": round(
            statistics.median(statistics.median(r["perRound"]) for r in replays), 2
        ),
        "keyframe_bytes": replays[0]["keyBytes"],
        "keyframe_decode_us": round(statistics.median(r["keyUs"] for r in replays), 2),
        "replayed_frames": sum(r["frames"] for r in replays) * REPLAY_ROUNDS,
        "handle_ms_p50": round(pct(handle, 0.5), 3),
        "handle_ms_p99": round(pct(handle, 0.99), 3),
        "jumps_seen": len(to_frame),
        "pose_to_frame_ms_p50": round(pct(to_frame, 0.5), 1),
        "pose_to_frame_ms_p99": round(pct(to_frame, 0.99), 1),
        "pose_to_screen_ms_p50": round(pct(to_screen, 0.5), 1),
        "pose_to_screen_ms_p99": round(pct(to_screen, 0.99), 1),
        "page_cpu_pct_mean": round(statistics.mean(cpu), 1),
        "page_cpu_pct_max": round(max(cpu), 1),
        "server_cpu_pct": round(server_cpu, 1),
        "fps_mean": round(statistics.mean(f for f, _ in fps_drop), 1),
        "fps_min": round(min(f for f, _ in fps_drop), 1),
        "dropped_mean": round(statistics.mean(d for _, d in fps_drop), 1),
        "dropped_max": max(d for _, d in fps_drop),
        "console_errors": errors,
    }


COLUMNS = [
    ("pages", "pages", "{}"),
    ("avatars_in_frame", "avatars", "{}"),
    ("frame_bytes", "frame B", "{:.1f}"),
    ("decode_us_best", "decode us", "{:.1f}"),
    ("decode_us_median", "decode med us", "{:.1f}"),
    ("keyframe_decode_us", "key us", "{:.1f}"),
    ("handle_ms_p50", "handle p50 ms", "{:.3f}"),
    ("handle_ms_p99", "handle p99 ms", "{:.3f}"),
    ("pose_to_frame_ms_p50", "p2frame p50", "{:.1f}"),
    ("pose_to_frame_ms_p99", "p2frame p99", "{:.1f}"),
    ("pose_to_screen_ms_p50", "p2screen p50", "{:.1f}"),
    ("pose_to_screen_ms_p99", "p2screen p99", "{:.1f}"),
    ("page_cpu_pct_mean", "page CPU %", "{:.1f}"),
    ("page_cpu_pct_max", "max page CPU %", "{:.1f}"),
    ("server_cpu_pct", "server CPU %", "{:.1f}"),
    ("fps_mean", "fps", "{:.1f}"),
    ("fps_min", "fps min", "{:.1f}"),
    ("dropped_mean", "dropped", "{:.1f}"),
    ("dropped_max", "dropped max", "{}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    widths = [max(len(title), 7) for _, title, _ in COLUMNS]
    head = " ".join(t.rjust(w) for (_, t, _), w in zip(COLUMNS, widths, strict=True))
    lines = [head, "-" * len(head)]
    for row in rows:
        cells = [f.format(row[k]).rjust(w) for (k, _, f), w in zip(COLUMNS, widths, strict=True)]
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, nargs="+", default=[4, 8, 12], help="pages per run")
    ap.add_argument("--seconds", type=float, default=15.0, help="measurement window")
    ap.add_argument("--warmup", type=float, default=4.0, help="seconds before measuring")
    args = ap.parse_args()
    rows = []
    for n in args.pages:
        if n < 2:
            ap.error("--pages: at least 2 (one jumps, the others watch)")
        rows.append(asyncio.run(run(n, args.seconds, args.warmup)))
    print(table(rows))
    for row in rows:
        if row["console_errors"]:
            print(f"{row['pages']} pages: console errors: {row['console_errors'][:5]}")
    save_results(
        "browser",
        {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "browser": "Debian chromium, headless, Playwright",
            "runs": rows,
        },
    )


if __name__ == "__main__":
    main()
