"""A real Prefect server and a headless Chromium for the browser tests.

The server runs as ``prefect server start`` in its own process group with its own
PREFECT_HOME, and is stopped at the end, also when a test or the start fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-output" / "browser"
# The network is closed: no first-run pages, updates, sync or QUIC probes.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SERVER_START_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(home: Path, api_url: str) -> dict[str, str]:
    """Environment for the server and for flows run against it: nothing from the user's Prefect."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,  # also the URL the UI calls
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the workers it spawned
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing; install Debian's Chromium (apt-get install -y chromium) to run the browser tests."
        )
    return CHROMIUM


# Module scope, not session: the server's services would keep taking CPU from the tests
# that run after the browser tests.
@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory, chromium_path):
    """Base URL of a fresh ``prefect server start`` on a free loopback port, and its environment."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = server_env(root / "home", f"{base}/api")
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"prefect server start exited with {process.returncode}:\n{_tail(log_path)}")
            try:
                if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"The Prefect server did not answer within {SERVER_START_TIMEOUT_S} s:\n{_tail(log_path)}")
            time.sleep(1)
        yield {"base": base, "env": env, "root": root}
    finally:
        _stop(process)


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def browser(chromium_path, tmp_path_factory):
    """A headless Chromium context with a fresh profile; pages get a 1400x1000 viewport.

    Module scope on purpose: while Playwright's sync API is open, an asyncio loop runs in
    this thread, and Prefect's sync calls (``State.result()``) then return coroutines.
    It must be closed before any other test module runs.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("The browser tests drive Chromium with Playwright: pip install playwright "
                    "(do not run `playwright install`; the system Chromium is used).")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(chromium_path), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
