"""The ``medverse`` command: bad settings and inputs end in one clear line and exit code 2 (never
a traceback), boolean settings can be turned off by flag, and ``serve`` says where it is."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from medverse.server.cli import build_parser, serve_config

from .conftest import ROOT, ServerProcess, free_port, run_server

SECRET = "l" * 48


def medverse(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str]:
    """Run ``medverse ARGS`` with this interpreter; its exit code and stderr."""
    out = subprocess.run(
        [sys.executable, "-m", "medverse.server.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return out.returncode, out.stderr


@pytest.fixture(scope="module")
def auth_server() -> Iterator[ServerProcess]:
    with run_server(auth_secret=SECRET) as s:
        yield s


@pytest.fixture
def listening() -> Iterator[int]:
    """A port another process (this one) holds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_every_bad_input_is_one_line_and_exit_code_2(
    auth_server: ServerProcess, listening: int, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_text("-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n")
    unwritable = tmp_path / "read-only"
    unwritable.mkdir()
    unwritable.chmod(0o500)
    if os.access(unwritable, os.W_OK):  # root writes anywhere; sysfs refuses even root
        unwritable = Path("/sys")
    port = str(free_port())
    down = f"ws://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDVERSE_")}
    env.update(MEDVERSE_DATA_DIR=str(data), MEDVERSE_LOG_LEVEL="warning")
    serve = ("serve", "--port", port)
    cases: dict[str, tuple[tuple[str, ...], str]] = {
        "port in use": (("serve", "--port", str(listening)), f"port {listening} is in use"),
        "short secret": ((*serve, "--auth-secret", "short"), "at least 32 bytes"),
        "log level": ((*serve, "--log-level", "verbose"), "log_level 'verbose'"),
        "missing consent file": ((*serve, "--consent-file", "/no/such/consent.txt"), "no such"),
        "bad consent regex": ((*serve, "--consent-rooms", "ward-("), "regular expression"),
        "missing tls cert": (
            (*serve, "--tls-cert", "/no/cert.pem", "--tls-key", "/no/key.pem"),
            "tls_cert",
        ),
        "unreadable pem key": ((*serve, "--auth-public-key", str(bad_pem)), "auth_public_key"),
        "unreadable tls key": (
            (*serve, "--tls-cert", str(bad_pem), "--tls-key", str(bad_pem)),
            "tls_cert",
        ),
        "bad host": ((*serve, "--host", "0.0.0.0.0"), "0.0.0.0.0"),
        "data dir is a file": ((*serve, "--data-dir", str(a_file)), "not a folder"),
        "data dir unwritable": ((*serve, "--data-dir", str(unwritable)), "cannot write"),
        "blob dir is a file": ((*serve, "--blob-dir", str(a_file)), "blob_dir"),
        "blob dir unwritable": ((*serve, "--blob-dir", str(unwritable)), "cannot write"),
        "negative heartbeat": ((*serve, "--heartbeat", "-1"), "heartbeat"),
        "silence within heartbeat": ((*serve, "--silence-timeout", "1"), "silence_timeout"),
        "negative linger": ((*serve, "--room-linger", "-5"), "room_linger"),
        "zero frame size": ((*serve, "--max-frame-bytes", "0"), "max_frame_bytes"),
        "zero handshake": ((*serve, "--handshake-timeout", "0"), "handshake_timeout"),
        "not a list of cores": ((*serve, "--cpu-affinity", "first"), "cpu_affinity"),
        "a core that is not there": ((*serve, "--cpu-affinity", "4095"), "not available"),
        "nan setting": ((*serve, "--heartbeat", "nan"), "finite"),
        "not a number": ((*serve, "--port", "eighty"), "--port"),
        "verify missing folder": (
            ("audit", "verify", "--data-dir", str(tmp_path / "nowhere")),
            "no data directory",
        ),
        "ttl forever": (("token", "--room", "a", "--identity", "b", "--ttl", "forever"), "forever"),
        "ttl zero": (("token", "--room", "a", "--identity", "b", "--ttl", "0s"), "not positive"),
        "grant fly": (("token", "--room", "a", "--identity", "b", "--grants", "fly"), "grants"),
        "loadtest without secret": (
            ("loadtest", "--url", auth_server.url, "--clients", "2", "--seconds", "1"),
            "--secret",
        ),
        "loadtest no clients": (("loadtest", "--url", down, "--clients", "0"), "--clients"),
        "loadtest server down": (("loadtest", "--url", down, "--clients", "1"), "no server"),
    }
    token_env = dict(env, MEDVERSE_AUTH_SECRET=SECRET)
    with ThreadPoolExecutor(4) as pool:
        results = {
            name: pool.submit(medverse, *args, env=token_env if args[0] == "token" else env)
            for name, (args, _) in cases.items()
        }
        for name, (_, expect) in cases.items():
            code, err = results[name].result()
            lines = err.strip().splitlines()
            assert "Traceback" not in err, f"{name}: {err}"
            assert code == 2 and len(lines) == 1, f"{name}: exit {code}, stderr {err!r}"
            assert lines[0].startswith("medverse") and expect in lines[0], f"{name}: {lines[0]}"
    assert not (data / "auth_secret").exists()  # nothing failed half way through starting


