"""Each optimizer param group's parameters as views of one contiguous buffer ("flat" parameters).

Why: GroupMamba-T has 1257 parameter tensors. torch's fused AdamW (and the foreach ops behind gradient
clipping and the step counters) handle a tensor list in launches of at most a few dozen tensors, one thread
block per 64K-element chunk, so on an H200 a step of 23M parameters took ~2.9 ms in ~48 small launches
(benchmarks/profile_model.py) where its bytes need ~0.2 ms. Over one buffer per group the same update is a
couple of launches that fill the GPU.

How: ``FlatParams(groups)`` copies every parameter into its group's buffer and re-seats the parameter's
``.data`` on its slice (same shape and strides, so channels_last weights keep their layout); the modules
and their state dicts see ordinary tensors. ``param_groups`` are the groups with the buffer as the only
parameter: give them to the optimizer. After the backward, ``gather_grads()`` concatenates the
parameters' gradients into each buffer's ``.grad`` (one pass over 4 bytes per parameter); clip, unscale
and step on the optimizer's (flat) parameters; ``zero_grad()`` clears both.

The optimizer state is per buffer, so a checkpoint's optimizer state only loads into a run that flattens
the same groups (``check_optimizer_state`` says so instead of torch's size mismatch). A parameter without
a gradient is updated as if its gradient were zero (torch's AdamW would skip it); GroupMamba training gives
every trainable parameter a gradient. Re-seating parameters after this (``model.to(...)``) would detach them
from the buffers: build FlatParams last, after moving the model.
"""
from __future__ import annotations

import torch


class FlatParams:
    def __init__(self, groups: list[dict]):
        self.groups = []          # (buffer, [params], [memory order of each param]) per group
        self.param_groups = []    # the optimizer's groups: the buffer instead of the parameter list
        for g in groups:
            params = list(g["params"])
            if not params:
                continue
            dev, dt = params[0].device, params[0].dtype
            bad = [tuple(p.shape) for p in params if p.device != dev or p.dtype != dt]
            if bad:
                raise ValueError(f"FlatParams: a group mixes devices or dtypes ({dev}, {dt} vs shapes {bad[:3]}); "
                                 "flatten groups of one device and dtype")
            flat = torch.empty(sum(p.numel() for p in params), device=dev, dtype=dt)
            off = 0
            with torch.no_grad():
                for p in params:
                    n = p.numel()
                    view = flat.as_strided(p.shape, _dense_strides(p), off)
                    view.copy_(p)
                    p.data = view
                    off += n
            buf = torch.nn.Parameter(flat, requires_grad=True)
            self.groups.append((buf, params, [_memory_order(p) for p in params]))
            self.param_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [buf]})

    @property
    def buffers(self) -> list[torch.Tensor]:
        return [buf for buf, *_ in self.groups]

    def gather_grads(self) -> None:
        """Each buffer's .grad = its parameters' gradients, concatenated (zeros for a missing gradient)."""
        for buf, params, orders in self.groups:
            # each gradient in its parameter's memory order (a view when the layouts agree)
            grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).permute(order).reshape(-1)
                     for p, order in zip(params, orders)]
            buf.grad = torch.cat(grads)

    def zero_grad(self) -> None:
        """The parameters' gradients to None (autograd then hands over fresh ones without an add); the
        buffers' gradients are rebuilt by gather_grads (the optimizer's zero_grad clears them)."""
        for _, params, _ in self.groups:
            for p in params:
                p.grad = None


def clear_grads(optimizer: torch.optim.Optimizer, flat: "FlatParams | None") -> None:
    """Gradients to None for the optimizer's parameters and, with flat buffers, the model parameters behind
    them (the one way the eager step, the captured step and the benchmarks clear gradients)."""
    optimizer.zero_grad(set_to_none=True)
    if flat is not None:
        flat.zero_grad()


def _memory_order(p: torch.Tensor):
    """The dims of p from outermost to innermost in memory (by decreasing stride): p.permute(order) is
    contiguous, so its reshape(-1) lists the elements as they lie in the buffer."""
    return sorted(range(p.dim()), key=lambda i: (-p.stride(i), i))


def _dense_strides(p: torch.Tensor):
    """p's strides when p is dense (contiguous in some dimension order, e.g. channels_last), else the
    contiguous strides."""
    if p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last) or \
            (p.dim() == 5 and p.is_contiguous(memory_format=torch.channels_last_3d)):
        return p.stride()
    return torch.empty(p.shape, device="meta").stride()


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, flat: bool, path: str) -> None:
    """Raises a ValueError naming the cause when ``state`` (an optimizer state dict from ``path``) was saved
    with parameters grouped differently from ``optimizer``'s, e.g. flat vs per-parameter."""
    want = [len(g["params"]) for g in optimizer.param_groups]
    got = [len(g["params"]) for g in state.get("param_groups", [])]
    if want != got:
        raise ValueError(
            f"{path}: its optimizer state covers parameter groups of sizes {got}, this run's optimizer has {want}. "
            f"This run {'flattens' if flat else 'does not flatten'} each group into one buffer (--flat-params); "
            "resume with the setting the checkpoint was written with, or start from its weights with --pretrained")
