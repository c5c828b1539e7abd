"""Build step of the wheel (and of editable installs): the clinic web app.

Everything else is declared in pyproject.toml. Before setuptools collects the package data,
``npm ci`` and ``npm run build`` in ``web/`` bundle the app (three.js included) into
``server/webapp/``, which installs as ``medverse.server.webapp`` data and which ``medverse
serve`` serves at ``/``. Node >= 20 and npm must be on the PATH; ``MEDVERSE_SKIP_WEB_BUILD=1``
skips the step (the server then answers ``/`` with 404 and says why in its log).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
WEB = ROOT / "web"


def build_web_app() -> None:
    """``npm ci`` (when node_modules is missing or older than the lock file) and ``npm run
    build`` in web/; SystemExit with a clear message when npm is missing or fails."""
    if os.environ.get("MEDVERSE_SKIP_WEB_BUILD") == "1":
        print("MEDVERSE_SKIP_WEB_BUILD=1: the web app is not built")
        return
    if not (WEB / "package.json").exists():  # an sdist without web/: nothing to build
        return
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit(
            "medverse: building the web app needs Node.js >= 20 and npm on the PATH "
            "(https://nodejs.org or your package manager, e.g. `apt-get install nodejs npm`); "
            "or set MEDVERSE_SKIP_WEB_BUILD=1 to install without the web app"
        )
    modules = WEB / "node_modules"
    lock = WEB / "package-lock.json"
    stamp = modules / ".package-lock.json"  # written by npm on every install
    steps: list[list[str]] = []
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        steps.append([npm, "ci", "--no-audit", "--no-fund"])
    steps.append([npm, "run", "build"])
    for step in steps:
        print("medverse: running", " ".join(step[1:]), "in", WEB)
        try:
            subprocess.run(step, cwd=WEB, check=True)
        except subprocess.CalledProcessError as exc:
            raise SystemExit(
                f"medverse: `npm {' '.join(step[1:])}` in {WEB} failed (exit {exc.returncode}); "
                "see its output above"
            ) from None


class BuildWebApp(Command):
    """``python setup.py build_web``: bundle the web app into server/webapp/."""

    description = "bundle the clinic web app (npm ci && npm run build in web/)"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        build_web_app()


class BuildPyWithWebApp(build_py):
    """build_py that bundles the web app first, so its files are package data of
    medverse.server (wheels and editable installs alike)."""

    def run(self) -> None:
        self.run_command("build_web")
        super().run()


setup(cmdclass={"build_web": BuildWebApp, "build_py": BuildPyWithWebApp})
