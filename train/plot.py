"""``groupmamba-plot RUN_DIR_OR_LOG.jsonl [-o curves.png]``: loss, accuracy and learning-rate curves."""
from __future__ import annotations

import argparse
import json
import os
import sys


def read_log(path: str):
    """Step and epoch records; a resumed run re-logs some steps, so the last record per step/epoch wins."""
    steps, epochs = {}, {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if r.get("type") == "step":
                steps[r["global_step"]] = r
            elif r.get("type") == "epoch":
                epochs[r["epoch"]] = r
    return [steps[k] for k in sorted(steps)], [epochs[k] for k in sorted(epochs)]


def plot(log_path: str, out_path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, epochs = read_log(log_path)
    if not steps and not epochs:
        raise ValueError(f"no training records in {log_path}")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    if steps:
        ax.plot([r["global_step"] for r in steps], [r["loss"] for r in steps], label="train loss (steps)", lw=1)
    ev = [r for r in epochs if r.get("val_loss") is not None]
    if ev:
        ax.plot([r["global_step"] for r in ev], [r["val_loss"] for r in ev], "o-", label="val loss")
    ax.set_xlabel("optimizer step"), ax.set_ylabel("loss"), ax.set_title("loss"), ax.legend()
    ax = axes[1]
    for key, lab in (("val_acc1", "top-1"), ("val_acc5", "top-5"), ("ema_acc1", "EMA top-1")):
        pts = [(r["epoch"], r[key]) for r in epochs if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", label=lab)
    ax.set_xlabel("epoch"), ax.set_ylabel("accuracy (%)"), ax.set_title("validation accuracy")
    if ax.lines:
        ax.legend()
    ax = axes[2]
    if steps:
        ax.plot([r["global_step"] for r in steps], [r["lr"] for r in steps])
    ax.set_xlabel("optimizer step"), ax.set_ylabel("learning rate"), ax.set_title("learning rate")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="groupmamba-plot", description=__doc__)
    p.add_argument("log", help="run folder (holding log.jsonl) or a log.jsonl file")
    p.add_argument("-o", "--output", default=None, help="PNG path (default: <run>/curves.png)")
    a = p.parse_args(argv)
    path = os.path.join(a.log, "log.jsonl") if os.path.isdir(a.log) else a.log
    if not os.path.isfile(path):
        print(f"groupmamba-plot: error: no log found at {path}", file=sys.stderr)
        return 2
    out = a.output or os.path.join(os.path.dirname(os.path.abspath(path)), "curves.png")
    try:
        plot(path, out)
    except ValueError as e:
        print(f"groupmamba-plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
