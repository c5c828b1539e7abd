"""The web app's HTTP side (server/webapp.py) without a browser: a server whose app was not
built says so, and only the bundle's own file names are served."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from medverse.server.webapp import WebApp


async def client_for(root: Path) -> TestClient:
    app = web.Application()
    WebApp(root).routes(app)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


async def test_a_server_without_the_built_app_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = await client_for(tmp_path / "missing")
    try:
        with caplog.at_level(logging.WARNING, logger="medverse.server.webapp"):
            for path in ("/", "/join", "/"):
                r = await client.get(path)
                assert r.status == 404
                assert "not built" in await r.text()
        warnings = [r for r in caplog.records if "not built" in r.getMessage()]
        assert len(warnings) == 1  # said once, not per request
    finally:
        await client.close()


async def test_only_the_bundles_files_are_served(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><title>x</title>")
    (tmp_path / "app-ABCDEFGH.js").write_text("export {};")
    (tmp_path / "style-ABCDEFGH.css").write_text("body {}")
    (tmp_path / "secret.txt").write_text("no")
    client = await client_for(tmp_path)
    try:
        r = await client.get("/join?token=should-never-be-here")
        assert r.status == 200 and r.headers["Referrer-Policy"] == "no-referrer"
        r = await client.get("/app/app-ABCDEFGH.js")
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        r = await client.get("/app/style-ABCDEFGH.css")
        assert r.headers["Content-Type"] == "text/css; charset=utf-8"
        for bad in (
            "/app/secret.txt",
            "/app/index.html",
            "/app/..%2Fsecret.txt",
            "/app/app-abcdefgh.js",
            "/app/app-ABCDEFGH.js.map",  # no source maps are built
            "/app/" + "a" * 5000 + "-ABCDEFGH.js",
        ):
            r = await client.get(bad)
            assert r.status in (404, 414), bad
    finally:
        await client.close()
