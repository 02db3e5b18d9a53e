"""Overhead of ImportanceRecorder on three kinds of network, every row measured in one process.

For each model and batch size, the same SGD step (forward, per-sample losses, backward, step) is
timed several ways:
  plain        the usual loop: loss_i.mean().backward(), no per-sample quantity
  recorder     ImportanceRecorder(model).backward(loss_i, optimizer=opt): beta (B, L)
  opacus       Opacus' GradSampleModule (per-sample gradients), reduced to per-layer squared norms
               (after Opacus' ModuleValidator.fix, which swaps nn.MultiheadAttention for its own)
  backpack     BackPACK's BatchL2Grad (per-sample squared gradient norms), summed per layer
  bn-plain     the convolutional network with BatchNorm instead of GroupNorm, plain loop
  bn-exact     the same with ImportanceRecorder(batchnorm="exact") (batched VJPs of the B losses)
  target       the target pass of in-run attribution alone: the gradient of a target loss on |V| = B
               samples (evaluation mode) at the step's parameters, nothing else
  attribution  the recorder with that target: target pass, then backward(..., target=) giving beta
               and the contribution c (B, L) (the batch's samples in reverse order serve as V)
  (with both, two derived lines: the attribution's cost beyond the target pass in units of the
  recorder alone, and the whole attributed step in units of plain training)
Opacus and BackPACK rows appear where the library supports the model ("unsupported" otherwise).
Models: the paper's MLP (784-512-512-512-10), a ResNet-20-sized CIFAR network (3 stages of three
basic blocks, 16/32/64 channels, GroupNorm), a small Transformer encoder classifier (2 layers,
d=128, 4 heads, sequences of 64 tokens); on request HuggingFace BERT and GPT-2 classifiers from
configs (4 layers, hidden 256, 128 tokens), in float32 or with --autocast (bfloat16). Rounds are
interleaved and medians reported.

    python bench/bench_recorder.py                 # CPU, batch sizes 32 and 128
    python bench/bench_recorder.py --quick         # tiny sizes: checks that every route runs
    python bench/bench_recorder.py --models mlp --routes plain,recorder   # some routes only
    python bench/bench_recorder.py --models bert,gpt2 --batches 32 [--autocast]   # HuggingFace models
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from sample_importance import ImportanceRecorder


# ---------------------------------------------------------------- models
def mlp(quick: bool) -> tuple[nn.Module, callable]:
    w = 32 if quick else 512
    model = nn.Sequential(nn.Linear(784, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
                          nn.Linear(w, 10))
    return model, lambda B: (torch.rand(B, 784), torch.randint(0, 10, (B,)))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm):
        super().__init__()
        self.conv1, self.n1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm(cout)
        self.conv2, self.n2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), norm(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        h = torch.relu(self.n1(self.conv1(x)))
        h = self.n2(self.conv2(h))
        return torch.relu(h + (x if self.short is None else self.short(x)))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20 layout (6n+2 layers, n=3), with a choice of normalisation."""

    def __init__(self, norm, blocks: int = 3, widths=(16, 32, 64)):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), norm(widths[0])
        layers, cin = [], widths[0]
        for s, w in enumerate(widths):
            for b in range(blocks):
                layers.append(Block(cin, w, 2 if s > 0 and b == 0 else 1, norm))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        h = self.blocks(torch.relu(self.norm(self.conv(x))))
        return self.fc(h.mean((2, 3)))


def resnet(quick: bool, norm: str = "group"):
    make = (lambda c: nn.GroupNorm(min(8, c), c)) if norm == "group" else nn.BatchNorm2d
    model = ResNet20(make, blocks=1 if quick else 3, widths=(4, 8, 8) if quick else (16, 32, 64))
    side = 8 if quick else 32
    return model, lambda B: (torch.randn(B, 3, side, side), torch.randint(0, 10, (B,)))


class Encoder(nn.Module):
    def __init__(self, quick: bool):
        super().__init__()
        d, T = (16, 8) if quick else (128, 64)
        self.T = T
        self.embed = nn.Embedding(1000, d)
        layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(d, 10)

    def forward(self, tokens):
        return self.fc(self.encoder(self.embed(tokens)).mean(1))


def transformer(quick: bool):
    model = Encoder(quick)
    return model, lambda B: (torch.randint(0, 1000, (B, model.T)), torch.randint(0, 10, (B,)))


def resnet_bn_eval(quick: bool):
    """The ResNet-20 layout with BatchNorm in eval mode (running statistics, as when a pretrained
    network is fine-tuned with its statistics frozen): per-sample rules, no coupling."""
    model, batch = resnet(quick, norm="batch")
    return model.eval(), batch


