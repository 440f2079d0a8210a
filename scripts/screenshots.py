"""Screenshots of the MLflow UI over a real sweep's runs, for docs/images/ (docs/screenshots.md says what they show).

    python scripts/screenshots.py [--out docs/images] [--home DIR] [--port N]

1. a smoke sweep of Table 3c (4 cells, 3 trainings: the smallest table with several cells, ~3.5 min on 2 cores) into
   a new temporary DDPS_HOME, or into --home (skipped when that store already holds a sweep's cell runs);
2. `ddps ui` on a free loopback port over that store (stopped, with its process group, at the end);
3. headless Chromium (Debian's `chromium` package), driven through its DevTools protocol over a pipe (fds 3 and 4:
   no extra package), takes three pictures: the experiments list, the sweep's parent run with its nested runs
   expanded, and one cell run's mIoU / mBIoU by refinement step.
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ddps.orchestration.runtime import free_ports, stop_group  # stop_group: SIGTERM to the group, then SIGKILL

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["experiments/table3c.yaml", "--preset", "smoke", "--workers", "1"]
WIDTH = 1600


class Chromium:
    """A headless Chromium and one page of it, spoken to through the DevTools protocol on a pipe: Chromium reads
    requests on its fd 3 and writes replies on its fd 4, each a JSON message ending in a NUL byte."""

    def __init__(self, profile: str):
        to_chromium, from_chromium = os.pipe(), os.pipe()

        def pipes_on_3_and_4():  # in the child: move both ends above 4 first, so that neither overwrites the other
            read_end = fcntl.fcntl(to_chromium[0], fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_chromium[1], fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.proc = subprocess.Popen(
            ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=pipes_on_3_and_4, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chromium[0])
        os.close(from_chromium[1])
        self.writer, self.reader = to_chromium[1], from_chromium[0]
        self.last_id, self.pending = 0, b""
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def call(self, method: str, on_page: bool = False, **params) -> dict:
        """Send one DevTools command (to the page when ``on_page``) and return its result; events are skipped."""
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if on_page:
            message["sessionId"] = self.session
        os.write(self.writer, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.pending:
                chunk = os.read(self.reader, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium exited")
                self.pending += chunk
            raw, self.pending = self.pending.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"chromium: {method}: {reply['error'].get('message')}")
                return reply["result"]

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (None when it throws)."""
        result = self.call("Runtime.evaluate", on_page=True, expression=expression, returnByValue=True)
        return None if "exceptionDetails" in result else result["result"].get("value")

    def open(self, url: str, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", on_page=True, width=WIDTH, height=height,
                  deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", on_page=True, url=url)

    def wait_for(self, expression: str, what: str, timeout: float = 60) -> None:
        """Wait until the expression is true in the page, else exit with a one-line error naming ``what``."""
        end = time.monotonic() + timeout
        while not self.js(expression):
            if time.monotonic() > end:
                raise SystemExit(f"screenshots: the MLflow UI did not show {what} within {timeout:.0f} s")
            time.sleep(0.5)

    def close_assistant(self) -> None:
        """Close MLflow's Assistant side panel (it opens by itself on a browser's first visit)."""
        self.js('document.querySelectorAll("button[aria-label=Close]").forEach(b => b.click())')

    def save(self, path: Path) -> None:
        time.sleep(1.5)  # let charts and column widths settle
        png = self.call("Page.captureScreenshot", on_page=True, format="png")["data"]
        path.write_bytes(base64.b64decode(png))
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")

    def stop(self) -> None:
        stop_group(self.proc)


def start_ui(port: int, log: Path) -> subprocess.Popen:
    """`python -m ddps ui` on the port, in a process group of its own, answering /health."""
    ui = subprocess.Popen([sys.executable, "-m", "ddps", "ui", "--port", str(port)], cwd=ROOT,
                          stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    end = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return ui
        except (urllib.error.URLError, OSError):
            if ui.poll() is not None or time.monotonic() > end:
                stop_group(ui)
                raise SystemExit(f"screenshots: ddps ui did not start on port {port}; see {log}")
            time.sleep(1)


def api(server: str, endpoint: str, body: dict) -> dict:
    """A POST to the tracking server's REST API (``/api/2.0/mlflow/<endpoint>``)."""
    request = urllib.request.Request(f"{server}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def run_name(server: str, run_id: str) -> str:
    """A run's name, from the tracking server's REST API."""
    with urllib.request.urlopen(f"{server}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30) as response:
        return json.load(response)["run"]["info"]["run_name"]


def newest_cell(server: str) -> dict | None:
    """The newest sweep cell run of the store (a run tagged ``ddps.cell``) as the REST API gives it, else None."""
    experiments = api(server, "experiments/search", {"max_results": 1000}).get("experiments", [])
    runs = api(server, "runs/search", {"experiment_ids": [e["experiment_id"] for e in experiments],
                                       "filter": "tags.`ddps.cell` LIKE '%'", "max_results": 1,
                                       "order_by": ["attributes.start_time DESC"]}).get("runs", [])
    return runs[0] if runs else None


def run_sweep() -> None:
    command = [sys.executable, "-m", "ddps", "sweep", *SWEEP]
    print("$ ddps sweep " + " ".join(SWEEP), flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise SystemExit("screenshots: the sweep failed (its output is above): ddps sweep " + " ".join(SWEEP))


def metric_page(server: str, experiment_id: str, run_id: str, keys: list[str]) -> str:
    """The UI's metric page of one run (the address MLflow's own run page links to), in its Model training view."""
    def q(value) -> str:
        return urllib.parse.quote(json.dumps(value))
    return (f"{server}/#/metric?runs={q([run_id])}&metric={q(keys[0])}&experiments={q([experiment_id])}"
            f"&plot_metric_keys={q(keys)}&plot_layout={{}}&x_axis=step&y_axis_scale=linear&line_smoothness=1"
            f"&show_point=true&deselected_curves=[]&last_linear_y_axis_range=[]&workflowType=machine_learning")


def take_screenshots(browser: Chromium, server: str, cell: dict, out: Path) -> None:
    """The three pictures, each from the address a user would open, checked before it is taken."""
    sys.path.insert(0, str(ROOT))
    from ddps.orchestration.tracking import runs_url
    experiment_id, run_id = cell["info"]["experiment_id"], cell["info"]["run_id"]
    tags = {t["key"]: t["value"] for t in cell["data"]["tags"]}
    parent = run_name(server, tags["mlflow.parentRunId"])
    experiment = tags["ddps.table"]

    browser.open(runs_url(server), 480)  # what `ddps sweep` prints at its end
    browser.wait_for(f'document.body.innerText.includes({json.dumps(experiment)})', "the experiments list")
    browser.close_assistant()
    browser.save(out / "mlflow-experiments.png")

    browser.open(runs_url(server, experiment_id), 600)  # what `ddps ui` prints per experiment
    browser.wait_for(f'document.body.innerText.includes({json.dumps(parent)})',
                     f"the runs table with the sweep run {parent}")
    browser.close_assistant()
    browser.js('document.querySelector(".ag-row button[data-component-id*=runnamecellrenderer]").click()')
    browser.wait_for(f'document.body.innerText.includes({json.dumps(cell["info"]["run_name"])})',
                     "the sweep's nested runs")
    for column in ("Run Name", "Source"):  # widen to their text: a double click on the header's resize handle
        browser.js(f'document.querySelector(\'[col-id="attributes.`{column}`"] .ag-header-cell-resize\')'
                   f'.dispatchEvent(new MouseEvent("dblclick", {{bubbles: true}}))')
    browser.save(out / "mlflow-sweep-runs.png")

    browser.open(metric_page(server, experiment_id, run_id, ["mIoU", "mBIoU"]), 660)
    browser.wait_for('document.querySelector(".js-plotly-plot") && document.body.innerText.includes("mBIoU")',
                     "the metric chart")
    browser.close_assistant()
    browser.save(out / "mlflow-metric-chart.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="where the PNGs go (docs/images)")
    parser.add_argument("--home", help="a DDPS_HOME to use; its sweep is reused if it has one (default: a new one)")
    parser.add_argument("--port", type=int, help="the UI's loopback port (default: a free one)")
    args = parser.parse_args()
    if shutil.which("chromium") is None:
        raise SystemExit("screenshots: chromium not found; install Debian's package: apt-get install -y chromium")
    home = Path(args.home or tempfile.mkdtemp(prefix="ddps-screenshots-")).resolve()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["DDPS_HOME"] = str(home)  # the sweep's and the UI's store: <home>/mlflow.db
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    print(f"DDPS_HOME={home}")

    port = args.port or free_ports(1)[0]
    server = f"http://127.0.0.1:{port}"
    ui = start_ui(port, home / "screenshots-ui.log")
    try:
        cell = newest_cell(server)
        if cell is None:
            run_sweep()
            cell = newest_cell(server)
        if cell is None:
            raise SystemExit("screenshots: the sweep logged no cell run")
        with tempfile.TemporaryDirectory(prefix="ddps-chromium-") as profile:
            browser = Chromium(profile)
            try:
                take_screenshots(browser, server, cell, out)
            finally:
                browser.stop()
    finally:
        stop_group(ui)
    print(f"the store stays in {home} (--home {home} reuses it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
