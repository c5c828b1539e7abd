"""A real headless Chromium for the tests, driven by Playwright for Python.

The browser is Debian's ``chromium`` (``/usr/bin/chromium``, installed by ``.ci/run``), never a
build Playwright downloads. Every launch gets a fresh temporary profile (Playwright makes one
per browser and removes it on close) and the flags in :data:`FLAGS`: no GPU, no background
traffic of its own (no QUIC, sync, component updates or first-run fetches), WebRTC allowed on
loopback with plain host candidates (no mDNS names), a fake microphone and camera that need
no permission prompt, and audio that plays without a click. Tests still point
it at 127.0.0.1 only.

How a test uses it:

* the ``browser`` fixture (async, one browser per test) is registered in ``tests/conftest.py``,
  so a test just names it as an argument: ``async def test_x(browser: Browser) -> None``;
* :func:`new_page` opens a page in a fresh context and starts collecting its console errors
  and uncaught exceptions at once; :func:`console_errors` returns that list, so a test ends
  with ``assert console_errors(page) == []``;
* :func:`screenshot` saves a PNG under ``tests/artifacts/`` (ignored by git; CI keeps it);
* :func:`launch` starts a browser outside the fixture (benchmarks, several browsers at once).

Where Chromium is missing the fixture skips the test, except under CI (``CI`` set), where
``.ci/run`` installs it and a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, Playwright, async_playwright

#: Debian's Chromium.
CHROMIUM = "/usr/bin/chromium"

#: Where :func:`screenshot` writes (``.gitignore`` keeps it out of the repository).
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

#: Flags of every launch: headless without a GPU, none of Chromium's own network traffic, WebRTC
#: between processes on loopback, a fake microphone and camera granted without a prompt.
FLAGS: tuple[str, ...] = (
    "--no-sandbox",  # root in a container: Chromium's sandbox needs user namespaces it lacks
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--allow-loopback-in-peer-connection",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    # Host candidates as plain addresses: hidden behind mDNS names, Chromium would announce
    # and resolve them by multicast on the machine's network.
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    # Media and WebAudio play without a click, as they would after the user's first one.
    "--autoplay-policy=no-user-gesture-required",
)

#: Seconds a launch may take: Chromium starts in about a second, far slower on a loaded machine.
LAUNCH_TIMEOUT = 60.0

_errors: weakref.WeakKeyDictionary[Page, list[str]] = weakref.WeakKeyDictionary()


def chromium_missing() -> str | None:
    """Why Chromium cannot be launched here, or None."""
    if not os.access(CHROMIUM, os.X_OK) and shutil.which("chromium") is None:
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    return None


async def launch(pw: Playwright, **kw: Any) -> Browser:
    """Launch headless Chromium with :data:`FLAGS` and a fresh temporary profile.

    ``args=[...]`` adds flags after :data:`FLAGS`; every other keyword goes to Playwright's
    ``chromium.launch`` (``headless=False`` under Xvfb, ``timeout`` in ms, ``env``...).
    """
    extra = list(kw.pop("args", ()))
    kw.setdefault("headless", True)
    kw.setdefault("timeout", LAUNCH_TIMEOUT * 1000)
    executable = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    return await pw.chromium.launch(executable_path=executable, args=[*FLAGS, *extra], **kw)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Chromium of its own for one test, closed afterwards."""
    missing = chromium_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    async with async_playwright() as pw:
        b = await launch(pw)
        try:
            yield b
        finally:
            await b.close()


def console_errors(page: Page) -> list[str]:
    """The page's console errors and uncaught exceptions so far, as text (a live list: it
    keeps growing). The first call on a page starts collecting; :func:`new_page` makes it."""
    errors = _errors.get(page)
    if errors is None:
        errors = _errors[page] = []

        def on_console(msg: ConsoleMessage) -> None:
            loc = msg.location
            # Chromium asks every origin for /favicon.ico by itself; a 404 there is no fault
            # of the page's.
            if msg.type == "error" and not str(loc.get("url", "")).endswith("/favicon.ico"):
                where = f" ({loc.get('url')}:{loc.get('lineNumber')})" if loc.get("url") else ""
                errors.append(f"console: {msg.text}{where}")

        page.on("console", on_console)
        page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    return errors


async def new_page(browser: Browser, **context: Any) -> Page:
    """A page in a fresh browser context (its own storage and permissions; ``context`` goes to
    ``browser.new_context``), collecting console errors from the start."""
    ctx = await browser.new_context(**context)
    page = await ctx.new_page()
    console_errors(page)
    return page


async def screenshot(page: Page, name: str) -> Path:
    """Save a PNG of the page's viewport as ``tests/artifacts/NAME.png`` and return its path
    (characters other than letters, digits, ``-``, ``_`` and ``.`` in ``name`` become ``_``)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).removesuffix(".png") or "page"
    path = ARTIFACTS / f"{safe}.png"
    await page.screenshot(path=str(path))
    return path
