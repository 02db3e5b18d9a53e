"""The recorder of this tree against that of an earlier commit, in one process (A/B).

On a noisy machine two runs of `bench_recorder.py` can differ by more than a change does; here
plain training, this tree's `ImportanceRecorder` and the one of `--commit` (its package exported
with `git archive` into a temporary folder and imported under another name) take turns in the same
process, on copies of one model and batch (`bench_recorder.py`'s models), and each is reported as
a multiple of plain, with the page faults of a step (`ru_minflt`).

    python bench/bench_ab.py --commit 1e76a64                           # ResNet-20 layout, batch 32
    python bench/bench_ab.py --commit 1e76a64 --model mlp --batch 128 --rounds 400

Routes take turns step by step (a slow spell of the machine falls on all of them alike); the
lower quartile and the median of the timed steps are reported.
"""
from __future__ import annotations

import argparse
import copy
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_recorder  # noqa: E402
from sample_importance import ImportanceRecorder  # noqa: E402


def recorder_of(commit: str, folder: Path):
    """ImportanceRecorder as it was at `commit` (the package exported and imported as `si_<commit>`)."""
    name = f"si_{commit}"
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", commit, "src/sample_importance"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "src" / "sample_importance").rename(folder / name)
    sys.path.insert(0, str(folder))
    return __import__(name).ImportanceRecorder


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commit", required=True, help="the earlier commit whose recorder is the B side")
    ap.add_argument("--model", default="resnet20-gn", choices=list(bench_recorder.MODELS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=200,
                    help="rounds; in each, every route takes one untimed and one timed step")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        routes = {"plain": None, "this tree": ImportanceRecorder, args.commit: recorder_of(args.commit, Path(tmp))}
        torch.manual_seed(0)
        model, batch = bench_recorder.MODELS[args.model](False)
        x, y = batch(args.batch)
        steps = {}
        for name, make in routes.items():
            m = copy.deepcopy(model)
            opt = torch.optim.SGD(m.parameters(), lr=0.01)
            rec = None if make is None else make(m)

            def step(m=m, opt=opt, rec=rec):
                opt.zero_grad()
                loss = F.cross_entropy(m(x), y, reduction="none")
                loss.mean().backward() if rec is None else rec.backward(loss, optimizer=opt)
                opt.step()
            steps[name] = step
        times = {k: [] for k in steps}
        faults = {k: [] for k in steps}
        for r in range(args.rounds + 10):  # the first 10 rounds warm up
            for name, step in steps.items():  # one untimed and one timed step per route and round
                step()
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                step()
                if r >= 10:
                    times[name].append(time.perf_counter() - start)
                    faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    base = {q: quantile(times["plain"], q) for q in (0.25, 0.5)}
    print(f"{args.model}, batch {args.batch}, {args.rounds} rounds, torch {torch.__version__}; "
          "per-step times, interleaved, at the lower quartile and the median")
    for name in steps:
        q25, q50 = quantile(times[name], 0.25), quantile(times[name], 0.5)
        print(f"{name:>12}: p25 {1e3 * q25:8.2f} ms {q25 / base[0.25]:5.2f}x plain   p50 {1e3 * q50:8.2f} ms "
              f"{q50 / base[0.5]:5.2f}x plain  {statistics.median(faults[name]):8.0f} page faults/step")


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of values (the nearest rank)."""
    return sorted(values)[round(q * (len(values) - 1))]


if __name__ == "__main__":
    main()
