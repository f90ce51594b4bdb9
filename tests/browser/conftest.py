"""Fixtures of the browser tests: Debian's Chromium driven by Playwright, a JupyterLab server on
loopback, and a page that records every request it makes, its console and its screenshots.

Playwright never downloads a browser here: it drives ``/usr/bin/chromium`` (or ``PERL_CHROMIUM``),
headless and with the flags that keep Chromium itself off the network. A page may only reach the
URLs a test allows (the JupyterLab server, or ``file://``); anything else is aborted and recorded,
and the tests assert that nothing was. A missing Chromium or Playwright fails the tests with a
line saying so: nothing is skipped. A failing test gets its screenshots, the browser console and
the tail of the JupyterLab log in its report.

``PERL_UPDATE_SCREENSHOTS=1`` also writes small screenshots of the explorers and of the report to
``docs/`` (for the README).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
DOCS = ROOT / "docs"
CHROMIUM = os.environ.get("PERL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
]  # note: containers often give /dev/shm 64 MB, too little for Chromium
UPDATE_SCREENSHOTS = os.environ.get("PERL_UPDATE_SCREENSHOTS") == "1"
VIEWPORT = {"width": 1400, "height": 1000}
TIMEOUT_MS = 60_000  # one browser action or wait; a whole notebook run on a busy 2-core machine fits
SERVER_START_S = 90
EXPLORER_NOTEBOOKS = ("02_spectral_explorer", "03_gradient_explorer")
LOCAL_SCHEMES = ("data:", "blob:")


# ------------------------------------------------------------------------------ the browser
@pytest.fixture(scope="package")
def chromium():
    """Headless Chromium under Playwright for this folder's tests (stopped before other tests run)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: the browser tests need Debian's chromium "
            f"(apt-get install -y chromium) or PERL_CHROMIUM=/path/to/chromium.",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "The Python package playwright is not installed: pip install playwright "
            "(its browser download is not needed: the tests drive Debian's chromium).",
            pytrace=False,
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


class BrowserPage:
    """One fresh browser context and page that records requests, console and screenshots.

    Usage:
        page = browser_page.open(url, allow=("http://127.0.0.1:8888/",))
        browser_page.shot("rendered", page.locator(".output"), docs_name="explorer.png")
        assert browser_page.blocked == []

    Args:
        browser: a Playwright browser.
        folder (Path): where screenshots go (the test's tmp dir).
    """

    def __init__(self, browser, folder: Path):
        self.browser, self.folder = browser, folder
        self.context = self.page = None
        self.allowed: tuple[str, ...] = LOCAL_SCHEMES
        self.requests: list[str] = []
        self.blocked: list[str] = []
        self.console: list[str] = []
        self.page_errors: list[str] = []
        self.screenshots: list[Path] = []

    def open(self, url: str, allow: tuple[str, ...] = ()):
        """Open ``url``; requests whose URL starts with none of ``allow`` (nor data:/blob:) are aborted."""
        self.allowed = tuple(allow) + LOCAL_SCHEMES
        self.context = self.browser.new_context(viewport=VIEWPORT)
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.on("console", lambda msg: self.console.append(f"[{msg.type}] {msg.text}"))
        self.page.on("pageerror", lambda err: self.page_errors.append(str(err)))
        self.page.goto(url)
        return self.page

    def _route(self, route):
        url = route.request.url
        self.requests.append(url)
        if url.startswith(self.allowed):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def shot(self, name: str, target=None, docs_name: str | None = None) -> Path:
        """Screenshot of ``target`` (a locator; default the whole page) into the test's folder,
        and with PERL_UPDATE_SCREENSHOTS=1 a small copy as docs/<docs_name>."""
        path = self.folder / f"{len(self.screenshots):02d}_{name}.png"
        (target or self.page).screenshot(path=str(path))
        self.screenshots.append(path)
        if docs_name and UPDATE_SCREENSHOTS:
            from .pages import small_png

            small_png(path, DOCS / docs_name)
        return path

    def failure_report(self) -> str:
        lines = []
        if self.page is not None and not self.page.is_closed():
            try:
                self.shot("at_failure", None)
            except Exception as err:  # a crashed page still has its earlier screenshots and log
                lines.append(f"(no screenshot at failure: {err})")
        lines.append("screenshots:")
        lines += [f"  {p}" for p in self.screenshots]
        lines.append(f"requests aborted (outside {', '.join(self.allowed)}): {self.blocked or 'none'}")
        lines.append(f"page errors: {self.page_errors or 'none'}")
        lines.append(f"browser console ({len(self.console)} lines, last 60):")
        lines += [f"  {c[:400]}" for c in self.console[-60:]]
        return "\n".join(lines)

    def close(self) -> None:
        if self.context is not None:
            self.context.close()


@pytest.fixture
def browser_page(chromium, tmp_path):
    page = BrowserPage(chromium, tmp_path)
    yield page
    page.close()


