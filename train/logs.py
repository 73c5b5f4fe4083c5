"""Rank-0 run logging: JSONL (every record), CSV (one row per epoch), TensorBoard (scalars)."""
from __future__ import annotations

import csv
import json
import os
import time

EPOCH_FIELDS = ["epoch", "global_step", "train_loss", "lr", "val_acc1", "val_acc5", "val_loss", "ema_acc1",
                "ema_acc5", "ema_loss", "epoch_time_s", "train_img_per_s", "bad_images", "time"]


class RunLogger:
    def __init__(self, output: str, tensorboard: bool = True):
        os.makedirs(output, exist_ok=True)
        self.jsonl_path = os.path.join(output, "log.jsonl")
        self.csv_path = os.path.join(output, "log.csv")
        self._jsonl = open(self.jsonl_path, "a", buffering=1)
        new_csv = not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0
        self._csv_f = open(self.csv_path, "a", newline="", buffering=1)
        self._csv = csv.DictWriter(self._csv_f, fieldnames=EPOCH_FIELDS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output, "tb"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None

    def log(self, record: dict) -> None:
        record = {**record, "time": round(time.time(), 3)}
        self._jsonl.write(json.dumps(record) + "\n")
        kind = record.get("type")
        if kind == "epoch":
            self._csv.writerow(record)
        if self.tb is not None:
            step = record.get("global_step", 0)
            prefix = "train" if kind == "step" else kind
            for k, v in record.items():
                if k in ("type", "time", "global_step", "epoch") or not isinstance(v, (int, float)) or v is None:
                    continue
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        self._jsonl.close()
        self._csv_f.close()
        if self.tb is not None:
            self.tb.close()


class NullLogger:
    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
