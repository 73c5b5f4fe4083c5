"""Runs the depthwise conv (Triton, bf16) once per shape, for Nsight Compute:

    ncu --kernel-name regex:_dwconv_fwd --section SpeedOfLight ... python benchmarks/ncu_dwconv.py B1 B3
    ncu --kernel-name regex:_dwconv_wgrad --section SpeedOfLight ... python benchmarks/ncu_dwconv.py T1:bwd T2:bwd

A name with ":bwd" also runs the backward (the weight-gradient pass, the column sum of its partials and the
dx pass). Shapes, B=128: GroupMamba-B's FFN convs at stage 1 (768 channels at 56x56) and stage 3 (1696 at
14x14), GroupMamba-T's stage-1 and stage-2 mixer convs (64 at 56x56, 128 at 28x28, SiLU). The weight-gradient
pass at T1 took 128-131 us for 3 bytes per element whatever its tile (eighteenth set), while at T2 smaller
tiles took it from 118 to 71 us: the two profiles side by side should say what bounds it at T1.
"""
import torch

from groupmamba.ops import dwconv_act

from benchutil import run_shapes_main  # benchmarks/ is on sys.path as a script

SHAPES = {"B1": (56, 768, "gelu"), "B3": (14, 1696, "gelu"), "T1": (56, 64, "silu"), "T2": (28, 128, "silu")}


def run(name: str, batch: int = 128):
    shape, _, mode = name.partition(":")
    side, C, act = SHAPES[shape]
    backward = mode == "bwd"
    x = torch.randn(batch, side, side, C, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    w = (0.3 * torch.randn(C, 1, 3, 3, device="cuda")).requires_grad_(backward)
    b = torch.randn(C, device="cuda", requires_grad=backward)
    y = dwconv_act(x, w, b, act)
    if backward:
        y.backward(torch.randn_like(y))
    torch.cuda.synchronize()


if __name__ == "__main__":
    run_shapes_main(run, "B1")
