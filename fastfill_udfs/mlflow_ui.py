"""The MLflow UI as a user sees it: start `mlflow server` on a tracking store, open its pages in
headless Chromium (Debian's `chromium`) through the DevTools protocol, wait for text to appear,
click, and take screenshots. Used by `scripts/mlflow_screenshots.py` and the UI test.

Chromium is started with the flags this machine's closed network needs (no background
networking, no component updates, no sync) and a fresh profile in a temporary folder. The
DevTools client is aiohttp's websocket (aiohttp is an MLflow dependency)."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--disable-dev-shm-usage")


class BrowserUnavailableError(RuntimeError):
    """No Chromium binary could be found or started."""


def find_chromium() -> str | None:
    """Path of a Chromium binary (`FASTFILL_CHROMIUM`, then chromium / chromium-browser /
    google-chrome on PATH), or None."""
    explicit = os.environ.get("FASTFILL_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None,
               what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before answering {url}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not answer {url} within {timeout:.0f} s")
        time.sleep(0.5)


@contextmanager
def mlflow_server(store_uri: str, *, port: int | None = None, timeout: float = 180.0,
                  log_path: str | Path | None = None) -> Iterator[str]:
    """Run `mlflow server` on `store_uri` (e.g. sqlite:////abs/mlruns.db) on 127.0.0.1 and
    yield its base URL; the server is stopped on exit. Raises RuntimeError / TimeoutError
    (with the server's log) when it does not come up."""
    if not store_uri:
        raise ValueError("store_uri: a tracking store URI is required")
    port = port or free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server",
           "--backend-store-uri", store_uri, "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log_file = open(log_path, "w") if log_path else tempfile.TemporaryFile("w+")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            _wait_http(f"{url}/health", timeout, proc, "mlflow server")
        except (RuntimeError, TimeoutError) as exc:
            log_file.flush()
            text = Path(log_path).read_text() if log_path else (log_file.seek(0) or log_file.read())
            raise type(exc)(f"{exc}\n{text[-3000:]}") from None
        yield url
    finally:
        _stop(proc)
        log_file.close()


def _stop(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=20)


class Page:
    """One browser tab driven over the DevTools protocol (synchronous facade)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ws, session):
        self._loop, self._ws, self._session, self._id = loop, ws, session, 0

    def _run(self, coro):
        return self._loop.run_until_complete(coro)

    async def _send(self, method: str, params: dict | None = None) -> dict:
        self._id += 1
        my_id = self._id
        await self._ws.send_str(json.dumps({"id": my_id, "method": method,
                                            "params": params or {}}))
        while True:
            msg = await self._ws.receive(timeout=120)
            if msg.type.name != "TEXT":
                raise RuntimeError(f"DevTools connection closed during {method}")
            data = json.loads(msg.data)
            if data.get("id") == my_id:
                if "error" in data:
                    raise RuntimeError(f"DevTools {method}: {data['error']}")
                return data.get("result", {})

    def call(self, method: str, **params) -> dict:
        """Send one DevTools command and return its result."""
        return self._run(self._send(method, params))

    def evaluate(self, expression: str):
        """Evaluate JavaScript in the page; returns the value (JSON-serialisable)."""
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"page script failed: {out['exceptionDetails']}")
        return out.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout: float = 90.0, settle: float = 1.5) -> str:
        """Wait until the page's visible text contains every needle; returns the text. Raises
        TimeoutError naming the missing ones and quoting the page."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            missing = [n for n in needles if n not in text]
            if not missing:
                time.sleep(settle)  # let charts finish drawing
                return self.text()
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never showed {missing}; it shows:\n{text[:2000]}")
            time.sleep(0.5)

    def screenshot(self, path: str | Path) -> Path:
        """Save the visible page as PNG (the pointer moved off the charts first, so no
        hover toolbars or tooltips show)."""
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=2, y=2)
        time.sleep(0.5)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


@contextmanager
def chromium_page(width: int = 1600, height: int = 1000,
                  timeout: float = 60.0) -> Iterator[Page]:
    """A headless Chromium tab (fresh profile, window `width` x `height`). Raises
    BrowserUnavailableError when Chromium is not installed or does not start."""
    binary = find_chromium()
    if binary is None:
        raise BrowserUnavailableError(
            "Chromium not found: install Debian's chromium (apt-get install chromium) or set "
            "FASTFILL_CHROMIUM to its path")
    import aiohttp

    profile = tempfile.mkdtemp(prefix="fastfill-chromium-")
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
           f"--window-size={width},{height}", "about:blank"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    loop = asyncio.new_event_loop()
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not port_file.is_file() or not port_file.read_text().strip():
            if proc.poll() is not None:
                raise BrowserUnavailableError(
                    f"{binary} exited with code {proc.returncode}: "
                    f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise BrowserUnavailableError(f"{binary} did not open its DevTools port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            targets = [t for t in json.load(resp) if t.get("type") == "page"]

        async def connect():
            session = aiohttp.ClientSession()
            return session, await session.ws_connect(targets[0]["webSocketDebuggerUrl"],
                                                     max_msg_size=0)

        session, ws = loop.run_until_complete(connect())
        page = Page(loop, ws, session)
        page.call("Page.enable")
        page.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        try:
            yield page
        finally:
            loop.run_until_complete(ws.close())
            loop.run_until_complete(session.close())
    finally:
        _stop(proc)
        loop.close()
        shutil.rmtree(profile, ignore_errors=True)


# --- the three views the README shows ------------------------------------------------------

QUIET_UI = ("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
            "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true'); 1")


def _expand_chart(page: Page, metric: str) -> bool:
    """Open chart `metric` of the chart view full screen (its card's first button)."""
    return bool(page.evaluate(
        "(() => { const cards = [...document.querySelectorAll("
        "'[data-testid=experiment-view-compare-runs-card]')]; const card = cards.find(c => "
        "(c.innerText || '').trim().split('\\n')[0].trim() === %s); if (!card) return false;"
        " const b = card.querySelector('button'); if (!b) return false; b.click(); return true;"
        " })()" % json.dumps(metric)))


def _hide_banner(page: Page) -> None:
    page.evaluate("(() => { const b = document.querySelector('button[aria-label=\"Hide banner\"]');"
                  " if (b) b.click(); return 1; })()")


def backfill_runs_for_screenshots(client, exp_id: str) -> list:
    """The experiment's backfill runs of the latest ranking per run, newest first."""
    from fastfill_udfs.tracking import KIND_TAG, RUN_TAG

    runs = client.search_runs([exp_id], filter_string=f"tags.`{KIND_TAG}` = 'backfill'",
                              order_by=["attributes.start_time DESC"])
    latest = {}
    for r in runs:
        latest.setdefault(r.data.tags.get(RUN_TAG), r)
    return list(latest.values())


def capture_screenshots(store_uri: str, out_dir: str | Path, *, experiment: str = "fastfill",
                        run_name: str | None = None, prefix: str = "mlflow_",
                        width: int = 1500, height: int = 900, timeout: float = 120.0) -> dict:
    """Start `mlflow server` on `store_uri`, open it in headless Chromium and save:
    `<prefix>runs.png` (the experiment's run list: the backfill runs with policy, model,
    AUCs and status), `<prefix>mAP_chart.png` (the mAP-against-step chart of every backfill
    run), `<prefix>curves.png` (the "Backfill curves" view: mAP, top1, top5,
    backfill_fraction first) and `<prefix>curve_artifact.png` (the `curve.png` artifact of the
    run `run_name`, default: the newest auto, else uncertainty, run); where that run has a
    forecast, `<prefix>forecast_chart.png` (its forecast and realised share of the gain on one
    chart) and `<prefix>forecast_artifact.png` (its forecast_vs_realised.png). Refreshes the experiment's "Backfill
    curves" view first. Returns {name: path}, plus `texts` (each page's visible text). Raises
    ValueError when the experiment or its backfill runs are missing, BrowserUnavailableError
    without Chromium, TimeoutError when a page never shows its runs."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from fastfill_udfs.tracking import (BACKFILL_VIEW, MODEL_TRAINING_QUERY, experiment_url,
                                        publish_backfill_view)

    out_dir = Path(out_dir)
    previous = os.environ.pop("MLFLOW_TRACKING_URI", None)
    mlflow.set_tracking_uri(store_uri)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if previous is not None:
        os.environ["MLFLOW_TRACKING_URI"] = previous
    client = MlflowClient(tracking_uri=store_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"experiment {experiment!r} is not in {store_uri}")
    runs = backfill_runs_for_screenshots(client, exp.experiment_id)
    if not runs:
        raise ValueError(f"experiment {experiment!r} in {store_uri} has no backfill runs")
    names = [r.info.run_name for r in runs]
    if run_name:
        chosen = [r for r in runs if r.data.tags.get("fastfill.run") == run_name
                  or r.info.run_name == run_name]
        if not chosen:
            raise ValueError(f"run_name {run_name!r} is none of {names}")
    else:
        rank = {"auto": 0, "uncertainty": 1}
        chosen = sorted(runs, key=lambda r: rank.get(r.data.tags.get("fastfill.policy"), 2))
    run = chosen[0]
    publish_backfill_view(exp.experiment_id)
    shots, texts = {}, {}
    with mlflow_server(store_uri, timeout=timeout) as url, \
            chromium_page(width=width, height=height) as page:
        page.goto(url)
        page.wait_for_text("Experiments", timeout=timeout, settle=0.5)
        page.evaluate(QUIET_UI)
        page.call("Page.reload")   # the assistant panel reads its setting when the app starts
        page.wait_for_text("Experiments", timeout=timeout, settle=0.5)
        list_url = (experiment_url(url, exp.experiment_id)
                    + f"&viewStateShareKey={BACKFILL_VIEW}")
        page.goto(list_url)
        texts["runs"] = page.wait_for_text(*names, "mAP_auc", timeout=timeout)
        _hide_banner(page)
        time.sleep(1)
        shots["runs"] = page.screenshot(out_dir / f"{prefix}runs.png")

        page.goto(url + "/#/")   # a fresh route, so the chart view loads the view again
        page.goto(experiment_url(url, exp.experiment_id, view=BACKFILL_VIEW))
        texts["curves"] = page.wait_for_text(*names, "Backfill curves", "mAP", "top1",
                                             timeout=timeout, settle=3.0)
        _hide_banner(page)
        time.sleep(1)
        shots["curves"] = page.screenshot(out_dir / f"{prefix}curves.png")
        if not _expand_chart(page, "mAP"):
            raise TimeoutError("the chart view has no mAP chart to expand:\n"
                               + page.text()[:2000])
        time.sleep(3)
        texts["mAP_chart"] = page.text()
        shots["mAP_chart"] = page.screenshot(out_dir / f"{prefix}mAP_chart.png")
        if "forecast_gain_share" in run.data.metrics:   # forecast and realised, one chart
            from fastfill_udfs.tracking import FORECAST_CHART

            page.goto(url + "/#/")
            page.goto(experiment_url(url, exp.experiment_id, view=BACKFILL_VIEW))
            page.wait_for_text(FORECAST_CHART, timeout=timeout, settle=3.0)
            _hide_banner(page)
            if _expand_chart(page, FORECAST_CHART):
                time.sleep(3)
                texts["forecast_chart"] = page.text()
                shots["forecast_chart"] = page.screenshot(out_dir / f"{prefix}forecast_chart.png")

        page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
                  f"/artifacts/curve.png?{MODEL_TRAINING_QUERY}")
        texts["curve_artifact"] = page.wait_for_text("curve.png", run.info.run_name,
                                                     timeout=timeout, settle=2.0)
        loaded = page.evaluate("[...document.querySelectorAll('img')].some(i => "
                               "i.naturalWidth > 200)")
        if not loaded:
            time.sleep(5)
        shots["curve_artifact"] = page.screenshot(out_dir / f"{prefix}curve_artifact.png")
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        if "forecast_vs_realised.png" in names:
            page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
                      f"/artifacts/forecast_vs_realised.png?workflowType=machine_learning")
            texts["forecast_artifact"] = page.wait_for_text(
                "forecast_vs_realised.png", run.info.run_name, timeout=timeout, settle=3.0)
            shots["forecast_artifact"] = page.screenshot(
                out_dir / f"{prefix}forecast_artifact.png")
    shots["texts"] = texts
    return shots
