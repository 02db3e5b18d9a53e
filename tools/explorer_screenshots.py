"""Screenshots of the sample explorer for the README, re-takable.

Opens the `explorer.html` of a run (default: the newest `main` run of the tracking store, else the
newest `explore` run) in headless Chromium (Debian packages `chromium` and `chromium-driver`, driven
by Selenium) and takes three pictures: the page with the hardest sample (largest total importance)
selected, the clusters with the table filtered to one of them, and the same file inside the MLflow
UI's artifact view (a local `mlflow server` on the store, as tools/screenshots.py does).

    python tools/explorer_screenshots.py [--store DIR] [--run_id ID] [--out docs] [--prefix explorer]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from screenshots import api, ui_server  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-unsafe-swiftshader", "--hide-scrollbars"]


def browser(profile: str, size: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for flag in FLAGS + [f"--user-data-dir={profile}", f"--window-size={size}"]:
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def wait(driver, script: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not driver.execute_script(script):
        if time.time() > deadline:
            sys.exit(f"error: timed out waiting for {script}")
        time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=".", help="folder holding mlflow.db and mlruns/")
    ap.add_argument("--run_id", default="", help="a run with an explorer.html artifact (main, explore, scores, ...)")
    ap.add_argument("--out", default="docs", help="where the PNG files go")
    ap.add_argument("--prefix", default="explorer", help="file names: <prefix>.png, <prefix>_clusters.png, ...")
    args = ap.parse_args()
    if not (shutil.which("chromium") or shutil.which("chromium-browser")) or not shutil.which("chromedriver"):
        sys.exit("error: headless Chromium and its driver are needed: apt-get install chromium chromium-driver.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ui_server(args.store) as base:
        runs = api(base, "runs/search", {"experiment_ids": [e["experiment_id"] for e in api(
            base, "experiments/search", {"max_results": 1000})["experiments"]], "max_results": 1000,
            "order_by": ["attributes.start_time DESC"]})["runs"]
        tags = lambda r: {t["key"]: t["value"] for t in r["data"].get("tags", [])}  # noqa: E731
        run = None
        if args.run_id:
            run = next((r for r in runs if r["info"]["run_id"] == args.run_id), None)
        else:
            for kind in ("main", "explore"):
                run = run or next((r for r in runs if tags(r).get("sample_importance.entry_point") == kind
                                   and r["info"]["status"] == "FINISHED"), None)
        if run is None:
            sys.exit("error: no run with an explorer.html found: pass --run_id.")
        run_id, experiment = run["info"]["run_id"], run["info"]["experiment_id"]
        local = Path(urllib.parse.unquote(urllib.parse.urlparse(run["info"]["artifact_uri"]).path)) / "explorer.html"
        if not local.is_file():
            sys.exit(f"error: run {run_id} has no explorer.html in {local.parent}.")

        with tempfile.TemporaryDirectory() as profile:
            driver = browser(profile, "1500,1250")
            try:
                driver.get(local.as_uri())
                wait(driver, "return document.body.dataset.ready === '1'")
                hardest = driver.execute_script(
                    "const rows = document.querySelectorAll('#table tbody tr'); return rows[0].cells[0].textContent;")
                from selenium.webdriver.common.keys import Keys

                driver.find_element("id", "search").send_keys(hardest, Keys.ENTER)
                wait(driver, f"return document.body.dataset.selected === '{hardest}'")
                time.sleep(1)
                driver.save_screenshot(str(out / f"{args.prefix}.png"))
                print(f"wrote {out / f'{args.prefix}.png'}")
                if driver.find_elements("css selector", ".si-cluster h3"):
                    clusters = driver.find_elements("css selector", ".si-cluster h3")
                    clusters[-1].click()  # the hardest cluster: the table shows its members
                    driver.execute_script("document.getElementById('table-section').scrollIntoView()")
                    time.sleep(1)
                    driver.save_screenshot(str(out / f"{args.prefix}_clusters.png"))
                    print(f"wrote {out / f'{args.prefix}_clusters.png'}")
            finally:
                driver.quit()
        with tempfile.TemporaryDirectory() as profile:
            driver = browser(profile, "2000,1150")
            try:
                driver.get(f"{base}/#/experiments/{experiment}/runs/{run_id}/artifacts/explorer.html")
                wait(driver, "return document.querySelector('iframe.mlflow-html-iframe') !== null")
                driver.switch_to.frame(driver.find_element("css selector", "iframe.mlflow-html-iframe"))
                wait(driver, "return document.body && document.body.dataset.ready === '1'")
                from selenium.webdriver.common.keys import Keys

                driver.find_element("id", "search").send_keys(hardest, Keys.ENTER)
                wait(driver, f"return document.body.dataset.selected === '{hardest}'")
                driver.switch_to.default_content()
                time.sleep(1)
                driver.save_screenshot(str(out / f"{args.prefix}_in_mlflow.png"))
                print(f"wrote {out / f'{args.prefix}_in_mlflow.png'}")
            finally:
                driver.quit()


if __name__ == "__main__":
    main()
