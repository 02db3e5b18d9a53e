"""Size and time to interactive of the sample explorer at full size.

Builds `explorer.html` for a train run and opens it in headless Chromium (Selenium, the flags of
tests/test_explorer.py) `--repeat` times; prints the file size and, for each load, the time from
navigation start until the page is ready (data map drawn, table filled, every curve decoded:
`window.SI_READY_MS`), then the median.

    python bench/bench_explorer.py --run_id <train run>                 # the run as it is
    python bench/bench_explorer.py --run_id <train run> --n 50000       # tiled to 50,000 samples

With `--n` larger than the run, the run's per-sample arrays are repeated (sample i gets the
curves of sample i mod n_run) up to n samples of its dataset (images, labels and predictions are
the dataset's first n): a full-size file with realistic curves, without a full training run. Use
the tracking store of the run (MLFLOW_TRACKING_URI). Timings mean something only on a quiet machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from sample_importance import mlflow_io  # noqa: E402
from sample_importance.data import load_dataset  # noqa: E402
from sample_importance.stages.explore import explorer_html  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-unsafe-swiftshader", "--window-size=1600,1200"]


def tiled(d, n: int, data_dir: str):
    """The run's dynamics repeated to n samples of its dataset (see the module docstring)."""
    meta = d.metadata
    reps = -(-n // meta["n"])
    rep = lambda a, axis: np.concatenate([np.asarray(a)] * reps, axis=axis)[(slice(None),) * axis + (slice(0, n),)]
    full = load_dataset(meta["dataset"], data_dir, 0)
    if n > full.n_train:
        sys.exit(f"error: {meta['dataset']} has {full.n_train} training samples, fewer than --n {n}.")
    config = {**meta["config"], "subset": 0 if n == full.n_train else n}
    E = meta["epochs_completed"]
    order = np.tile(np.arange(n), (E, 1))
    return dataclasses.replace(
        d, metadata={**meta, "n": n, "config": config}, importance=rep(d.importance, 1), loss=rep(d.loss, 1),
        p_true=rep(d.p_true, 1), correct=rep(d.correct, 1), error_l2=rep(d.error_l2, 1), batch_order=order,
        final_loss=rep(d.final_loss, 0), label=full.y_train[:n].copy(), sample_id=np.arange(n, dtype=np.int64))


def time_to_ready(path: Path, repeat: int) -> list[float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    times = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as profile:
            options = Options()
            for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
                options.add_argument(flag)
            options.binary_location = "/usr/bin/chromium"
            driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
            try:
                driver.get(path.resolve().as_uri())
                deadline = time.time() + 120
                while not driver.execute_script("return document.body && document.body.dataset.ready === '1'"):
                    if time.time() > deadline:
                        sys.exit("error: the page did not become ready within 120 s")
                    time.sleep(0.02)
                times.append(driver.execute_script("return window.SI_READY_MS") / 1000)
                marks = driver.execute_script("return performance.getEntriesByType('mark').map("
                                              "m => m.name + ' ' + (m.startTime / 1000).toFixed(2)).join(', ')")
                print(f"  ready after {times[-1]:.2f} s ({marks})", flush=True)
            finally:
                driver.quit()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run_id", required=True, help="a finished train run")
    ap.add_argument("--n", type=int, default=0, help="tile the run to this many samples (0 = as it is)")
    ap.add_argument("--data_dir", default="~/.cache/sample-importance")
    ap.add_argument("--out", default="explorer-bench.html")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    d = mlflow_io.load_dynamics(args.run_id)
    if args.n:
        d = tiled(d, args.n, args.data_dir)
    start = time.time()
    html = explorer_html({args.run_id: d}, args.data_dir)
    out = Path(args.out)
    out.write_text(html)
    meta = d.metadata
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB for {meta['n']:,} samples x {meta['epochs_completed']} epochs x "
          f"{len(d.layer_names)} layers ({meta['dataset']}), built in {time.time() - start:.0f} s", flush=True)
    times = time_to_ready(out, args.repeat)
    print(f"time to interactive in headless Chromium: median {statistics.median(times):.2f} s over {len(times)} loads")


if __name__ == "__main__":
    main()