# ------------------------------------------------------------------------------ JupyterLab
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """A JupyterLab server from this environment on a free loopback port, with a token, serving
    ``root``; its Jupyter config, data, runtime, settings and workspace folders live under ``home``
    (nothing from the user's ~/.jupyter leaks in, nothing is written there)."""

    def __init__(self, root: Path, home: Path):
        self.root, self.home = root, home
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}/"
        self.log_path = home / "jupyterlab.log"
        settings = home / "settings"
        # no news or update toasts over the screenshots; every cell stays in the DOM
        for plugin, text in (
            ("@jupyterlab/apputils-extension/notification", '{"fetchNews": "false", "checkForUpdates": false}'),
            ("@jupyterlab/notebook-extension/tracker", '{"windowingMode": "none"}'),
        ):
            path = settings / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            JUPYTER_CONFIG_DIR=str(home / "config"),
            JUPYTER_DATA_DIR=str(home / "data"),
            JUPYTER_RUNTIME_DIR=str(home / "runtime"),
            JUPYTERLAB_SETTINGS_DIR=str(settings),
            JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
            IPYTHONDIR=str(home / "ipython"),
        )
        cmd = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={root}",
            "--ServerApp.allow_root=True",
            "--LabApp.news_url=None",
            "--LabApp.extension_manager=readonly",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            # a server orphaned by a killed test run culls its kernels and exits by itself
            "--MappingKernelManager.cull_idle_timeout=600",
            "--MappingKernelManager.cull_interval=60",
            "--ServerApp.shutdown_no_activity_timeout=600",
        ]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=root, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_ready()

    def _get(self, path: str, method: str = "GET"):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
        request = urllib.request.Request(
            f"{self.base}{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with opener.open(request, timeout=5) as response:
            return response.read()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"JupyterLab exited with code {self.proc.returncode} before serving:\n{self.log_tail()}",
                    pytrace=False,
                )
            try:
                self._get("api/status")
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(
                        f"JupyterLab did not answer /api/status within {SERVER_START_S} s:\n{self.log_tail()}",
                        pytrace=False,
                    )
                time.sleep(0.3)

    def url(self, notebook: str) -> str:
        """The notebook opened alone in a fresh workspace (no tabs restored from an earlier test)."""
        return f"{self.base}lab/workspaces/t{secrets.token_hex(4)}/tree/{notebook}?token={self.token}&reset"

    def log_tail(self, n: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        import json

        try:  # kernels first, so none outlives the server
            for kernel in json.loads(self._get("api/kernels")):
                self._get(f"api/kernels/{kernel['id']}", method="DELETE")
        except OSError:
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()


def prepare_notebooks(run_dir: Path, folder: Path) -> None:
    """Copy the explorer notebooks into ``folder`` with their ``parameters`` cell set to ``run_dir``
    (what papermill would inject), outputs cleared; nothing is executed."""
    import nbformat

    folder.mkdir(parents=True, exist_ok=True)
    for name in EXPLORER_NOTEBOOKS:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(cells) == 1, (
            f"notebooks/{name}.ipynb needs exactly one cell tagged 'parameters', found {len(cells)}"
        )
        cells[0].source = f"run_dir = {str(run_dir)!r}"
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nbformat.write(nb, folder / f"{name}.ipynb")


TRAINING_NOTEBOOK = "01_train_and_track"
LIVE_RUN = "runs/live"  # relative to the server's root, where notebook 01 trains
LIVE_STEPS = 40  # long enough that several steps are drawn while the cell still runs, on a busy 2-core machine
LIVE_OVERRIDES = {"training.per_device_train_batch_size": 8, "dataset.example_numbers": 64, "dataset.test_size": 8}


def prepare_training_notebook(folder: Path, max_steps: int = LIVE_STEPS) -> None:
    """Copy notebook 01 into ``folder`` with its ``parameters`` cell set to a short run in ``LIVE_RUN``
    (8 completions per step), outputs cleared; nothing is executed."""
    import nbformat

    folder.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(NOTEBOOKS / f"{TRAINING_NOTEBOOK}.ipynb", as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"notebooks/{TRAINING_NOTEBOOK}.ipynb needs exactly one cell tagged 'parameters'"
    cells[0].source = "\n".join(
        [
            f"output_dir = {LIVE_RUN!r}",
            "peft_type = 'lora'",
            "model_name_or_path = 'countdown-nano'",
            f"max_steps = {max_steps}",
            "tracking_frequency = 10",
            f"overrides = {LIVE_OVERRIDES!r}",
        ]
    )
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, folder / f"{TRAINING_NOTEBOOK}.ipynb")


@pytest.fixture(scope="module")
def jupyterlab(tracked_run, tmp_path_factory):
    """A JupyterLab server whose root holds the explorer notebooks parametrized with the shared run,
    and notebook 01 set to train a short run."""
    base = tmp_path_factory.mktemp("jupyterlab")
    prepare_notebooks(tracked_run, base / "workspace")
    prepare_training_notebook(base / "workspace")
    lab = JupyterLab(base / "workspace", base / "home")
    yield lab
    lab.stop()


# ------------------------------------------------------------------------------ failure reports
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    page = item.funcargs.get("browser_page")
    if isinstance(page, BrowserPage):
        report.sections.append(("browser: screenshots, requests, console", page.failure_report()))
    lab = item.funcargs.get("jupyterlab")
    if isinstance(lab, JupyterLab):
        report.sections.append(("JupyterLab server log (last lines)", lab.log_tail()))
