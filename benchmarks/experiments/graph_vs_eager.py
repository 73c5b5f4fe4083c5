"""Diagnosis: how far a bf16 GroupMamba-T training step captured in a CUDA graph is from the eager step, and
which part explains it (the stage-3 GEMM padding that only happens under capture, or bf16 rounding alone).
Prints relative errors of the logits and of the whole gradient vector."""
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else "tests")
from groupmamba import create_model  # noqa: E402
from groupmamba.ops import fast_linear  # noqa: E402
from conftest import eager_and_cuda_graph, rel_err  # noqa: E402

torch.manual_seed(0)
model = create_model("groupmamba_tiny").cuda().train()  # its own initialisation (see tests/test_models.py)
for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.eval()
x = torch.randn(2, 3, 64, 64, device="cuda")
named = list(model.named_parameters())


def step(dtype):
    def fn():
        model.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            h, dh = model(x)
            loss = h.float().square().mean() + dh.float().mean()
        loss.backward()
        return ((h.float() + dh.float()) / 2).detach(), torch.cat([p.grad.flatten() for _, p in named])
    return fn


def report(tag, a, b):
    print(f"{tag:58s} logits {rel_err(a[0], b[0]):.2e}  grads {rel_err(a[1], b[1]):.2e}", flush=True)


orig_padded = fast_linear.linear_padded
fp32 = step(None)()
eager, graphed = eager_and_cuda_graph(step(torch.bfloat16))
report("bf16 eager vs fp32 eager (rounding level)", eager, fp32)
report("bf16 graph (padded GEMMs) vs bf16 eager", graphed, eager)
report("bf16 graph (padded GEMMs) vs fp32 eager", graphed, fp32)
eager2 = step(torch.bfloat16)()
report("bf16 eager vs bf16 eager again", eager2, eager)

fast_linear.linear_padded = lambda x, w, b, dt, align=8: F.linear(x.to(dt), w.to(dt), None if b is None else b.to(dt))
eager3, graphed3 = eager_and_cuda_graph(step(torch.bfloat16))
report("bf16 graph (no padding) vs bf16 eager", graphed3, eager3)
fast_linear.linear_padded = orig_padded

# eager, always padded
def pad_always(x, w, b=None):
    dt = fast_linear.padded_dtype(x, w)
    return F.linear(x, w, b) if dt is None else orig_padded(x, w, b, dt)
import groupmamba.models.layers as L  # noqa: E402
import groupmamba.models.mixer as M  # noqa: E402
for mod in (fast_linear, L, M):
    if hasattr(mod, "linear"):
        mod.linear = pad_always
padded_eager = step(torch.bfloat16)()
report("bf16 eager padded vs bf16 eager", padded_eager, eager)
report("bf16 eager padded vs bf16 graph (padded)", padded_eager, graphed)
print("GPU:", torch.cuda.get_device_name())