class Classifier(nn.Module):
    """A HuggingFace sequence classifier as a module of token ids -> logits (the routes' interface)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(input_ids=tokens).logits


def hf_batch(vocab: int, T: int):
    return lambda B: (torch.randint(1, vocab, (B, T)), torch.randint(0, 10, (B,)))  # no padding token (0)


def bert(quick: bool):
    """HuggingFace BERT from a config (no download): 4 layers, hidden 256, 4 heads, sequences of 128
    tokens, a vocabulary of 8,192 (BERT's own has 30,522), dropout off (the rules need none)."""
    import transformers as tf

    d, layers, T = (32, 1, 16) if quick else (256, 4, 128)
    config = tf.BertConfig(vocab_size=8192, hidden_size=d, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=4 * d, max_position_embeddings=512, num_labels=10, hidden_dropout_prob=0,
                           attention_probs_dropout_prob=0)
    return Classifier(tf.BertForSequenceClassification(config)), hf_batch(8192, T)


def gpt2(quick: bool):
    """HuggingFace GPT-2 from a config: 4 layers, hidden 256, 4 heads, 128 tokens, classifying from the
    last token (GPT2ForSequenceClassification), dropout off."""
    import transformers as tf

    d, layers, T = (32, 1, 16) if quick else (256, 4, 128)
    config = tf.GPT2Config(vocab_size=8192, n_positions=512, n_embd=d, n_layer=layers, n_head=4, num_labels=10,
                           pad_token_id=0, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return Classifier(tf.GPT2ForSequenceClassification(config)), hf_batch(8192, T)


class Autocast(nn.Module):
    """The model's forward pass under torch.autocast(bfloat16) (--autocast)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.inner(x).float()


def on(device: str, made):
    """A model and its batches moved to `device`."""
    model, batch = made
    return model.to(device), lambda B: tuple(t.to(device) for t in batch(B))


MODELS = {"mlp": mlp, "resnet20-gn": resnet, "transformer": transformer, "resnet20-bn-eval": resnet_bn_eval,
          "bert": bert, "gpt2": gpt2}
DEFAULT_MODELS = ("mlp", "resnet20-gn", "transformer")  # the three; the rest on request


# ---------------------------------------------------------------- routes: each returns a step function
def plain(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(x, y):
        opt.zero_grad()
        F.cross_entropy(model(x), y, reduction="none").mean().backward()
        opt.step()
    return step, lambda: None


def recorder(model, batchnorm="refuse"):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = ImportanceRecorder(model, batchnorm=batchnorm)

    def step(x, y):
        opt.zero_grad()
        rec.backward(F.cross_entropy(model(x), y, reduction="none"), optimizer=opt)
        opt.step()
    return step, rec.close


def opacus(model):
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    model = ModuleValidator.fix(model)  # Opacus' own replacements, e.g. nn.MultiheadAttention -> DPMultiheadAttention
    gsm = GradSampleModule(model, loss_reduction="mean")
    opt = torch.optim.SGD(gsm.parameters(), lr=0.01)
    owners = [[p for p in m.parameters(recurse=False)] for m in model.modules()]
    owners = [ps for ps in owners if ps]

    def step(x, y):
        opt.zero_grad()
        F.cross_entropy(gsm(x), y, reduction="none").mean().backward()
        # Opacus gives a broadcast position embedding (HuggingFace BERT, GPT-2) a "per-sample" gradient
        # of batch 1, the batch's sum: left out of its layer's column here, timed all the same.
        B = len(y)
        _ = torch.stack([sum((p.grad_sample.flatten(1).square().sum(1) for p in ps if p.grad_sample.shape[0] == B),
                             torch.zeros(B, device=y.device)) for ps in owners], 1)
        for p in gsm.parameters():
            p.grad_sample = None
        opt.step()
    return step, gsm._close


def backpack(model):
    from backpack import backpack as bp
    from backpack import extend
    from backpack.extensions import BatchL2Grad

    ext = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(ext.parameters(), lr=0.01)
    owners = [[p for p in m.parameters(recurse=False)] for m in ext.modules()]
    owners = [ps for ps in owners if ps]

    def step(x, y):
        opt.zero_grad()
        loss = loss_fn(ext(x), y)
        with bp(BatchL2Grad()):
            loss.backward()
        _ = torch.stack([sum(p.batch_l2 for p in ps) for ps in owners], 1)
        opt.step()
    return step, lambda: None


def target_pass(model):
    def step(x, y):
        model.eval()
        torch.autograd.grad(F.cross_entropy(model(x.flip(0)), y.flip(0)), list(model.parameters()))
        model.train()
    return step, lambda: None


def attribution(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = ImportanceRecorder(model)

    def step(x, y):
        model.eval()
        with rec.unrecorded():
            target = rec.target_gradient(F.cross_entropy(model(x.flip(0)), y.flip(0)))
        model.train()
        opt.zero_grad()
        rec.backward(F.cross_entropy(model(x), y, reduction="none"), optimizer=opt, target=target)
        opt.step()
    return step, rec.close


ROUTES = {"plain": plain, "recorder": recorder, "opacus": opacus, "backpack": backpack,
          "bn-plain": "bn-plain", "bn-exact": "bn-exact", "target": target_pass,
          "attribution": attribution}  # bn-*: the convolutional network only
ROUTES_ALL = ("plain", "recorder", "opacus", "backpack", "target", "attribution")


def time_route(make_step, model, batch, B: int, steps: int) -> float:
    """Seconds per step (median over `steps` after one warm-up step)."""
    step, close = make_step(model)
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    try:
        x, y = batch(B)
        step(x, y)
        times = []
        for _ in range(steps):
            sync()
            t = time.perf_counter()
            step(x, y)
            sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    finally:
        close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models and batches: check that every route runs")
    ap.add_argument("--batches", default="32,128", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per route and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--routes", default=None, help="comma-separated subset of " + ", ".join(ROUTES) + " (default: all)")
    ap.add_argument("--autocast", action="store_true", help="every route's forward pass under torch.autocast(bfloat16)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")  # the libraries' deprecation notes would bury the tables
    wanted = set(ROUTES) if args.routes is None else set(args.routes.split(","))
    if not wanted <= set(ROUTES) or "plain" not in wanted:
        ap.error(f"--routes: a subset of {', '.join(ROUTES)} that includes plain")
    if "bn-exact" in wanted:
        wanted.add("bn-plain")
    batches = [4] if args.quick else [int(b) for b in args.batches.split(",")]
    steps, rounds = (2, 1) if args.quick else (args.steps, args.rounds)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, "
          + (torch.cuda.get_device_name() if args.device == "cuda" else "CPU")
          + (", bfloat16 autocast" if args.autocast else ", float32"))
    for name in args.models.split(","):
        routes = {r: make for r, make in ROUTES.items() if r in wanted and (r in ROUTES_ALL or name == "resnet20-gn")}
        for B in batches:
            results: dict[str, list[float]] = {r: [] for r in routes}
            errors: dict[str, str] = {}
            for r in range(rounds + 1):  # round 0 warms every route up and is not counted
                for route, make in routes.items():
                    if route in errors:
                        continue
                    torch.manual_seed(0)
                    if route.startswith("bn-"):
                        model, batch = on(args.device, resnet(args.quick, norm="batch"))
                        make = plain if route == "bn-plain" else (lambda m: recorder(m, batchnorm="exact"))
                    else:
                        model, batch = on(args.device, MODELS[name](args.quick))
                    if args.autocast:
                        model = Autocast(model)
                    try:
                        t = time_route(make, model, batch, B, steps)
                        if r > 0:
                            results[route].append(t)
                    except ImportError as exc:
                        errors[route] = f"not installed ({exc.name})"
                    except Exception as exc:  # the library does not support this model
                        errors[route] = f"unsupported: {type(exc).__name__}: {str(exc).splitlines()[0][:70]}"
            print(f"\n{name}, batch {B}")
            print(f"{'route':<10} {'ms/step':>9} {'vs plain':>9}")
            base = statistics.median(results["plain"])
            bn_base = statistics.median(results["bn-plain"]) if results.get("bn-plain") else None
            for route in routes:
                if route in errors:
                    print(f"{route:<10} {errors[route]}")
                    continue
                t = statistics.median(results[route])
                ref = bn_base if route == "bn-exact" else base
                print(f"{route:<10} {1e3 * t:9.2f} {t / ref:8.2f}x")
            have = {r: statistics.median(v) for r, v in results.items() if v and r not in errors}
            if {"target", "attribution", "recorder"} <= set(have):
                beyond = have["attribution"] - have["target"]
                print(f"attribution beyond the target pass: {beyond / have['recorder']:.2f}x the recorder alone "
                      f"(target 1.2x); whole step {have['attribution'] / base:.2f}x plain (target 2.4x)")


if __name__ == "__main__":
    main()
