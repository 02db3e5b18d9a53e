"""Screenshots of the MLflow UI for the README, re-takable.

Starts `mlflow server` on a loopback port over a tracking store (default: ./mlflow.db with
./mlruns), then headless Chromium (Debian package `chromium`) takes three pictures: the run list of
the experiment, the compare view of the newest `ordering` run's variants, and the versions of its
registered model.

    python tools/screenshots.py [--store DIR] [--out docs]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, endpoint: str, body: dict | None = None) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if body is None:
        return json.loads(urllib.request.urlopen(url, timeout=30).read())
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


def shoot(chromium: str, url: str, path: Path, size: str = "1800,1000") -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--window-size={size}", "--hide-scrollbars",
                        "--virtual-time-budget=20000", f"--screenshot={path}", url],
                       check=True, capture_output=True, timeout=120)
    print(f"wrote {path}")


@contextlib.contextmanager
def ui_server(store_arg: str) -> Iterator[str]:
    """A local `mlflow server` (one worker, loopback) on the tracking store in folder `store_arg`;
    yields its URL once it answers, and stops it afterwards."""
    store = Path(store_arg).resolve()
    if not (store / "mlflow.db").is_file():
        sys.exit(f"error: {store / 'mlflow.db'} does not exist: pass --store, the folder where you ran the jobs.")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
                               "--default-artifact-root", str(store / "mlruns"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=store)
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except Exception:
                time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=".", help="folder holding mlflow.db and mlruns/")
    ap.add_argument("--out", default="docs", help="where the PNG files go")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("error: headless Chromium is needed: apt-get install chromium.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ui_server(args.store) as base:
        runs = api(base, "runs/search", {"experiment_ids": ["0"], "max_results": 1000,
                                         "order_by": ["attributes.start_time DESC"]})["runs"]
        shoot(chromium, f"{base}/#/experiments/0/runs", out / "runs.png")
        tags = lambda r: {t["key"]: t["value"] for t in r["data"].get("tags", [])}  # noqa: E731
        orderings = [r for r in runs if tags(r).get("sample_importance.entry_point") == "ordering"]
        children = []
        for parent in orderings:  # the newest ordering run that trained its variants itself
            children = [r["info"]["run_id"] for r in runs
                        if tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]
                        and tags(r).get("sample_importance.entry_point") == "train"][:8]
            if children:
                break
        if children:
            query = urllib.parse.urlencode({"runs": json.dumps(children), "experiments": json.dumps(["0"])})
            shoot(chromium, f"{base}/#/compare-runs?{query}", out / "compare.png")
        models = api(base, "registered-models/search").get("registered_models", [])
        if models:
            shoot(chromium, f"{base}/#/models/{urllib.parse.quote(models[0]['name'])}", out / "registry.png")


if __name__ == "__main__":
    main()
