"""The training loop.

Resume semantics: checkpoints record the epoch in progress and how many optimizer steps of it are done.
``last.pth`` is written at every epoch end (after evaluation) and, with ``--save-every-steps N``, every N
optimizer steps; ``--max-steps`` stops with a checkpoint.  A resumed run restores weights, EMA, optimizer,
grad scaler, step counters and every rank's RNG states, and its sampler starts at the recorded position of the
same epoch permutation, so it continues exactly as the uninterrupted run would have (bit-identical on CPU;
on GPU up to the usual non-determinism of CUDA kernels).  Only the epoch's running averages restart.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ckpt_mod
from .common import (EMA, DistInfo, all_reduce_sum, autocast_factory, barrier, build_teacher, create_student,
                     init_distributed, lr_at, param_groups)
from .data import ShardSampler, TrainSampler, build_datasets, make_loader
from .flat_params import FlatParams, check_optimizer_state, clear_grads
from .graph_step import GraphedStep, check_supported
from .losses import DistillationLoss, base_criterion
from .logs import NullLogger, RunLogger


class NonFiniteLossError(RuntimeError):
    pass


@torch.no_grad()
def evaluate(model: nn.Module, loader, info: DistInfo, autocast=contextlib.nullcontext, topk=(1, 5),
             channels_last: bool = False) -> dict:
    """Top-k accuracy (percent) and mean cross-entropy, summed exactly over ranks."""
    was_training = model.training
    model.eval()
    dev = info.device
    correct = torch.zeros(len(topk), dtype=torch.float64, device=dev)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    n = torch.zeros((), dtype=torch.float64, device=dev)
    for batch in loader:
        x, y = batch[0].to(dev, non_blocking=True), batch[1].to(dev, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            out = model(x)
        if isinstance(out, (tuple, list)):
            out = (out[0] + out[1]) / 2
        out = out.float()
        loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").double()
        correct += topk_correct(out, y, topk).to(dev)
        n += y.numel()
    for t in (correct, loss_sum, n):
        all_reduce_sum(t, info)
    model.train(was_training)
    total = max(n.item(), 1.0)
    res = {f"acc{k}": 100.0 * c / total for k, c in zip(topk, correct.tolist())}
    res.update(loss=loss_sum.item() / total, n=int(n.item()))
    return res


def topk_correct(logits: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> torch.Tensor:
    """Number of samples whose target is among the k highest logits, for each k (k capped at #classes)."""
    kmax = min(max(topk), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return torch.stack([hit[:, :min(k, kmax)].any(dim=1).sum() for k in topk]).double()


def _gather_rng(info: DistInfo) -> list:
    mine = ckpt_mod.rng_state()
    if not info.distributed:
        return [mine]
    import torch.distributed as dist

    out = [None] * info.world
    dist.all_gather_object(out, mine)
    return out


class Trainer:
    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.info = info = init_distributed(cfg["device"])
        self.dev = info.device
        torch.manual_seed(cfg["seed"])  # same initial weights on every rank
        np.random.seed(cfg["seed"])
        random.seed(cfg["seed"])

        self.train_ds, self.val_ds, n_cls = build_datasets(cfg)
        self.num_classes = cfg["num_classes"] or n_cls
        per_rank = len(self.train_ds) // info.world
        self.micro_per_step = cfg["accum_steps"]
        self.steps_per_epoch = per_rank // (cfg["batch_size"] * cfg["accum_steps"])
        if self.steps_per_epoch < 1:
            raise ValueError(f"training set too small: {len(self.train_ds)} images over {info.world} rank(s) do not "
                             f"fill one step of batch {cfg['batch_size']} x accum {cfg['accum_steps']}; "
                             "lower --batch-size")
        self.total_steps = self.steps_per_epoch * cfg["epochs"]
        self.global_batch = cfg["batch_size"] * info.world * cfg["accum_steps"]
        scale = self.global_batch / 512.0 if cfg["scale_lr"] else 1.0
        self.base_lr, self.warmup_lr, self.min_lr = cfg["lr"] * scale, cfg["warmup_lr"] * scale, cfg["min_lr"] * scale
        self.warmup_steps = int(round(self.steps_per_epoch * cfg["warmup_epochs"]))

        self.autocast, self.amp = autocast_factory(self.dev, cfg["amp"])
        if cfg["cuda_graph"]:
            check_supported(cfg, info.distributed, self.dev, self.amp)
        use_kd = cfg["distillation"] != "none"
        model = create_student(cfg["model"], self.num_classes, distillation=use_kd, drop_path=cfg["drop_path"],
                               drop_rate=cfg["drop_rate"], grad_checkpointing=cfg["grad_checkpointing"])
        if cfg["pretrained"]:
            sd = ckpt_mod.extract_model_state(ckpt_mod.load(cfg["pretrained"]))
            msg = model.load_state_dict(sd, strict=False)
            self._print(f"initialised from {cfg['pretrained']}: {msg}")
        model.to(self.dev)
        if cfg["channels_last"]:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema = EMA(model, cfg["ema_decay"]) if cfg["ema"] else None
        fused = self.dev.type == "cuda" and cfg["fused_adamw"]
        groups = param_groups(model, cfg["weight_decay"])
        # after every move of the model (FlatParams re-seats the parameters) and after the EMA's copy
        self.flat = FlatParams(groups) if cfg["flat_params"] and not cfg["compile"] else None
        self.optimizer = torch.optim.AdamW(self.flat.param_groups if self.flat else groups, lr=self.base_lr,
                                           betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"],
                                           **({"fused": True, "capturable": cfg["cuda_graph"]} if fused else {}))
        self.scaler = torch.amp.GradScaler(self.dev.type) if self.amp == "fp16" else None

        # state
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_acc1, self.best_acc1_ema = 0.0, 0.0
        self.resumed_from = None
        if info.is_main:
            os.makedirs(cfg["output"], exist_ok=True)
        self.last_path = os.path.join(cfg["output"], "last.pth")
        self.best_path = os.path.join(cfg["output"], "best.pth")
        self._maybe_resume()
        if self.resumed_from is None:  # per-rank streams for dropout/drop-path/mixup from here on
            torch.manual_seed(cfg["seed"] + info.rank)
            np.random.seed(cfg["seed"] + info.rank)
            random.seed(cfg["seed"] + info.rank)

        if info.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.dev.index] if self.dev.type == "cuda" else None)
        else:
            self.ddp = model
        self.forward_model = torch.compile(self.ddp) if cfg["compile"] else self.ddp

        teacher = None
        if use_kd:
            teacher = build_teacher(cfg["teacher_model"], cfg["teacher_path"], self.num_classes).to(self.dev)
            if cfg["channels_last"]:
                teacher.to(memory_format=torch.channels_last)
        mix_on = cfg["mixup"] > 0 or cfg["cutmix"] > 0
        self.mixup = None
        if mix_on:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], prob=cfg["mixup_prob"],
                               switch_prob=cfg["mixup_switch_prob"], mode=cfg["mixup_mode"],
                               label_smoothing=cfg["smoothing"], num_classes=self.num_classes)
        self.criterion = DistillationLoss(base_criterion(mix_on, cfg["smoothing"]), teacher, cfg["distillation"],
                                          cfg["distillation_alpha"], cfg["distillation_tau"],
                                          teacher_autocast=self.autocast if cfg["teacher_amp"] else None)
        # built after any resume: it points the optimizer's learning rate at a device tensor
        self.graphed_step = (GraphedStep(self.model, self.forward_model, self.criterion, self.optimizer,
                                         self.autocast, cfg["clip_grad"], flat=self.flat)
                             if cfg["cuda_graph"] else None)

        pin = cfg["pin_memory"] and self.dev.type == "cuda"
        self.train_sampler = TrainSampler(len(self.train_ds), info.world, info.rank, cfg["seed"])
        self.train_loader = make_loader(self.train_ds, self.train_sampler, cfg["batch_size"], cfg["workers"], pin,
                                        drop_last=True, seed=cfg["seed"])
        self.val_loader = make_loader(self.val_ds, ShardSampler(len(self.val_ds), info.world, info.rank),
                                      max(cfg["batch_size"], 1), cfg["workers"], pin, drop_last=False)
        self.logger = RunLogger(cfg["output"], cfg["tensorboard"]) if info.is_main else NullLogger()
        if info.is_main:
            import yaml

            with open(os.path.join(cfg["output"], "config.yaml"), "w") as f:
                yaml.safe_dump(cfg, f, sort_keys=False)

    # ------------------------------------------------------------------------------------------- helpers
    def _print(self, *a):
        if self.info.is_main:
            print(*a, flush=True)

    def _maybe_resume(self):
        cfg = self.cfg
        path = cfg["resume"]
        if not path and cfg["auto_resume"] and os.path.isfile(self.last_path):
            path = self.last_path
        if not path:
            return
        ck = ckpt_mod.load(path)
        if ck.get("format") != ckpt_mod.FORMAT:
            raise ValueError(f"{path} is not a training checkpoint of this trainer (use --pretrained for weights)")
        self.model.load_state_dict(ck["model"])
        if self.ema is not None:
            if ck.get("model_ema") is not None:
                self.ema.load_state_dict(ck["model_ema"])
            else:
                self.ema.module.load_state_dict(ck["model"])
        check_optimizer_state(self.optimizer, ck["optimizer"], self.flat is not None, path)
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.step_in_epoch = ck["epoch"], ck["step_in_epoch"]
        self.global_step = ck["global_step"]
        self.best_acc1, self.best_acc1_ema = ck["best_acc1"], ck["best_acc1_ema"]
        rngs = ck.get("rng") or []
        if len(rngs) == self.info.world:
            ckpt_mod.set_rng_state(rngs[self.info.rank])
        else:
            self._print(f"note: checkpoint has RNG states for {len(rngs)} rank(s), this run has {self.info.world}; "
                        "continuing with fresh RNG streams (training resumes, but not bit-exactly)")
            torch.manual_seed(cfg["seed"] + self.info.rank + 7919 * self.global_step)
        self.resumed_from = path
        self._print(f"resumed from {path}: epoch {self.epoch}, step {self.step_in_epoch}/{self.steps_per_epoch} "
                    f"of it, global step {self.global_step}")

    def state(self) -> dict:
        return {
            "format": ckpt_mod.FORMAT,
            "model": self.model.state_dict(),
            "model_ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "scheduler": {"step": self.global_step, "total_steps": self.total_steps},
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_acc1": self.best_acc1,
            "best_acc1_ema": self.best_acc1_ema,
            "config": dict(self.cfg),
        }

    def save_last(self):
        rng = _gather_rng(self.info)  # collective: every rank joins
        if self.info.is_main:
            st = self.state()
            st["rng"] = rng
            ckpt_mod.atomic_save(st, self.last_path)
        barrier(self.info)

    def _check_finite(self, flag: torch.Tensor):
        bad = all_reduce_sum(flag.clone(), self.info).item()
        if bad:
            raise NonFiniteLossError(
                f"loss became NaN/Inf near global step {self.global_step} (epoch {self.epoch}). Stopped without "
                f"saving; the last good checkpoint is {self.last_path if os.path.exists(self.last_path) else 'none'}. "
                "Try a lower --lr, --amp bf16/none instead of fp16, or a smaller --clip-grad.")

    def _graph_would_work(self) -> bool:
        try:
            check_supported(self.cfg, self.info.distributed, self.dev, self.amp)
        except ValueError:
            return False
        return True

    # ------------------------------------------------------------------------------------------- steps
    def _next_batch(self, it):
        """The next training batch on the device, mixed when mixup/cutmix is on; also its unreadable-image count."""
        x, y, bad = next(it)
        x = x.to(self.dev, non_blocking=True)
        y = y.to(self.dev, non_blocking=True)
        if self.cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        return x, y, int(bad.sum())

    def _graph_step(self, it, lr, loss_acc, gn_acc, nonfinite):
        """One optimizer step as a CUDA-graph replay (--cuda-graph); same contract as _eager_step."""
        x, y, nbad = self._next_batch(it)
        loss, gn = self.graphed_step(x, y, lr)
        loss_acc += loss
        nonfinite += (~torch.isfinite(loss)).float()
        if self.cfg["clip_grad"] > 0:
            gn_acc += gn.float()
        return nbad, x.shape[0] * self.info.world

    def _eager_step(self, it, lr, loss_acc, gn_acc, nonfinite):
        """One optimizer step over micro_per_step batches. Adds the loss, gradient norm and non-finite count into
        the running sums in place; returns (unreadable images, images seen by all ranks)."""
        cfg, info = self.cfg, self.info
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        nbad = nimages = 0
        for micro in range(self.micro_per_step):
            x, y, bad = self._next_batch(it)
            nbad += bad
            sync = (not info.distributed or micro == self.micro_per_step - 1)
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with ctx:
                with self.autocast():
                    out = self.forward_model(x)
                loss, _ = self.criterion(x, out, y)
                scaled = loss / self.micro_per_step
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            loss_acc += loss.detach() / self.micro_per_step
            nonfinite += (~torch.isfinite(loss.detach())).float()
            nimages += x.shape[0] * info.world
        if self.flat is not None:
            self.flat.gather_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg["clip_grad"] > 0:  # over the optimizer's parameters: the flat buffers under --flat-params
            opt_params = [p for g in self.optimizer.param_groups for p in g["params"]]
            gn = torch.nn.utils.clip_grad_norm_(opt_params, cfg["clip_grad"])
            gn_acc += gn.detach().float()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        clear_grads(self.optimizer, self.flat)
        return nbad, nimages

    # ------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        cfg, info = self.cfg, self.info
        self._print(f"training {cfg['model']} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params) "
                    f"on {len(self.train_ds)} images, {self.num_classes} classes; world {info.world} on "
                    f"{self.dev.type}; global batch {self.global_batch}; lr {self.base_lr:.3g}; amp {self.amp}; "
                    f"distillation {cfg['distillation']}; {self.steps_per_epoch} steps/epoch x {cfg['epochs']} epochs")
        if self.graphed_step is None and self._graph_would_work():
            self._print("tip: --cuda-graph replays the whole step from one CUDA graph (about 2x faster here; README)")
        t_start = time.time()
        train_time, train_images = 0.0, 0
        stopped_early = False
        bad_images_total = 0
        last_eval: dict = {}
        while self.epoch < cfg["epochs"]:
            epoch = self.epoch
            self.train_sampler.set_epoch(epoch)
            self.train_sampler.set_start(self.step_in_epoch * cfg["batch_size"] * self.micro_per_step)
            self.ddp.train()
            t_epoch = time.time()
            ep_images = 0
            loss_acc = torch.zeros((), device=self.dev)
            gn_acc = torch.zeros((), device=self.dev)
            nonfinite = torch.zeros((), device=self.dev)
            ep_loss_sum, ep_loss_n, win_n, win_t = 0.0, 0, 0, time.time()
            bar = None
            if info.is_main and cfg["progress"]:
                from tqdm import tqdm

                bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, unit="step", dynamic_ncols=True,
                           desc=f"epoch {epoch + 1}/{cfg['epochs']}", mininterval=1.0)
            it = iter(self.train_loader)
            hit_max = False
            while self.step_in_epoch < self.steps_per_epoch:
                lr = lr_at(self.global_step, self.base_lr, self.warmup_lr, self.min_lr, self.warmup_steps,
                           self.total_steps)
                step = self._eager_step if self.graphed_step is None else self._graph_step
                nbad, nimages = step(it, lr, loss_acc, gn_acc, nonfinite)
                bad_images_total += nbad
                ep_images += nimages
                if self.ema is not None:
                    self.ema.update(self.model)
                self.global_step += 1
                self.step_in_epoch += 1
                win_n += 1
                if bar is not None:
                    bar.update(1)

                end_of_epoch = self.step_in_epoch == self.steps_per_epoch
                hit_max = cfg["max_steps"] > 0 and self.global_step >= cfg["max_steps"]
                save_now = cfg["save_every_steps"] > 0 and self.global_step % cfg["save_every_steps"] == 0
                if win_n >= cfg["log_interval"] or end_of_epoch or hit_max or save_now:
                    self._check_finite(nonfinite)
                    stats = torch.stack([loss_acc, gn_acc])
                    all_reduce_sum(stats, info)
                    mean_loss = stats[0].item() / (win_n * info.world)
                    mean_gn = stats[1].item() / (win_n * info.world)
                    now = time.time()
                    ips = win_n * self.global_batch / max(now - win_t, 1e-9)
                    ep_loss_sum += mean_loss * win_n
                    ep_loss_n += win_n
                    self.logger.log({"type": "step", "epoch": epoch, "global_step": self.global_step, "lr": lr,
                                     "loss": mean_loss, "grad_norm": mean_gn if cfg["clip_grad"] > 0 else None,
                                     "img_per_s": ips})
                    if bar is not None:
                        remaining = (self.total_steps - self.global_step) * (now - win_t) / win_n
                        bar.set_postfix_str(f"loss {mean_loss:.4f} lr {lr:.2e} {ips:.0f} img/s "
                                            f"total ETA {_fmt_time(remaining)}", refresh=False)
                    loss_acc.zero_()
                    gn_acc.zero_()
                    win_n, win_t = 0, now
                if save_now and not end_of_epoch:
                    self.save_last()
                if hit_max and not end_of_epoch:
                    break
            if bar is not None:
                bar.close()
            ep_time = time.time() - t_epoch
            train_time += ep_time
            train_images += ep_images
            if hit_max and self.step_in_epoch < self.steps_per_epoch:
                self.save_last()
                stopped_early = True
                self._print(f"stopped at --max-steps {cfg['max_steps']} (epoch {epoch + 1}, step "
                            f"{self.step_in_epoch}/{self.steps_per_epoch}); checkpoint {self.last_path}")
                break

            # epoch end: evaluate, then checkpoint the next epoch's start
            self.epoch, self.step_in_epoch = epoch + 1, 0
            rec = {"type": "epoch", "epoch": epoch + 1, "global_step": self.global_step,
                   "train_loss": ep_loss_sum / max(ep_loss_n, 1), "lr": lr, "epoch_time_s": ep_time,
                   "train_img_per_s": ep_images / max(ep_time, 1e-9), "bad_images": bad_images_total}
            improved = False
            if (epoch + 1) % cfg["eval_every"] == 0 or self.epoch == cfg["epochs"]:
                ev = evaluate(self.ddp, self.val_loader, info, self.autocast, channels_last=cfg["channels_last"])
                rec.update(val_acc1=ev["acc1"], val_acc5=ev["acc5"], val_loss=ev["loss"])
                if ev["acc1"] > self.best_acc1:
                    self.best_acc1, improved = ev["acc1"], True
                if self.ema is not None:
                    ee = evaluate(self.ema.module, self.val_loader, info, self.autocast,
                                  channels_last=cfg["channels_last"])
                    rec.update(ema_acc1=ee["acc1"], ema_acc5=ee["acc5"], ema_loss=ee["loss"])
                    if ee["acc1"] > self.best_acc1_ema:
                        self.best_acc1_ema, improved = ee["acc1"], True
                last_eval = rec
            self.logger.log(rec)
            self._print(_epoch_line(rec, cfg["epochs"]))
            self.save_last()
            if improved and info.is_main:
                st = {k: v for k, v in self.state().items() if k not in ("optimizer", "scaler")}
                ckpt_mod.atomic_save(st, self.best_path)
            if hit_max and self.epoch < cfg["epochs"]:
                stopped_early = True
                self._print(f"stopped at --max-steps {cfg['max_steps']}; checkpoint {self.last_path}")
                break

        total = time.time() - t_start
        summary = {
            "model": cfg["model"], "epochs_done": self.epoch, "epochs": cfg["epochs"],
            "global_step": self.global_step, "stopped_early": stopped_early,
            "best_acc1": self.best_acc1, "best_acc1_ema": self.best_acc1_ema if self.ema is not None else None,
            "last_val": {k: v for k, v in last_eval.items() if k.startswith(("val_", "ema_"))},
            "wall_time_s": total, "train_time_s": train_time,
            "train_img_per_s": train_images / max(train_time, 1e-9),
            "world_size": info.world, "device": self.dev.type, "amp": self.amp, "bad_images": bad_images_total,
            "last_checkpoint": os.path.abspath(self.last_path),
            "best_checkpoint": os.path.abspath(self.best_path) if os.path.exists(self.best_path) else None,
            "resumed_from": self.resumed_from, "output": os.path.abspath(cfg["output"]),
        }
        if info.is_main:
            with open(os.path.join(cfg["output"], "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        self._dump_params_for_tests()
        self.logger.close()
        return summary

    def _dump_params_for_tests(self):
        d = os.environ.get("GROUPMAMBA_TRAIN_DUMP_DIR")
        if d:
            os.makedirs(d, exist_ok=True)
            sd = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            torch.save(sd, os.path.join(d, f"params_rank{self.info.rank}.pt"))


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    h, r = divmod(s, 3600)
    m, sec = divmod(r, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _epoch_line(rec: dict, epochs: int) -> str:
    parts = [f"epoch {rec['epoch']}/{epochs}", f"train loss {rec['train_loss']:.4f}"]
    if "val_acc1" in rec:
        parts.append(f"val top-1 {rec['val_acc1']:.2f}% top-5 {rec['val_acc5']:.2f}%")
    if "ema_acc1" in rec:
        parts.append(f"EMA top-1 {rec['ema_acc1']:.2f}%")
    parts.append(f"{rec['train_img_per_s']:.0f} img/s, {_fmt_time(rec['epoch_time_s'])}")
    return " | ".join(parts)


def format_summary(s: dict) -> str:
    lines = ["", "=" * 72, "Training summary", "=" * 72,
             f"model              {s['model']}",
             f"epochs             {s['epochs_done']}/{s['epochs']} (global step {s['global_step']})"
             + ("  [stopped early at --max-steps]" if s["stopped_early"] else ""),
             f"best top-1         {s['best_acc1']:.2f}%" + (f"   (EMA {s['best_acc1_ema']:.2f}%)"
                                                            if s["best_acc1_ema"] is not None else "")]
    lv = s.get("last_val") or {}
    if "val_acc1" in lv:
        lines.append(f"final top-1/top-5  {lv['val_acc1']:.2f}% / {lv['val_acc5']:.2f}%")
    lines += [f"time               {_fmt_time(s['wall_time_s'])} wall, {_fmt_time(s['train_time_s'])} training",
              f"throughput         {s['train_img_per_s']:.1f} images/s ({s['world_size']} x {s['device']}, "
              f"amp {s['amp']})",
              f"last checkpoint    {s['last_checkpoint']}",
              f"best checkpoint    {s['best_checkpoint']}",
              f"logs               {s['output']}/log.jsonl, log.csv, tb/  (plot: groupmamba-plot {s['output']})"]
    if s.get("bad_images"):
        lines.append(f"skipped images     {s['bad_images']} unreadable")
    lines.append("=" * 72)
    return "\n".join(lines)


def run(cfg: dict[str, Any]) -> dict:
    trainer = Trainer(cfg)
    summary = trainer.fit()
    if trainer.info.is_main:
        print(format_summary(summary), flush=True)
    return summary
