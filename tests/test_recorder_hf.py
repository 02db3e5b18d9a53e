"""ImportanceRecorder on HuggingFace Transformers and on outputs broadcast into the batch (float64).

Every model is built from a tiny config (no download). The reference backpropagates each sample's
loss L_i alone from the same batch forward pass and squares (lr / B) g_i over the parameters of
each of the recorder's columns (`layer_parameters`: a parameter tied to an earlier layer counts
once, in that layer's column). Relative error <= 1e-6 per column, every column non-zero.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sample_importance import ImportanceRecorder
from sample_importance.errors import UserError

tf = pytest.importorskip("transformers")

LR = 0.3
B, T = 4, 7


pytestmark = pytest.mark.usefixtures("float64")


def reference(model: nn.Module, loss_fn, names: dict[str, list[str]], lr: float = LR) -> torch.Tensor:
    """(B, columns): (lr / B)^2 sum over each column's parameters of ||dL_i/dp||^2."""
    loss_i = loss_fn(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    columns = [[params[n] for n in ns] for ns in names.values()]
    flat = [p for ps in columns for p in ps]
    out = torch.zeros(len(loss_i), len(columns))
    for i in range(len(loss_i)):
        gs = torch.autograd.grad(loss_i[i], flat, retain_graph=True, allow_unused=True)
        sq = {id(p): torch.zeros(()) if g is None else g.square().sum() for p, g in zip(flat, gs)}
        for d, ps in enumerate(columns):
            out[i, d] = sum((sq[id(p)] for p in ps), torch.zeros(())) * (lr / len(loss_i)) ** 2
    return out


def check(model: nn.Module, loss_fn, fallback: bool = False) -> None:
    """beta against the reference, and .grad as loss_i.mean().backward() gives it."""
    twin = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = ImportanceRecorder(model)
    assert any("fallback" in str(w.message) for w in caught) == fallback
    named = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    names = {layer: [named[id(p)] for p in rec.layer_parameters(layer)] for layer in rec.layer_names}
    beta = rec.backward(loss_fn(model), lr=LR)
    expected = reference(twin, loss_fn, names)
    assert beta.shape == expected.shape
    assert (expected.amax(0) > 0).all(), "a column without importance tests nothing"
    rel = (beta - expected).abs().amax(0) / expected.amax(0)
    assert rel.max() <= 1e-6, {n: float(r) for n, r in zip(rec.layer_names, rel) if r > 1e-6}
    twin.zero_grad()
    loss_fn(twin).mean().backward()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=n)
    rec.close()


TOKENS = torch.randint(0, 50, (B, T))
MASK = torch.ones(B, T, dtype=torch.long)
MASK[0, 5:] = 0  # padding in the first sample
TYPES = torch.randint(0, 2, (B, T))
LABELS = torch.randint(0, 3, (B,))
SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


def classify(**inputs):
    return lambda m: F.cross_entropy(m(**inputs).logits, LABELS, reduction="none")


def next_token(m):
    logits = m(input_ids=TOKENS).logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), TOKENS[:, 1:], reduction="none").mean(1)


def test_bert_with_attention_mask_and_token_types():
    """Position embeddings on a (1, T) index, broadcast into the batch by an addition."""
    model = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=50, max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0,
        attention_probs_dropout_prob=0, **SMALL))
    check(model, classify(input_ids=TOKENS, attention_mask=MASK, token_type_ids=TYPES))


def test_gpt2_with_its_tied_head():
    """wpe on a (1, T) index; lm_head shares wte's weight (one column, wte's); Conv1D by its own rule."""
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                             resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    assert model.lm_head.weight is model.transformer.wte.weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "lm_head" not in ImportanceRecorder(model).layer_names
    check(model, next_token)


def test_gpt2_under_adam_equals_the_fallback():
    """Conv1D's Adam route (its factor transposed to the Linear's layout) against the fallback's
    materialised per-sample gradients, on the second step (Adam's state in use)."""
    from sample_importance.importance import rules

    config = tf.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                           resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = tf.GPT2LMHeadModel(config)
    twin = copy.deepcopy(model)
    betas = []
    for m, rule in ((model, True), (twin, False)):
        saved = rules.RULES.pop("transformers.pytorch_utils.Conv1D") if not rule else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rec = ImportanceRecorder(m)
            opt = torch.optim.Adam(m.parameters(), lr=0.01)
            for _ in range(2):
                opt.zero_grad()
                beta = rec.backward(next_token(m), optimizer=opt)
                opt.step()
            betas.append(beta)
        finally:
            if saved is not None:
                rules.RULES["transformers.pytorch_utils.Conv1D"] = saved
    torch.testing.assert_close(betas[0], betas[1], rtol=1e-9, atol=0)


def test_distilbert():
    model = tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        vocab_size=50, max_position_embeddings=16, dim=16, n_layers=2, n_heads=2, hidden_dim=32, dropout=0,
        attention_dropout=0, seq_classif_dropout=0, num_labels=3))
    check(model, classify(input_ids=TOKENS, attention_mask=MASK))


