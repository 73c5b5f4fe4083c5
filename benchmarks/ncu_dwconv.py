"""Runs the depthwise conv forward (Triton, bf16) once per shape, for Nsight Compute:

    ncu --kernel-name regex:_dwconv_fwd --section SpeedOfLight ... python benchmarks/ncu_dwconv.py B1 B3

Shapes, B=128: GroupMamba-B's FFN convs at stage 1 (768 channels at 56x56) and stage 3 (1696 at 14x14), and
GroupMamba-T's stage-1 mixer conv (64 at 56x56, SiLU).
"""
import torch

from groupmamba.ops import dwconv_act

from benchutil import run_shapes_main  # benchmarks/ is on sys.path as a script

SHAPES = {"B1": (56, 768, "gelu"), "B3": (14, 1696, "gelu"), "T1": (56, 64, "silu")}


def run(name: str, batch: int = 128):
    side, C, act = SHAPES[name]
    x = torch.randn(batch, side, side, C, device="cuda", dtype=torch.bfloat16)
    dwconv_act(x, 0.3 * torch.randn(C, 1, 3, 3, device="cuda"), torch.randn(C, device="cuda"), act)
    torch.cuda.synchronize()


if __name__ == "__main__":
    run_shapes_main(run, "B1")
