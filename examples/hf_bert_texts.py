"""HuggingFace's Trainer on a BERT-style classifier from a tiny config, on a small labelled text set
made here (no download), recording sample importance into the Trainer's MLflow run.

    pip install -e ".[hf]"
    python examples/hf_bert_texts.py          # then: mlflow run . -e explore -P train_run_ids=<run id>
"""
import mlflow
import torch
import transformers as tf

from sample_importance.integrations.hf import ImportanceTrainer

POSITIVE = "good great fine happy superb lovely".split()
NEGATIVE = "bad awful poor sad terrible ugly".split()
FILLER = "the a movie was it is very and plot actors".split()
VOCAB = {w: i + 2 for i, w in enumerate(POSITIVE + NEGATIVE + FILLER)}  # 0: padding, 1: unknown


def texts(n: int = 400, length: int = 8) -> list[dict]:
    """Sentences of filler words with two words of their label's sentiment; one in ten labelled wrongly."""
    g = torch.Generator().manual_seed(0)
    pick = lambda words: words[int(torch.randint(len(words), (1,), generator=g))]  # noqa: E731
    rows = []
    for i in range(n):
        label = i % 2
        words = [pick(FILLER) for _ in range(length)]
        for _ in range(2):
            words[int(torch.randint(length, (1,), generator=g))] = pick(POSITIVE if label else NEGATIVE)
        noisy = 1 - label if i % 10 == 0 else label  # a mislabelled sample every tenth
        rows.append({"input_ids": torch.tensor([VOCAB[w] for w in words]), "attention_mask": torch.ones(length, dtype=torch.long),
                     "labels": noisy, "sample_id": i})
    return rows


if __name__ == "__main__":
    rows = texts()
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=len(VOCAB) + 2, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32, num_labels=2))
    args = tf.TrainingArguments(output_dir="hf-texts", per_device_train_batch_size=32, num_train_epochs=5,
                                learning_rate=3e-4, report_to=["mlflow"], save_strategy="no", use_cpu=True, seed=0)
    trainer = ImportanceTrainer(model=model, args=args, train_dataset=rows, labels=[r["labels"] for r in rows],
                                sample_ids=[r["sample_id"] for r in rows], dataset="texts")
    trainer.train()
    print("run:", mlflow.last_active_run().info.run_id)
