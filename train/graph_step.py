"""The whole optimizer step as one CUDA graph (``--cuda-graph``).

An eager GroupMamba training step launches thousands of small kernels, so on a fast GPU it waits on the
host: benchmarks/bench_models.py measured GroupMamba-T (B=128, bf16, H200) at about 535 img/s eagerly and
about 1,500 img/s with the step captured in a CUDA graph. ``GraphedStep`` captures the student forward, the
loss (teacher forward included), the backward, gradient clipping and the fused AdamW update once, then
replays that graph every step: the batch is copied into static input buffers and the learning rate is
written into a device tensor the captured optimizer reads.

The capture runs a few warm-up steps on the first batch (Triton compiles, cuDNN picks algorithms, the
optimizer allocates its state). Those steps change weights, buffers and optimizer state; all three are
restored in place afterwards, so the first replay starts from exactly the state an eager run would have.
"""
from __future__ import annotations

import torch

from .flat_params import clear_grads


def check_supported(cfg: dict, distributed: bool, device: torch.device, amp: str) -> None:
    """Raises ValueError listing every setting the graphed step cannot run with."""
    problems = []
    if device.type != "cuda":
        problems.append(f"it needs a CUDA device (this run is on {device.type})")
    if distributed:
        problems.append("it runs in a single process without DDP; multi-GPU runs train eagerly under torchrun")
    if amp == "fp16":
        problems.append("--amp fp16 needs a GradScaler, which reads the gradients' finiteness on the host every "
                        "step; use --amp bf16 or none")
    if cfg["accum_steps"] != 1:
        problems.append(f"--accum-steps must be 1 (got {cfg['accum_steps']})")
    if cfg["compile"]:
        problems.append("--compile and --cuda-graph are alternatives; pick one")
    if cfg["grad_checkpointing"]:
        problems.append("--grad-checkpointing stashes RNG states on the host inside the step")
    if not cfg["fused_adamw"]:
        problems.append("it captures the fused AdamW; drop --no-fused-adamw")
    if problems:
        raise ValueError("--cuda-graph: " + "; ".join(problems))


def capture(body, before_each, warmup: int = 3):
    """The PyTorch whole-step recipe: run ``before_each(); body()`` ``warmup`` times on a side stream (Triton
    compiles, cuDNN picks algorithms, optimizers allocate state), then ``before_each()`` and capture one
    ``body()`` in a CUDA graph. Returns (graph, what the captured body returned: its static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            before_each()
            body()
    torch.cuda.current_stream().wait_stream(side)
    before_each()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()
    return graph, out


class GraphedStep:
    """Callable: ``loss, grad_norm = step(x, y, lr)`` runs one optimizer step by replaying the graph.

    ``x`` and ``y`` must keep the shapes and dtypes of the first batch (the training loader drops the last
    partial batch). The returned tensors are the graph's static outputs: read them before the next call.
    The optimizer must be a fused AdamW created with ``capturable=True``.
    """

    def __init__(self, model, forward_model, criterion, optimizer, autocast, clip_grad: float, warmup: int = 3,
                 flat=None):
        self.model, self.forward_model, self.criterion = model, forward_model, criterion
        self.optimizer, self.autocast, self.clip_grad, self.warmup = optimizer, autocast, clip_grad, warmup
        self.flat = flat  # FlatParams whose buffers the optimizer updates, or None
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        dev = self.params[0].device
        # One device tensor read by every param group: the captured AdamW takes the learning rate from it.
        self.lr = torch.full((), float(optimizer.param_groups[0]["lr"]), dtype=torch.float32, device=dev)
        for g in optimizer.param_groups:
            g["lr"] = self.lr
        self.graph = None
        self.x = self.y = self.loss = self.grad_norm = None

    def _body(self):
        with self.autocast():
            out = self.forward_model(self.x)
        loss, _ = self.criterion(self.x, out, self.y)
        loss.backward()
        if self.flat is not None:
            self.flat.gather_grads()
        if self.clip_grad > 0:
            gn = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        else:
            gn = torch.zeros((), device=self.x.device)
        self.optimizer.step()
        return loss.detach(), gn.detach()

    def _zero_grad(self):
        clear_grads(self.optimizer, self.flat)

    def _snapshot(self):
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        opt = {p: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
               for p, st in self.optimizer.state.items()}
        return weights, opt

    def _restore(self, snap):
        weights, opt = snap
        with torch.no_grad():
            for k, v in self.model.state_dict().items():  # these share storage with the live tensors
                v.copy_(weights[k])
            for p, st in self.optimizer.state.items():
                saved = opt.get(p, {})
                for k, v in st.items():
                    if not torch.is_tensor(v):
                        continue
                    if k in saved:
                        v.copy_(saved[k])
                    else:  # state the warm-up created starts from AdamW's initial zeros
                        v.zero_()

    def _capture(self, x, y):
        self.x, self.y = x.clone(), y.clone()
        snap = self._snapshot()
        # Gradients allocated inside the capture live in the graph's memory; every replay overwrites them.
        self.graph, (self.loss, self.grad_norm) = capture(self._body, self._zero_grad, self.warmup)
        self._restore(snap)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float):
        if self.graph is None:
            self._capture(x, y)
        elif x.shape != self.x.shape or x.dtype != self.x.dtype or y.shape != self.y.shape or y.dtype != self.y.dtype:
            raise ValueError(f"--cuda-graph: batch shapes changed from x {tuple(self.x.shape)} {self.x.dtype}, "
                             f"y {tuple(self.y.shape)} {self.y.dtype} to x {tuple(x.shape)} {x.dtype}, "
                             f"y {tuple(y.shape)} {y.dtype}; the captured step needs fixed shapes")
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.lr.fill_(lr)
        self.graph.replay()
        return self.loss, self.grad_norm