def test_boolean_settings_turn_off_by_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    assert serve_config(parser.parse_args(["serve"])).audio_interaural_delay is True
    off = parser.parse_args(["serve", "--no-audio-interaural-delay"])
    assert serve_config(off).audio_interaural_delay is False
    monkeypatch.setenv("MEDVERSE_NO_AUTH", "1")  # the flag wins over the environment
    assert serve_config(parser.parse_args(["serve", "--auth"])).no_auth is False
    assert serve_config(parser.parse_args(["serve"])).no_auth is True


def test_serve_says_where_it_listens_and_keeps_its_data() -> None:
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="medverse-cwd-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDVERSE_")}
    env.update(MEDVERSE_NO_AUTH="1", MEDVERSE_LOG_LEVEL="warning", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "medverse.server.cli", "serve", "--port", str(port)],
        cwd=workdir,  # the default data directory is relative to the current folder
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = [proc.stdout.readline() for _ in range(6)]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    text = "".join(banner)
    base = f"http://127.0.0.1:{port}"
    assert f"{base} " in text and f"{base}/health" in text and f"{base}/metrics" in text, text
    assert f"ws://127.0.0.1:{port}/ws" in text
    assert f"web app  {base}/\n" in text
    assert str((workdir / "medverse-data").resolve()) in text
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_token_never_creates_a_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDVERSE_")}
    mint = ("token", "--room", "demo", "--identity", "dr-a", "--data-dir", str(tmp_path))
    code, err = medverse(*mint, env=env)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "MEDVERSE_AUTH_SECRET" in err and str(tmp_path / "auth_secret") in err, err
    assert not (tmp_path / "auth_secret").exists()
    code, err = medverse(*mint, "--admin", env=env)
    assert code == 2 and not (tmp_path / "auth_secret").exists(), err
    # The secret the server created is the one minting uses.
    (tmp_path / "auth_secret").write_text(SECRET + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "medverse.server.cli", *mint],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    from medverse.server.auth import TokenVerifier

    assert (
        TokenVerifier(secret=SECRET.encode()).verify(out.stdout.strip(), "demo").subject == "dr-a"
    )


def test_token_and_audit_read_only_what_they_need_from_the_environment(tmp_path: Path) -> None:
    # A server setting these commands do not use (here a TLS key nobody could read) does not
    # stop them; a short secret does stop minting, in one line.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDVERSE_")}
    env.update(MEDVERSE_TLS_CERT="/nowhere/cert.pem", MEDVERSE_TLS_KEY="/nowhere/key.pem")
    env.update(MEDVERSE_DATA_DIR=str(tmp_path), MEDVERSE_HEARTBEAT="-1")
    (tmp_path / "auth_secret").write_text(SECRET + "\n")
    code, err = medverse("token", "--room", "demo", "--identity", "dr-a", env=env)
    assert code == 0, err
    code, err = medverse("audit", "verify", env=env)
    assert code == 2 and "no audit log" in err and len(err.splitlines()) == 1, err
    code, err = medverse(
        "token", "--room", "demo", "--identity", "a", env=dict(env, MEDVERSE_AUTH_SECRET="short")
    )
    assert code == 2 and "32 bytes" in err and len(err.splitlines()) == 1, err


def test_loadtest_measures_a_server_with_its_secret(auth_server: ServerProcess) -> None:
    """A short load run against a real server: every headset joins (with tokens made from the
    secret), receives state at the tick rate through the shared RFC 6455 reader, counts its
    bytes and sees its poses reach the probes."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "load.json"
        args = ("loadtest", "--url", auth_server.url, "--clients", "4", "--probes", "2")
        args += ("--seconds", "2", "--warmup", "1", "--quiet", "--json", str(report))
        code, err = medverse(*args, env=dict(os.environ, MEDVERSE_AUTH_SECRET=SECRET))
        assert code == 0, err[-2000:]
        out = json.loads(report.read_text())
    assert out["connected"] == 4 and out["errors"] == 0 and out["failures"] == []
    assert out["state_frames_per_client_per_s_min"] > 5  # 30 Hz; a busy machine may lag
    assert out["down_bytes_per_client_per_s"] > 0
    assert out["latency_samples"] > 0


def test_workers_get_a_core_each_while_there_are_enough() -> None:
    from medverse.server.cli import worker_cores
    from medverse.server.config import parse_cpu_list

    assert parse_cpu_list("0-2, 5") == {0, 1, 2, 5}
    assert parse_cpu_list("") == frozenset()
    assert worker_cores("1,3", 2) == ["1", "3"]
    assert worker_cores("1,3", 3) == ["1,3"] * 3  # more workers than cores: they share them
    usable = sorted(os.sched_getaffinity(0))
    assert worker_cores("", len(usable)) == [str(c) for c in usable]
    assert worker_cores("", len(usable) + 1) == [""] * (len(usable) + 1)
