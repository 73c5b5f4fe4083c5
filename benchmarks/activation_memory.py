"""Where GroupMamba's training memory goes: bytes saved for backward, by module, on any device.

    python benchmarks/activation_memory.py                      # groupmamba_tiny, CPU, bf16 autocast
    python benchmarks/activation_memory.py --model groupmamba_base --batch 2 --scale-to 128

Counts every tensor autograd saves during one forward (each storage once, parameters excluded) and
charges it to the innermost module (up to --depth levels below the model) running when it was saved.
The bytes are what the backward will hold, so they predict the activation part of the peak GPU memory
without a GPU. Caveat: on CPU the channel-modulation ops run the PyTorch reference, which saves a few
more tensors than the fused CUDA/Triton path.
"""
from __future__ import annotations

import argparse
import collections

import torch

import groupmamba


def saved_bytes_by_module(model, x, amp_dtype, depth: int):
    stack = ["(model)"]
    for name, mod in model.named_modules():
        if name and name.count(".") < depth:
            mod.register_forward_pre_hook(lambda m, i, name=name: stack.append(name))
            mod.register_forward_hook(lambda m, i, o: (stack.pop(), None)[1])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, by_module = set(), collections.Counter()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            # blockN.M.attn.x -> blockN.attn.x: sum over the blocks of a stage
            by_module[".".join(p for p in stack[-1].split(".") if not p.isdigit())] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        model(x)
    return by_module


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="groupmamba_tiny")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--scale-to", type=int, default=128, help="report bytes scaled to this batch size")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--amp", choices=("bf16", "fp16", "none"), default="bf16")
    ap.add_argument("--depth", type=int, default=4, help="module levels to attribute to")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = groupmamba.create_model(args.model).to(args.device).train()
    x = torch.randn(args.batch, 3, args.img, args.img, device=args.device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
    by_module = saved_bytes_by_module(model, x, amp, args.depth)
    scale = args.scale_to / args.batch
    total = sum(by_module.values()) * scale
    print(f"{args.model}, {args.img}x{args.img}, amp {args.amp}, measured at batch {args.batch} on {args.device}, "
          f"scaled to batch {args.scale_to}: {total / 2**30:.2f} GiB saved for backward")
    print("\n| module (summed over a stage's blocks) | GiB | share |\n|---|---|---|")
    for name, nbytes in by_module.most_common(args.top):
        print(f"| {name} | {nbytes * scale / 2**30:.2f} | {nbytes * scale / total:.0%} |")


if __name__ == "__main__":
    main()
