"""The recorder through HuggingFace's Trainer and Lightning, end to end on the CPU with tiny models:
the first step's beta against the reference loop (ImportanceRecorder in a plain loop on a copy of
the initial model and the same batch), the run is the framework's MLflow logger's, and `explore`
reads it."""
from __future__ import annotations

import copy
import gc
import sys

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn

from conftest import REPO, private_store
from sample_importance import ImportanceRecorder, load_dynamics
from sample_importance import config as C
from test_explorer import browser, check_detail, needs_chromium, wait_for  # noqa: F401  (browser: a fixture)

pytestmark = pytest.mark.integration  # real processes, stores, servers or trained runs


def first_batch(d) -> np.ndarray:
    """Positions (rows of the run's arrays) of the samples of the run's first step."""
    return np.asarray(d.batch_order[0])[: d.metadata["batch_size"]]


def explored(run_id: str) -> str:
    """`decompose` and `explore` on the run: the path of its explorer.html."""
    from sample_importance.stages.decompose import run as run_decompose
    from sample_importance.stages.explore import run as run_explore

    explore_id = run_explore(C.ExploreConfig(train_run_ids=run_id))
    for rid in (explore_id, run_decompose(C.DecomposeConfig(train_run_ids=run_id))):
        assert MlflowClient().get_run(rid).info.status == "FINISHED"
    return mlflow.artifacts.download_artifacts(run_id=explore_id, artifact_path="explorer.html")


# ---------------------------------------------------------------- HuggingFace
WORDS = {1: "good great fine happy superb lovely".split(), 0: "bad awful poor sad terrible ugly".split()}
FILLER = "the a movie was it is very and plot actors".split()
VOCAB = {w: i + 2 for i, w in enumerate(WORDS[1] + WORDS[0] + FILLER)}


