"""Fixtures of the browser suite: a private JupyterLab server and headless Chromium driven by Playwright.

The server runs on 127.0.0.1 with a random port and token, in its own temporary Jupyter config, data and runtime
folders, so nothing the user has configured (or a previous run left behind) changes what the page shows; it makes
no network calls (no news, no update check, a read-only extension manager). The kernel is the venv's `python3`.
When a test fails, the server log is attached to its report."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_START_TIMEOUT = 120
HERE = Path(__file__).parent
OUTPUT = HERE.parent / "output" / "browser"

INSTALL_HINT = ("run `make test`, which installs them (apt-get install -y chromium; the playwright Python package "
                "comes with the dev requirements); Playwright's own browser downloads are not used")


def require_browser_tools():
    "Fail (never skip) when Chromium or Playwright is missing: a skipped browser suite would hide broken UI."
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"the browser suite needs Chromium at {CHROMIUM}, which is missing: {INSTALL_HINT}", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        pytest.fail(f"the browser suite needs the playwright Python package ({e}): {INSTALL_HINT}", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))


class LabServer:
    "A JupyterLab server in a subprocess, serving `root_dir`; `stop()` ends it and its kernels."

    def __init__(self, base: Path, notebooks: list[Path]):
        self.base, self.port, self.token = base, free_port(), secrets.token_hex(24)
        self.root_dir = base / "root"
        self.root_dir.mkdir(parents=True)
        for nb in notebooks: shutil.copy(nb, self.root_dir / nb.name)
        config, data, runtime = base / "config", base / "data", base / "runtime"
        self.env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "JUPYTER_PATH", "JUPYTER_CONFIG_PATH")}
        self.env.update(JUPYTER_CONFIG_DIR=str(config), JUPYTER_DATA_DIR=str(data), JUPYTER_RUNTIME_DIR=str(runtime),
                        IPYTHONDIR=str(base / "ipython"), JUPYTER_PLATFORM_DIRS="1", PYTHONUNBUFFERED="1",
                        MPLCONFIGDIR=str(base / "matplotlib"))
        # user settings: every cell stays in the DOM (no virtual scrolling), and no notification toasts or news
        settings = config / "lab" / "user-settings" / "@jupyterlab"
        write_json(settings / "notebook-extension" / "tracker.jupyterlab-settings", {"windowingMode": "none"})
        write_json(settings / "apputils-extension" / "notification.jupyterlab-settings",
                   {"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True})
        self.log_path = base / "server.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
            "--ServerApp.port_retries=0", "--allow-root", "--ServerApp.terminals_enabled=False", f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root_dir}", "--ServerApp.open_browser=False",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly", "--LabApp.expose_app_in_browser=True",
            "--ServerApp.shutdown_no_activity_timeout=900",  # never outlives a crashed test run by long
        ]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, cwd=self.root_dir, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with code {self.proc.returncode} before answering:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=5) as r:
                    if r.status == 200 and "started" in json.loads(r.read()): return
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"JupyterLab did not answer /api/status within {SERVER_START_TIMEOUT} s:\n{self.log_tail()}")

    def lab_url(self, notebook: str) -> str:
        "The page that opens `notebook` (a workspace of its own, reset, so no earlier layout is restored)."
        return f"{self.url}/lab/tree/{notebook}?reset&token={self.token}"

    def log_tail(self, chars: int = 20_000) -> str:
        try: text = self.log_path.read_text(errors="replace")
        except FileNotFoundError: return "(no server log)"
        return text[-chars:]

    def stop(self) -> None:
        "SIGTERM lets the server shut its kernels down; whatever is left of its process group is then killed."
        if self.proc is None: return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try: self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired: pass
        try: os.killpg(self.proc.pid, signal.SIGKILL)  # the group this server was started in: kernels included
        except ProcessLookupError: pass
        try: self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired: pass
        self._log.close()


@pytest.fixture(scope="module")
def output_dir(request) -> Path:
    "Where screenshots go: tests/output/browser/<test module>/ (git-ignored), emptied first."
    out = OUTPUT / Path(request.module.__file__).stem
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print(f"\nbrowser suite screenshots: {out}")
    return out


@pytest.fixture(scope="module")
def lab_server(request, tmp_path_factory):
    "A running JupyterLab whose root holds a copy of the module's NOTEBOOK; stopped afterwards, also on failure."
    require_browser_tools()
    server = LabServer(tmp_path_factory.mktemp("jupyterlab"), [request.module.NOTEBOOK])
    request.node.lab_server = server
    request.addfinalizer(server.stop)
    server.start()
    print(f"\nJupyterLab at {server.url} (root {server.root_dir}, log {server.log_path})")
    return server


@pytest.fixture(scope="module")
def browser():
    "Headless Debian Chromium under Playwright (Playwright's own browser builds cannot be downloaded here)."
    require_browser_tools()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try: yield chromium
        finally: chromium.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    "Attach the JupyterLab server log to the report of a failed test that used the server."
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        server = getattr(item.getparent(pytest.Module), "lab_server", None)
        if server is not None:
            report.sections.append(("JupyterLab server log (tail)", server.log_tail()))
