"""The browser harness itself: Chromium starts, reaches a server on 127.0.0.1, reports what
goes wrong in a page and saves screenshots."""

from __future__ import annotations

import json

from playwright.async_api import Browser

from tests.browser import console_errors, new_page, screenshot
from tests.conftest import ServerProcess


async def test_page_reads_health_and_is_screenshotted(
    browser: Browser, server: ServerProcess
) -> None:
    page = await new_page(browser)
    response = await page.goto(server.http + "/health")
    assert response is not None and response.status == 200
    body = json.loads(await page.inner_text("body"))
    assert body["status"] == "ok"
    path = await screenshot(page, "health")
    png = path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 100
    assert console_errors(page) == []


async def test_console_errors_and_uncaught_exceptions_are_collected(browser: Browser) -> None:
    page = await new_page(browser)
    await page.set_content(
        "<script>console.error('bad thing'); setTimeout(() => { throw new Error('boom') });"
        "</script>"
    )
    await page.wait_for_function("true")
    await page.wait_for_timeout(100)
    errors = console_errors(page)
    assert any("bad thing" in e for e in errors), errors
    assert any("boom" in e for e in errors), errors


async def test_fake_microphone_is_granted_without_prompt(
    browser: Browser, server: ServerProcess
) -> None:
    page = await new_page(browser)
    await page.goto(server.http + "/health")  # 127.0.0.1 is a secure context: media allowed
    kinds = await page.evaluate(
        """async () => {
            const s = await navigator.mediaDevices.getUserMedia({audio: true});
            const k = s.getTracks().map(t => t.kind);
            s.getTracks().forEach(t => t.stop());
            return k;
        }"""
    )
    assert kinds == ["audio"]
    assert console_errors(page) == []
