"""Run by torchrun from tests/test_distributed.py: the recorder under DDP (gloo, 2 processes) with
gradient accumulation and with bfloat16 autocast. Each process writes its samples' beta (and the
final gradient) to <out>/rank<r>.pt; the test compares them with one process on the whole batch."""
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sample_importance import ImportanceRecorder


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8),
                         nn.Tanh(), nn.Linear(8, 3))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


if __name__ == "__main__":
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = data()
    mine = slice(rank * 8, rank * 8 + 8)  # this process's 8 samples of the batch of 16
    result = {}
    # 1. float64, two micro-batches of 4 per process (no all-reduce on the first), SGD with momentum
    torch.set_default_dtype(torch.float64)
    net = model()
    ddp = DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with ImportanceRecorder(net) as rec:
        parts = []
        for k, micro in enumerate((slice(0, 4), slice(4, 8))):
            xs, ys = x[mine][micro].double(), y[mine][micro]
            sync = ddp.no_sync() if k == 0 else torch.enable_grad()
            with sync:
                parts.append(rec.backward(F.cross_entropy(ddp(xs), ys, reduction="none"), optimizer=opt,
                                          batch_size=16, grad_scale=world))
        result["accumulated"] = torch.cat(parts)
        result["grad"] = [p.grad.clone() for p in net.parameters()]
    # 2. float32 under bfloat16 autocast, one share of 8 per process
    torch.set_default_dtype(torch.float32)
    net = model()
    ddp = DistributedDataParallel(net)
    with ImportanceRecorder(net) as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_i = F.cross_entropy(ddp(x[mine]), y[mine], reduction="none")
        result["autocast"] = rec.backward(loss_i, lr=0.1, batch_size=16, grad_scale=world)
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
