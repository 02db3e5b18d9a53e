"""Write the tracking store `test_release_store.py` opens: made by a release of sample-importance,
read by the code of today. Run it with the release's code (a checkout of its commit) on PYTHONPATH:

    git worktree add /tmp/release <commit> && cd /tmp/release
    PYTHONPATH=src python /path/to/tests/data/make_release_store.py /path/to/tests/data/store-<commit>.tar.gz

It holds a finished `train` run, an interrupted one (stopped after its first epoch, with its
checkpoint), and a `decompose` and a `scores` run of the finished one (the analyses found by the
training configuration, as `main` and an analysis without train_run_ids find them). The store names
the folder it was written in (release.json), which the test replaces by its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TRAIN = {"subset": 60, "depth": 1, "width": 8, "batch_size": 20, "epochs": 3, "device": "cpu"}


def main(out: str) -> None:
    import mlflow

    from sample_importance import config as C
    from sample_importance.stages import STAGES
    from sample_importance.stages.train import run_train

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    folder = Path(tempfile.mkdtemp(prefix="release-store-"))
    os.chdir(folder)
    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    finished = run_train(C.TrainConfig(**TRAIN), log_model=False, quiet=True)

    def stop(epoch, metrics):
        raise KeyboardInterrupt

    try:
        run_train(C.TrainConfig(**TRAIN, seed=1), log_model=False, quiet=True, epoch_callback=stop)
    except KeyboardInterrupt:
        pass
    decompose = STAGES["decompose"].run(C.DecomposeConfig(**TRAIN, train_run_ids=finished))
    scores = STAGES["scores"].run(C.ScoresConfig(**TRAIN))  # finds the finished run by the training fields
    (folder / "release.json").write_text(json.dumps({
        "commit": commit, "folder": str(folder), "train": TRAIN, "finished": finished, "decompose": decompose,
        "scores": scores}, indent=1))
    with tarfile.open(out, "w:gz") as tar:
        for name in ("mlflow.db", "mlruns", "release.json"):  # the explorer page (2 MB) is not needed
            tar.add(folder / name, arcname=name, filter=lambda info: None if info.name.endswith(".html") else info)
    print(f"wrote {out} from the store in {folder} (commit {commit})")


if __name__ == "__main__":
    main(sys.argv[1])
