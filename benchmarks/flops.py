"""Parameter counts and FLOPs of the GroupMamba variants at 224x224.

    python benchmarks/flops.py [--models groupmamba_tiny,groupmamba_small] [--img 224] [--json out.json]

Counts with torch.utils.flop_counter.FlopCounterMode on the meta device (nothing is computed), on the
official-style op structure (``fused=False``: per-group nn.Linear / LayerNorm like the official
code). The selective scan is counted by the formula of the official code (VMamba's
flops_selective_scan_fn, plus the x_proj / dt_proj einsums it sees): per group and token
d*(R+2N) + R*d + 9*d*N + d multiply-accumulates.

Reported in multiply-accumulates (MACs), the fvcore convention the paper's "GFLOPs" use:
``GMACs`` = convolutions + linears + einsums + scan, ``GMACs+norm`` adds fvcore's LayerNorm
(5 per element) and eval BatchNorm (2 per element) counts. FLOPs = 2 x MACs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

PAPER = {"groupmamba_tiny": (23.36, 4.6), "groupmamba_small": (34.78, 7.0), "groupmamba_base": (57.15, 14.0)}


def _layer_norm_flops(input_shape, normalized_shape=None, weight=None, *args, out_shape=None, **kwargs):
    n = 1
    for s in input_shape:
        n *= s
    return 2 * n * (5 if weight is not None else 4)  # x2: FlopCounterMode's unit is FLOPs = 2 MACs


def _batch_norm_eval_flops(input_shape, weight=None, *args, out_shape=None, **kwargs):
    n = 1
    for s in input_shape:
        n *= s
    return 2 * n * (2 if weight is not None else 1)


NORM_FORMULAS = {
    torch.ops.aten.native_layer_norm: _layer_norm_flops,
    torch.ops.aten._native_batch_norm_legit_no_training: _batch_norm_eval_flops,
}


@contextmanager
def _counted_scan(counter: dict):
    """Replaces the scan the unfused layer calls with a formula count returning an empty tensor."""
    from groupmamba.models import mixer

    def scan(u, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, **_):
        B, H, W, _C = u.shape
        G, rows, d = x_proj_weight.shape
        N = A_log.shape[-1]
        R = rows - 2 * N
        counter["scan"] += B * H * W * G * (d * (R + 2 * N) + R * d + 9 * d * N + d)
        return torch.empty_like(u)

    original = mixer.grouped_scan_naive
    mixer.grouped_scan_naive = scan
    try:
        yield
    finally:
        mixer.grouped_scan_naive = original


def count(name: str, img: int = 224, num_classes: int = 1000) -> dict:
    """{'params', 'gmacs', 'gmacs_norm', 'scan_gmacs'} of one variant at img x img (batch 1)."""
    from groupmamba.models import create_model

    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, fused=False).eval()
    params = sum(p.numel() for p in model.parameters())
    counter = {"scan": 0}
    with _counted_scan(counter), FlopCounterMode(display=False, custom_mapping=NORM_FORMULAS) as fc:
        with torch.no_grad():
            model(torch.empty(1, 3, img, img, device="meta"))
    per_op = fc.get_flop_counts().get("Global", {})
    norm = sum(v for k, v in per_op.items() if k in NORM_FORMULAS) // 2
    dense = sum(v for k, v in per_op.items() if k not in NORM_FORMULAS) // 2
    macs = dense + counter["scan"]
    return dict(model=name, img=img, params=params, gmacs=macs / 1e9, gmacs_norm=(macs + norm) / 1e9,
                scan_gmacs=counter["scan"] / 1e9)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="groupmamba_tiny,groupmamba_small,groupmamba_base")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = [count(m.strip(), args.img) for m in args.models.split(",") if m.strip()]
    print("| model | params | params (paper) | GFLOPs = GMACs (conv+linear+scan) | + norms | scan part | paper |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p_params, p_flops = PAPER.get(r["model"], (None, None))
        print(f"| {r['model']} | {r['params']:,} ({r['params'] / 1e6:.2f}M) | {p_params or '-'}M | {r['gmacs']:.2f} "
              f"| {r['gmacs_norm']:.2f} | {r['scan_gmacs']:.3f} | {p_flops or '-'} |")
    out = args.json or (os.path.join(os.environ["OUT"], "flops.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