def test_vit():
    """The class token and position embeddings, parameters of a module with a child (the fallback)."""
    model = tf.ViTForImageClassification(tf.ViTConfig(image_size=8, patch_size=4, num_channels=3, num_labels=3,
                                                      hidden_dropout_prob=0, attention_probs_dropout_prob=0,
                                                      **SMALL))
    check(model, classify(pixel_values=torch.randn(B, 3, 8, 8)), fallback=True)


def test_t5_relative_position_bias():
    """An encoder-decoder whose relative-position bias, an embedding of a (T, T) index without the
    batch, is permuted and masked (torch.where) before it meets the batch."""
    model = tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    targets = torch.randint(2, 50, (B, 5))

    def loss(m):
        logits = m(input_ids=TOKENS, attention_mask=MASK, labels=targets).logits
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
    check(model, loss, fallback=True)  # T5LayerNorm (an RMS norm) has no rule of its own


class Broadcasts(nn.Module):
    """Batch-less outputs of leaf modules meeting the batch in the ways Transformers have them:
    learned prompt tokens on an arange index (expand + cat), a position embedding added in place,
    a relative-position bias (an embedding of a (T, T) index, permuted) added to attention scores,
    and a gate without the batch multiplying the batch (the general route: a sample's slice of the
    gradient through the multiplication's own backward)."""

    def __init__(self, vocab=20, width=6, prompt=2):
        super().__init__()
        self.tokens, self.prompt = nn.Embedding(vocab, width), nn.Embedding(prompt, width)
        self.position, self.relative = nn.Embedding(16, width), nn.Embedding(2 * 16, 1)
        self.gate, self.out = nn.Linear(1, width), nn.Linear(width, 3)

    def forward(self, ids):
        b, t = ids.shape
        h = self.tokens(ids)
        h += self.position(torch.arange(t).unsqueeze(0))  # (1, T, W), in place
        prompt = self.prompt(torch.arange(self.prompt.num_embeddings))  # (P, W)
        h = torch.cat([prompt.unsqueeze(0).expand(b, -1, -1), h], 1)  # (B, P + T, W)
        n = h.shape[1]
        offsets = torch.arange(n).view(-1, 1) - torch.arange(n).view(1, -1) + 16
        bias = self.relative(offsets).permute(2, 0, 1)  # (1, N, N)
        scores = torch.softmax(h @ h.transpose(1, 2) / 3 + bias, -1)
        h = scores @ h
        h = h * torch.sigmoid(self.gate(torch.ones(1, 1)))  # (1, W) times the batch
        return self.out(torch.tanh(h).mean(1))


def test_batch_less_outputs_broadcast_into_the_batch():
    ids = torch.randint(0, 20, (B, T))
    check(Broadcasts(), lambda m: F.cross_entropy(m(ids), LABELS, reduction="none"))


class Joined(nn.Module):
    """A batch-less output along two paths that join again before they meet the batch."""

    def __init__(self):
        super().__init__()
        self.position, self.out = nn.Embedding(8, 4), nn.Linear(4, 3)

    def forward(self, x):
        p = self.position(torch.arange(x.shape[1]).unsqueeze(0))
        return self.out((x + p * torch.tanh(p)).mean(1))


def test_batch_less_paths_that_join_are_refused_after_the_pass():
    model = Joined()
    twin = copy.deepcopy(model)
    x = torch.randn(B, 5, 4)
    with ImportanceRecorder(model) as rec, pytest.raises(UserError, match="output of position has no batch axis"):
        rec.backward(F.cross_entropy(model(x), LABELS, reduction="none"), lr=LR)
    F.cross_entropy(twin(x), LABELS).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


class Mixed(nn.Module):
    """A parameter used by its module and, beside it, directly by the forward of the model."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.emb, self.mix, self.out = nn.Embedding(20, 4), nn.Linear(4, 4), nn.Linear(4, 10)

    def forward(self, ids):
        x = self.emb(ids).mean(1)
        if self.form == "matmul":  # x @ W^T beside mix(x)
            return self.out(torch.tanh(self.mix(x) + x @ self.mix.weight.t()))
        # a head on a slice of the embedding's weight
        return F.linear(torch.tanh(self.mix(x)), self.emb.weight[:10])


@pytest.mark.parametrize("form,used", [("matmul", "mix.weight"), ("slice", "emb.weight")])
def test_a_parameter_also_used_outside_its_module_is_refused(form, used):
    """Never a silently wrong number: the use outside the module is found in the autograd graph
    and refused once the pass is over, .grad complete."""
    model = Mixed(form)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 20, (B, 3))
    y = torch.randint(0, 3, (B,))
    with ImportanceRecorder(model) as rec, pytest.raises(UserError, match=f"uses {used} .*outside the forward"):
        rec.backward(F.cross_entropy(model(ids), y, reduction="none"), lr=LR)
    F.cross_entropy(twin(ids), y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def test_weights_tied_by_sharing_a_parameter_are_exact():
    """Tying GPT-2's way (one Parameter in two modules) is two recorded uses: exact, one column."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids).mean(1)))

    ids = torch.randint(0, 10, (B, 3))
    check(Tied(), lambda m: F.cross_entropy(m(ids), LABELS, reduction="none"))
