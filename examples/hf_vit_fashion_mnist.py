"""HuggingFace's Trainer on a small ViT (from a config, no download) on 2,000 Fashion-MNIST images
(the Debian package dataset-fashion-mnist, or torchvision's download), recording sample importance.

    pip install -e ".[hf]"
    python examples/hf_vit_fashion_mnist.py   # then: mlflow run . -e explore -P train_run_ids=<run id>
"""
import mlflow
import torch
import transformers as tf

from sample_importance.data import load_dataset
from sample_importance.integrations.hf import ImportanceTrainer

if __name__ == "__main__":
    data = load_dataset("fashion-mnist", "data", subset=2000)
    x = torch.as_tensor(data.x_train).view(-1, 1, 28, 28)
    rows = [{"pixel_values": x[i], "labels": int(data.y_train[i]), "sample_id": i} for i in range(len(x))]
    torch.manual_seed(0)
    model = tf.ViTForImageClassification(tf.ViTConfig(image_size=28, patch_size=7, num_channels=1, num_labels=10,
                                                      hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                      intermediate_size=128))
    args = tf.TrainingArguments(output_dir="hf-vit", per_device_train_batch_size=64, num_train_epochs=3,
                                learning_rate=1e-3, report_to=["mlflow"], save_strategy="no", use_cpu=True, seed=0)
    trainer = ImportanceTrainer(model=model, args=args, train_dataset=rows, labels=data.y_train,
                                sample_ids=range(len(rows)), dataset="fashion-mnist", image_shape=(1, 28, 28))
    trainer.train()
    print("run:", mlflow.last_active_run().info.run_id)
