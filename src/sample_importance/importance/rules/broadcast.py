"""Outputs without the batch axis, broadcast into the batch later (position embeddings on an arange
index, prompt tokens, relative-position biases): where they meet the batch in the autograd graph,
and each sample's share of their gradient there, pulled back to the module's output.

Sample i's loss reads only row i of a batched tensor, so its gradient for a batch-less tensor u that
meets the batch in an operation y = op(u, ...) is op's backward of row i of dL/dy alone: for an
addition or expand(), row i summed to u's shape. Between the module's output and u lie operations
whose results have no batch either (a permute, an unsqueeze, a mask by torch.where): each sample's
share is pulled back through their own backward functions, one sample at a time.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map

from .base import Call

# where a batch-less tensor meets the batch and each sample's share of its gradient is that
# sample's slice of the gradient there, summed to its shape (`_share`)
_MEETINGS = ("AddBackward0", "SubBackward0", "ExpandBackward0")


def _share(g: torch.Tensor, shape) -> torch.Tensor:
    """(B, *shape): each sample's slice of g (B, ...) summed over the axes a tensor of `shape`
    was broadcast along to meet it."""
    lead = (1,) * (g.dim() - len(shape)) + tuple(shape)
    axes = [a for a in range(1, g.dim()) if lead[a] == 1 and g.shape[a] != 1]
    if axes:
        g = g.sum(axes, keepdim=True)
    return g.reshape(g.shape[0], *shape)


def batch_less(call: Call, shape, B: int) -> bool:
    """Whether a call's output of this shape (without B on its first axis) is one without the batch,
    broadcast into it later: a leading axis of 1, or inputs none of which has B on any axis (a
    batch on another axis is not this: `_check_call` asks for batch-first inputs)."""
    if len(shape) > 0 and shape[0] == 1:
        return True
    return not any(isinstance(t, torch.Tensor) and B in t.shape for t in tree_flatten((call.args, call.kwargs))[0])


def _input_grad(node, grad_outputs, j: int) -> torch.Tensor:
    """The gradient an autograd node's backward gives its input j, as the engine hands it on:
    summed to that input's shape where the forward broadcast it, in its dtype."""
    got = node(*grad_outputs)  # a node of one input returns its gradient, not a tuple
    got = got[j] if isinstance(got, tuple) else got
    child, nr = node.next_functions[j]
    meta = child._input_metadata[nr]
    if tuple(got.shape) != tuple(meta.shape):
        got = got.sum_to_size(meta.shape)
    return got if got.dtype == meta.dtype else got.to(meta.dtype)


def spread_arguments(call: Call, B: int, lead: bool) -> tuple[tuple, dict]:
    """A batch-less call's tensor arguments with the batch made explicit, as its output's per-sample
    gradients have it: a leading axis of 1 expanded to B (lead), or an axis of B put in front."""
    def spread(t):
        if not isinstance(t, torch.Tensor):
            return t
        if lead:
            return t.expand(B, *t.shape[1:]) if t.dim() and t.shape[0] == 1 else t
        return t.unsqueeze(0).expand(B, *t.shape)
    return tuple(spread(a) for a in call.args), tree_map(spread, call.kwargs)
def meetings(origin, nr: int, consumers: dict, B: int) -> tuple[list, str | None]:
    """From output `nr` of autograd node `origin` (without the batch), the nodes where it meets the
    batch: [(meeting, input j, path)], the path the batch-less nodes in between, nearest the meeting
    first, each with the input index that leads back toward origin; consumers: node -> [(consumer,
    input index)]. Or the reason it is refused: paths that join again, or an operation of several
    outputs where it meets the batch."""
    paths, todo, reached = [], [(origin, [])], set()
    while todo:
        node, path = todo.pop()
        for consumer, j in consumers.get(node, ()):
            if node is origin and consumer.next_functions[j][1] != nr:
                continue  # another output of the module's last operation
            meta = consumer._input_metadata
            if len(meta) == 1 and len(meta[0].shape) > 0 and meta[0].shape[0] == B:
                paths.append((consumer, j, path))
                continue
            if len(meta) > 1 and any(len(m.shape) > 0 and m.shape[0] == B for m in meta):
                return [], (f"meets the batch in {type(consumer).__name__}, an operation of several outputs, which "
                            "the recorder does not follow: let it meet the batch in one operation.")
            if consumer in reached:
                return [], ("reaches the batch along paths that join again before it, which the recorder does not "
                            "follow: compute it once per forward where it meets the batch.")
            reached.add(consumer)
            todo.append((consumer, [(consumer, j)] + path))
    return paths, None


def pulled_back(meeting, j: int, path: list, g: torch.Tensor) -> torch.Tensor:
    """(B, *shape of the module's output): each sample's share of the gradient of the meeting's input
    j, from g (B, ...) the gradient of its output, pulled back along `path` (see `meetings`)."""
    child, out_nr = meeting.next_functions[j]
    kind = type(meeting).__name__
    if kind in _MEETINGS:  # each sample's slice, summed to the input's shape
        share = _share(g, child._input_metadata[out_nr].shape)
        if j == 1 and kind != "ExpandBackward0":
            share = share * (-1.0 if kind == "SubBackward0" else 1.0) * float(meeting._saved_alpha)
    else:  # any other operation: its own backward of one sample's slice at a time
        def one(i: int) -> torch.Tensor:
            gi = torch.zeros_like(g)
            gi[i] = g[i]
            return _input_grad(meeting, (gi,), j)
        share = torch.stack([one(i) for i in range(g.shape[0])])
    for node, input_j in path:
        meta = node._input_metadata

        def back(t, node=node, r=out_nr, meta=meta, input_j=input_j):
            outs = [t if m == r else torch.zeros(tuple(md.shape), dtype=md.dtype, device=md.device)
                    for m, md in enumerate(meta)]
            return _input_grad(node, outs, input_j)
        # one sample at a time: a node's backward is not written for vmap
        share = torch.stack([back(t) for t in share])
        out_nr = node.next_functions[input_j][1]
    return share
