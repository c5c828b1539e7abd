"""Run a scenario inside a private network namespace, optionally with ``tc netem`` on its ``lo``.

A test hands :func:`run_in_netns` the name of an ``async`` function (``"tests.mod:scenario"``)
and its keyword arguments. A child Python process runs it under ``unshare -n``: a fresh
network namespace whose only interface is its own ``lo`` (brought up first, then given the
netem settings), so servers and clients the scenario starts as subprocesses inherit it and
never touch the machine's own loopback. The function returns a JSON-able value, which the test
gets back to assert on. Everything is bounded by ``timeout``.

Where the namespace cannot be made (not root, no ``unshare``, a sandbox that forbids it) or
the kernel has no netem, :func:`require` skips the test saying which. Kernels without netem
still get loss, delay and reordering in user space (``tests/impair.py``) or loss from
nftables inside the namespace (``tests/test_impairment.py``).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from typing import Any

import pytest

from benchmarks.harness import ROOT

#: The line before the scenario's result on the child's stdout.
_MARK = "@@netns-result@@"


@functools.cache
def unavailable(netem: str | None = None) -> str | None:
    """Why a namespace (with these netem settings) cannot be had here, or None."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    for tool in ("unshare", "ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probes = [("unshare -n", "ip link set lo up")]
    if netem:
        probes.append(
            (f"tc netem {netem}", f"ip link set lo up && tc qdisc add dev lo root netem {netem}")
        )
    for what, probe in probes:
        try:
            r = subprocess.run(
                ["unshare", "-n", "sh", "-c", probe], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{what} failed: {exc}"
        if r.returncode != 0:
            return f"{what} is not allowed here: {r.stderr.strip() or r.returncode}"
    return None


def require(netem: str | None = None) -> None:
    """Skip the calling test, with the reason, unless :func:`run_in_netns` can run here."""
    reason = unavailable(netem)
    if reason is not None:
        pytest.skip(reason)


def run_in_netns(
    target: str, *, netem: str | None = None, timeout: float = 120.0, **kwargs: Any
) -> Any:
    """Run ``await target(**kwargs)`` in a child process inside a new network namespace whose
    ``lo`` has ``netem`` (e.g. ``"loss 5% delay 30ms 10ms reorder 1%"``); return its result.
    AssertionError (with the child's output) if it fails or outlives ``timeout`` seconds."""
    require(netem)
    cmd = ["unshare", "-n", sys.executable, "-m", "tests.netns", target, json.dumps(kwargs)]
    env = {**os.environ, "MEDVERSE_NETNS_NETEM": netem or ""}
    # Its own process group: a scenario that overruns goes with the servers it started.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{target} ran over {timeout} s:\n{_text(stdout, stderr)}") from None
    out = stdout.rsplit(_MARK, 1)
    if proc.returncode != 0 or len(out) != 2:
        raise AssertionError(f"{target} failed ({proc.returncode}):\n{_text(stdout, stderr)}")
    return json.loads(out[1])


def _text(out: str | bytes | None, err: str | bytes | None) -> str:
    def s(x: str | bytes | None) -> str:
        return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")

    return f"{s(out)[-4000:]}\n--- stderr ---\n{s(err)[-4000:]}"


def _main(target: str, kwargs: str) -> None:
    """In the namespace: ``lo`` up, netem on it, then the scenario."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    netem = os.environ.get("MEDVERSE_NETNS_NETEM", "")
    if netem:
        subprocess.run(
            ["tc", "qdisc", "add", "dev", "lo", "root", "netem", *netem.split()], check=True
        )
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    result = asyncio.run(fn(**json.loads(kwargs)))
    print(_MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