def texts(n: int = 24, length: int = 6) -> list[dict]:
    """A small labelled text set made here (no download): filler words with two words of the
    label's sentiment, as word ids."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        label = i % 2
        words = [FILLER[int(torch.randint(len(FILLER), (1,), generator=g))] for _ in range(length)]
        for _ in range(2):
            pool = WORDS[label]
            words[int(torch.randint(length, (1,), generator=g))] = pool[int(torch.randint(len(pool), (1,), generator=g))]
        rows.append({"input_ids": torch.tensor([VOCAB[w] for w in words]),
                     "attention_mask": torch.ones(length, dtype=torch.long), "labels": label, "sample_id": 100 + i})
    return rows


def huggingface_trainer(tracking):
    """Train a tiny BERT classifier through ImportanceTrainer and check its run; -> (run id, dynamics,
    explorer path)."""
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from sample_importance.integrations.hf import ImportanceTrainer

    rows = texts()
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=len(VOCAB) + 2, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0, attention_probs_dropout_prob=0))
    initial = copy.deepcopy(model)
    args = tf.TrainingArguments(output_dir=str(tracking / "out"), per_device_train_batch_size=8, num_train_epochs=2,
                                learning_rate=1e-3, report_to=["mlflow"], save_strategy="no", use_cpu=True, seed=0,
                                disable_tqdm=True)
    trainer = ImportanceTrainer(model=model, args=args, train_dataset=rows, labels=[r["labels"] for r in rows],
                                sample_ids=[r["sample_id"] for r in rows], dataset="texts")
    trainer.train()

    (run_id,) = mlflow.search_runs(search_all_experiments=True).run_id  # the MLflowCallback's run, no other
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["sample_importance.entry_point"] == "track_run"
    assert "train_loss" in run.data.metrics  # HuggingFace's own logging, in the same run
    d = load_dynamics(run_id)
    assert d.importance.shape == (2, 24, 22) and np.isfinite(d.final_loss).all()

    pos = first_batch(d)  # the reference: the Trainer's AdamW, same hyperparameters, the same 8 samples
    opt = torch.optim.AdamW(initial.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    batch = {k: torch.stack([torch.as_tensor(rows[p][k]) for p in pos]) for k in ("input_ids", "attention_mask",
                                                                                 "labels")}
    with ImportanceRecorder(initial) as rec:
        logits = initial(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = rec.backward(F.cross_entropy(logits, batch["labels"], reduction="none"), optimizer=opt).numpy()
    got = np.asarray(d.importance[0])[pos]
    assert (expected.max(0) > 0).all()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-12 * expected.max())
    assert np.array_equal(d.final_prediction, [int(np.argmax(p)) for p in final_logits(trainer, rows)])
    page = explored(run_id)
    with mlflow.start_run() as later:  # HuggingFace's MLflowCallback, collected, ends no later run
        del trainer
        gc.collect()
        assert mlflow.active_run() is not None and mlflow.active_run().info.run_id == later.info.run_id
    return run_id, d, page


def final_logits(trainer, rows) -> list[np.ndarray]:
    with torch.no_grad():
        trainer.model.eval()
        return [trainer.model(input_ids=r["input_ids"][None], attention_mask=r["attention_mask"][None]).logits[0].numpy()
                for r in rows]


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """A HuggingFace Trainer run and its explorer, shared by the tests that read them."""
    with private_store(tmp_path_factory, "hf") as folder:
        yield huggingface_trainer(folder)


def test_huggingface_trainer(hf_run):
    """Asserted as the run is made (`huggingface_trainer`)."""
    run_id, d, page = hf_run
    assert d.metadata["dataset"] == "texts" and page.endswith("explorer.html")


@needs_chromium
def test_the_explorer_of_a_run_without_images(hf_run, browser):
    """A track_run run has no images to show: the page shows sample ids in their place, and the
    final prediction the run recorded."""
    from selenium.webdriver.common.keys import Keys

    run_id, d, page = hf_run
    browser.get("file://" + page)
    wait_for(browser, "return document.body.dataset.ready === '1'")
    target = int(d.sample_id[7])
    browser.find_element("id", "search").send_keys(str(target), Keys.ENTER)
    check_detail(browser, d, target)
    assert browser.find_element("css selector", "#detail-image .si-noimg").text == str(target)
    predicted = int(d.final_prediction[7])
    assert browser.find_element("id", "detail-prediction").text.startswith(str(predicted))


# ---------------------------------------------------------------- Lightning
def digits(n: int = 40):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data[:n] / 16.0, dtype=torch.float32).view(n, 1, 8, 8).expand(n, 3, 8, 8).contiguous()
    return x, torch.tensor(bunch.target[:n]), torch.arange(n) + 500


def test_lightning_callback(tracking):
    lightning = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import MLFlowLogger
    from torchvision.models.resnet import BasicBlock, ResNet

    from sample_importance.integrations.lightning import ImportanceCallback

    sys.path.insert(0, str(REPO / "examples"))
    from lightning_resnet_digits import Classifier  # the documented example's module

    x, y, ids = digits()
    torch.manual_seed(0)
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, norm_layer=lambda c: nn.GroupNorm(8, c))
    initial = copy.deepcopy(net)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, ids), batch_size=10, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    logger = MLFlowLogger(experiment_name="lightning", tracking_uri=mlflow.get_tracking_uri())
    trainer = lightning.Trainer(max_epochs=2, logger=logger, accelerator="cpu", enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[ImportanceCallback(labels=y, sample_ids=ids, dataset="digits",
                                                              image_shape=(3, 8, 8))])
    trainer.fit(Classifier(net), loader)

    (run_id,) = mlflow.search_runs(search_all_experiments=True).run_id
    assert run_id == logger.run_id and MlflowClient().get_run(run_id).info.status == "FINISHED"
    d = load_dynamics(run_id)
    assert d.importance.shape == (2, 40, 25) and np.array_equal(d.sample_id, ids.numpy())

    pos = first_batch(d)
    opt = torch.optim.SGD(initial.parameters(), lr=0.05, momentum=0.9)
    with ImportanceRecorder(initial) as rec:
        expected = rec.backward(F.cross_entropy(initial(x[pos]), y[pos], reduction="none"), optimizer=opt).numpy()
    np.testing.assert_allclose(np.asarray(d.importance[0])[pos], expected, rtol=1e-4, atol=1e-12 * expected.max())
    assert explored(run_id).endswith("explorer.html")


def test_lightning_with_a_loss_other_than_the_mean_is_one_sentence(tracking):
    lightning = pytest.importorskip("lightning")
    from sample_importance.errors import UserError
    from sample_importance.integrations.lightning import ImportanceCallback

    class Summed(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def training_step(self, batch, batch_idx):
            x, y, ids = batch
            logits = self.lin(x)
            loss_i = F.cross_entropy(logits, y, reduction="none")
            return {"loss": loss_i.sum(), "loss_i": loss_i, "logits": logits, "sample_ids": ids}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, torch.arange(8)), batch_size=4)
    trainer = lightning.Trainer(max_epochs=1, logger=False, accelerator="cpu", enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[ImportanceCallback(labels=y)])
    with pytest.raises(UserError, match="is not loss_i.mean"):
        trainer.fit(Summed(), loader)
    (status,) = mlflow.search_runs(search_all_experiments=True).status
    assert status == "FAILED"
