"""Wall time of the `ordering` experiment with 1 and 2 workers sharing its runs (`storage`).

Each round starts k copies of `entry_points/ordering.py <args> --storage <journal file>` at once on a
fresh SQLite tracking store, for k in `--processes`, interleaved, and times until the last one ends
(process start, imports, MLflow logging and the registry included); medians of the rounds.

    python bench/bench_workers.py                        # digits, 600 samples, 10 epochs, 2 seeds x 8 methods
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from bench_ddp import REPO, cli


def one_run(workers: int, args: list[str], threads: int) -> float:
    with tempfile.TemporaryDirectory() as store:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "OMP_NUM_THREADS": str(threads)}
        # The store first: workers started at once on an empty SQLite file race to create its tables.
        subprocess.run([sys.executable, "-c", "import mlflow; mlflow.search_experiments()"], env=env, check=True,
                       capture_output=True)
        command = [sys.executable, str(REPO / "entry_points" / "ordering.py"), *args, "--storage", f"{store}/claims.log"]
        start = time.perf_counter()
        procs = [subprocess.Popen(command, cwd=store, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for _ in range(workers)]
        for p in procs:
            if p.wait():
                raise SystemExit(f"a worker failed: {p.stderr.read().decode()[-2000:]}")
        return time.perf_counter() - start


if __name__ == "__main__":
    cli(__doc__, "--dataset digits --subset 600 --epochs 10 --num_seeds 2 --device cpu", "ordering.py", one_run)
