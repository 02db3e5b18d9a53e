"""Lightning training a torchvision ResNet (GroupNorm) on scikit-learn's digits, recording sample
importance into the MLFlowLogger's run.

    pip install -e ".[lightning]"
    python examples/lightning_resnet_digits.py   # then: mlflow run . -e explore -P train_run_ids=<run id>
"""
import lightning
import mlflow
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import MLFlowLogger
from sklearn.datasets import load_digits
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from sample_importance.integrations.lightning import ImportanceCallback


class Classifier(lightning.LightningModule):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, ids = batch
        logits = self(x)
        loss_i = F.cross_entropy(logits, y, reduction="none")
        return {"loss": loss_i.mean(), "loss_i": loss_i, "logits": logits, "sample_ids": ids}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


if __name__ == "__main__":
    digits = load_digits()
    n = len(digits.target)
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32).view(n, 1, 8, 8).expand(n, 3, 8, 8).contiguous()
    y, ids = torch.tensor(digits.target), torch.arange(n)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, ids), batch_size=64, shuffle=True)
    torch.manual_seed(0)
    logger = MLFlowLogger(experiment_name="lightning-digits", tracking_uri=mlflow.get_tracking_uri())
    trainer = lightning.Trainer(max_epochs=3, logger=logger, accelerator="cpu", enable_checkpointing=False,
                                callbacks=[ImportanceCallback(labels=y, sample_ids=ids, dataset="digits",
                                                              image_shape=(3, 8, 8))])
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, norm_layer=lambda c: nn.GroupNorm(8, c))
    trainer.fit(Classifier(net), loader)
    print("run:", logger.run_id)
