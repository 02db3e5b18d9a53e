"""The stage registry: one entry per MLproject entry point (name, config class, description), each
run by `run(cfg)` of the stage module of the same name; the MLproject and the entry-point scripts
are generated from and dispatched through it."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from .. import config as C


@dataclass(frozen=True)
class Stage:
    name: str
    config: type
    description: str
    launches_steps: bool = False  # its `run` takes the MLproject folder, to launch its steps from it

    def run(self, cfg, project_dir: str | Path | None = None) -> str:
        """Run the stage (its module `stages/<name>.py`, imported now); returns the run id."""
        module = importlib.import_module(f"{__name__}.{self.name}")
        return module.run(cfg, project_dir) if self.launches_steps else module.run(cfg)


STAGES = {stage.name: stage for stage in (
    Stage("main", C.StudyConfig, "The whole study on one dataset, with report.html", launches_steps=True),
    Stage("train", C.TrainRunConfig, "SGD with per-sample per-layer importance tracking"),
    Stage("stability", C.StabilityConfig, "Spearman of importance across initialisations (fig. 1)"),
    Stage("decompose", C.DecomposeConfig, "Importance by epoch, layer, class, sample group (figs. 2, 3, 10)"),
    Stage("nll", C.NllConfig, "NLL vs importance correlation (fig. 4)"),
    Stage("cluster", C.ClusterConfig, "k-means clusters of one class by importance profile (figs. 5, 6)"),
    Stage("ordering", C.OrderingConfig, "Batch constructions of section 3.6 over seeds, models in the registry "
                                        "(figs. 7, 8)", launches_steps=True),
    Stage("scores", C.ScoresConfig, "Every per-sample difficulty score side by side; label-noise detection (AUROC)"),
    Stage("prune", C.PruneConfig, "Data pruning: train on the samples each score keeps (hardest, easiest, random)"),
    Stage("learnability", C.LearnabilityConfig, "Sample-wise learnability across architectures (Lee et al. 2019)"),
    Stage("explore", C.ExploreConfig, "A self-contained explorer.html: data map, every sample's scores, curves "
                                      "and image"),
    Stage("influence", C.InfluenceConfig, "Influence of each training sample (section 4): fixed point, unrolled, "
                                          "validated"),
    Stage("sweep", C.SweepConfig, "Optuna search over the learning rate, each trial over seeds; resumable, shared "
                                  "by workers"),
)}
