"""``groupmamba-eval`` / ``python -m groupmamba.eval``: top-1/top-5 of a checkpoint on a validation folder.

    groupmamba-eval --checkpoint groupmamba_tiny_ema.pth --model groupmamba_tiny --data /imagenet
    groupmamba-eval --checkpoint runs/gm/last.pth --data /imagenet          # model name read from the checkpoint
    groupmamba-eval --checkpoint runs/demo/best.pth --demo                 # digits validation split

Accepts the official flat state dicts ({'model': ...} or bare) and this trainer's checkpoints (EMA weights
by default when present; --no-ema for the raw weights).  Official eval transform: resize to img_size/0.875
(256 for 224), centre crop, bicubic, ImageNet mean/std.  Runs under torchrun too (exact sums over ranks).
"""
from __future__ import annotations

import argparse
import os
import json
import sys

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="groupmamba-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file (official or groupmamba-train)")
    p.add_argument("--data", default=None, help="validation folder of class folders, or an ImageNet root holding val/")
    p.add_argument("--demo", action="store_true", help="evaluate on the embedded digits validation split")
    p.add_argument("--model", default=None, help="model name (default: from the checkpoint's config, else groupmamba_tiny)")
    p.add_argument("--num-classes", type=int, default=None, help="default: from the checkpoint, else #class folders")
    p.add_argument("--img-size", type=int, default=None, help="default: checkpoint config, else 224 (32 for --demo)")
    p.add_argument("--crop-pct", type=float, default=0.875)
    p.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers (0 for --demo)")
    p.add_argument("--ema", dest="ema", action="store_true", default=True, help="use EMA weights when present")
    p.add_argument("--no-ema", dest="ema", action="store_false")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    return p


def _infer_num_classes(sd: dict) -> int | None:
    for k in ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight"):
        if k in sd and sd[k].ndim == 2:
            return int(sd[k].shape[0])
    return None


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    from .checkpoint import extract_model_state
    from .common import autocast_factory, create_student, init_distributed
    from .data import SeededDataset, ShardSampler, digits_splits, eval_transform, find_split, image_folder, make_loader
    from .engine import evaluate

    info = init_distributed(args.device)
    raw = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    ck_cfg = raw.get("config") if isinstance(raw, dict) and isinstance(raw.get("config"), dict) else {}
    sd = extract_model_state(raw, prefer_ema=args.ema)
    used_ema = args.ema and isinstance(raw, dict) and isinstance(raw.get("model_ema"), dict)
    demo = args.demo or (args.data is None and ck_cfg.get("demo", False))
    name = args.model or ck_cfg.get("model") or ("groupmamba_demo" if demo else "groupmamba_tiny")
    img_size = args.img_size or ck_cfg.get("img_size") or (32 if demo else 224)
    if demo:
        _, val, = digits_splits(img_size)
        ds = SeededDataset(val, None)
        n_folder = len(val.classes)
    else:
        if args.data is None:
            raise ValueError("pass --data (validation folder or ImageNet root) or --demo")
        base = image_folder(find_split(args.data, "val"), "validation")
        ds = SeededDataset(base, eval_transform(img_size, args.crop_pct, args.interpolation))
        n_folder = len(base.classes)
    num_classes = args.num_classes or _infer_num_classes(sd) or n_folder
    distill = any(k.startswith("dist_head") or ".dist_head" in k for k in sd)
    from .checkpoint import FORMAT

    ours = isinstance(raw, dict) and raw.get("format") == FORMAT
    if not ours and name != "standin":
        # official/foreign files: let the model package do its key remapping and strict loading
        import groupmamba

        model = groupmamba.create_model(name, checkpoint=args.checkpoint, num_classes=num_classes,
                                        distillation=distill, use_ema=used_ema)
    else:
        from groupmamba.models import load_state_dict_strict

        model = create_student(name, num_classes, distillation=distill)
        load_state_dict_strict(model, sd, source=args.checkpoint)
    model.to(info.device).eval()
    autocast, amp = autocast_factory(info.device, args.amp)
    pin = info.device.type == "cuda"
    workers = 0 if demo else args.workers
    loader = make_loader(ds, ShardSampler(len(ds), info.world, info.rank), args.batch_size, workers, pin,
                         drop_last=False)
    res = evaluate(model, loader, info, autocast)
    res.update(checkpoint=args.checkpoint, model=name, weights="ema" if used_ema else "model", images=res.pop("n"),
               num_classes=num_classes, img_size=img_size, amp=amp)
    return res


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data import DataError

    try:
        res = evaluate_checkpoint(args)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"groupmamba-eval: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{res['model']} ({res['weights']} weights) on {res['images']} images: "
              f"top-1 {res['acc1']:.2f}%  top-5 {res['acc5']:.2f}%  loss {res['loss']:.4f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
