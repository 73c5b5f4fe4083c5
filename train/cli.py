"""``groupmamba-train`` / ``python -m groupmamba.train``.

    groupmamba-train                                   # embedded digits demo on CPU (a few minutes)
    groupmamba-train --data /imagenet --teacher-path regnety_160.pth --output runs/gm_tiny
    torchrun --nproc_per_node 8 -m groupmamba.train --data /imagenet --teacher-path regnety_160.pth
    groupmamba-train --config my.yaml --batch-size 64  # YAML settings, CLI flags win
"""
from __future__ import annotations

import os
import sys

import torch

EXIT_DATA, EXIT_NAN, EXIT_OOM, EXIT_CONFIG = 2, 3, 4, 5


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _err(msg: str) -> None:
    if _rank0():
        print(f"\ngroupmamba-train: error: {msg}", file=sys.stderr, flush=True)


def _last_ckpt_note(cfg) -> str:
    p = os.path.join(cfg["output"], "last.pth") if cfg else None
    if p and os.path.exists(p):
        return f" The last good checkpoint is kept at {os.path.abspath(p)}; rerun the same command to resume from it."
    return " No checkpoint had been written yet."


def main(argv: list[str] | None = None) -> int:
    from . import config as config_mod
    from .data import DataError
    from .engine import NonFiniteLossError, run

    cfg = None
    try:
        cfg = config_mod.resolve(argv)
        run(cfg)
        return 0
    except DataError as e:
        _err(str(e))
        return EXIT_DATA
    except NonFiniteLossError as e:
        _err(str(e))
        return EXIT_NAN
    except torch.OutOfMemoryError as e:
        bs = cfg["batch_size"] if cfg else "?"
        _err(f"CUDA out of memory with --batch-size {bs} per GPU ({str(e).splitlines()[0]}). Try a smaller "
             "--batch-size (with --accum-steps to keep the global batch), --grad-checkpointing, or --amp bf16."
             + _last_ckpt_note(cfg))
        return EXIT_OOM
    except (FileNotFoundError, ValueError) as e:
        _err(str(e))
        return EXIT_CONFIG
    except KeyboardInterrupt:
        _err("interrupted." + _last_ckpt_note(cfg))
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
