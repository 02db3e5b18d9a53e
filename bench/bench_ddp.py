"""Wall time of one tracked `train` run under torchrun with 1 and 2 processes (data-parallel).

Each round runs `torchrun --nproc_per_node=k entry_points/train.py <args>` into a fresh temporary
tracking store, for k in `--processes`, interleaved; medians of the rounds. The whole command is
timed (process start, imports, MLflow logging included), as a user would see it.

    python bench/bench_ddp.py                                    # digits, the paper's MLP, 10 epochs
    python bench/bench_ddp.py --args "--dataset fashion-mnist --subset 10000 --epochs 3"
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(processes: int, args: list[str], threads: int) -> float:
    with tempfile.TemporaryDirectory() as store:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "OMP_NUM_THREADS": str(threads)}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                        f"--master_port={free_port()}", str(REPO / "entry_points" / "train.py"), *args],
                       cwd=store, env=env, check=True, capture_output=True)
        return time.perf_counter() - start


def compare(counts: list[int], rounds: int, threads: int, one_run, what: str) -> None:
    """`one_run(k, threads)` for every count k, interleaved over the rounds; medians against the first."""
    cores = os.cpu_count() or 1
    times: dict[int, list[float]] = {k: [] for k in counts}
    for r in range(rounds):
        for k in counts:
            t = threads or max(1, cores // k)
            times[k].append(one_run(k, t))
            print(f"round {r + 1}: {k} process(es), {t} thread(s) each: {times[k][-1]:.1f} s", flush=True)
    base = statistics.median(times[counts[0]])
    print(f"\n{cores} cores; {what}")
    print("processes  median s  vs first")
    for k in counts:
        t = statistics.median(times[k])
        print(f"{k:9d}  {t:8.1f}  {t / base:7.2f}x")


def cli(doc: str, default_args: str, script: str, one_run) -> None:
    """The command line of a process-count benchmark: `one_run(k, args, threads)` for k in --processes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--args", default=default_args, help=f"{script} flags")
    parser.add_argument("--processes", default="1,2", help="process (worker) counts to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process; 0 = cores / processes")
    a = parser.parse_args()
    compare([int(k) for k in a.processes.split(",")], a.rounds, a.threads,
            lambda k, threads: one_run(k, shlex.split(a.args), threads), f"{script} {a.args}")


if __name__ == "__main__":
    cli(__doc__, "--dataset digits --epochs 10 --device cpu", "train.py", one_run)
