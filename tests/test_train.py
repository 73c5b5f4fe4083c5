"""Training, resume, DDP, distillation and evaluation tests (CPU).

Most tests use the trainer's tiny ``standin`` model (same interface as GroupMamba) so the whole file stays
well under the CI budget; the demo test trains the real ``groupmamba_demo``.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from groupmamba.train import checkpoint as ckpt_mod
from groupmamba.train import config as config_mod
from groupmamba.train.data import DataError
from groupmamba.train.engine import NonFiniteLossError, Trainer, topk_correct
from groupmamba.train.losses import DistillationLoss, SoftTargetCE

PY = sys.executable


def cfg_for(tmp, *extra):
    base = ["--output", str(tmp), "--no-progress", "--no-tensorboard", "--log-interval", "1"]
    return config_mod.resolve(base + [str(e) for e in extra])


def fit(cfg):
    return Trainer(cfg).fit()


def state_of(path):
    return ckpt_mod.load(path)


def assert_same_training_state(a, b):
    for part in ("model", "model_ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), f"optimizer {i}.{k} differs"
    for k in ("epoch", "step_in_epoch", "global_step", "best_acc1", "best_acc1_ema"):
        assert a[k] == b[k], k


# Standin run that exercises every random source: mixup/cutmix (numpy/python RNG), dropout (torch RNG),
# per-sample augmentation (sample seeds).  8 steps per epoch (512 images, batch 64).
RESUME_ARGS = ["--demo", "--model", "standin", "--epochs", "2", "--batch-size", "64", "--limit-train", "512",
               "--limit-val", "128", "--mixup", "0.8",
               "--cutmix", "1.0", "--smoothing", "0.1", "--drop-rate", "0.2", "--warmup-epochs", "1"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ----------------------------------------------------------------------------------------------- demo
def test_demo_trains_and_loss_falls(tmp_path):
    cfg = cfg_for(tmp_path, "--demo", "--epochs", "1", "--max-steps", "8", "--batch-size", "16",
                  "--warmup-epochs", "0", "--lr", "3e-3")
    assert cfg["model"] == "groupmamba_demo" and cfg["img_size"] == 32 and cfg["distillation"] == "none"
    s = fit(cfg)
    assert s["global_step"] == 8 and s["stopped_early"]
    steps = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    losses = [r["loss"] for r in steps if r["type"] == "step"]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    ck = torch.load(tmp_path / "last.pth", weights_only=True)  # plain, weights-only loadable
    assert ck["global_step"] == 8 and isinstance(ck["config"], dict)


def test_config_file_and_cli_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("batch-size: 32\nlr: 1.0e-3\nepochs: 7\nmixup: 0.0\n")
    cfg = config_mod.resolve(["--data", "/x", "--config", str(y), "--epochs", "9", "--no-ema"])
    assert cfg["batch_size"] == 32 and cfg["lr"] == 1e-3 and cfg["epochs"] == 9 and cfg["ema"] is False
    assert cfg["mixup"] == 0.0 and cfg["cutmix"] == 1.0 and cfg["demo"] is False
    d = config_mod.resolve(["--data", "/x"])  # the official recipe
    assert (d["epochs"], d["lr"], d["weight_decay"], d["warmup_epochs"], d["clip_grad"]) == (300, 5e-4, 0.05, 20, 5.0)
    assert (d["mixup"], d["cutmix"], d["reprob"], d["smoothing"], d["ema_decay"]) == (0.8, 1.0, 0.25, 0.1, 0.9999)
    assert d["distillation"] == "hard" and d["batch_size"] == 128 and d["drop_path"] == 0.05
    y.write_text("no_such_setting: 1\n")
    with pytest.raises(ValueError, match="unknown setting"):
        config_mod.resolve(["--config", str(y)])


def test_lr_schedule_matches_recipe():
    from groupmamba.train.common import lr_at

    kw = dict(base_lr=1.0, warmup_lr=0.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == 0.0 and lr_at(5, **kw) == pytest.approx(0.5) and lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55) and lr_at(110, **kw) == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    fit(cfg_for(out, *RESUME_ARGS))
    return state_of(out / "last.pth")


@pytest.mark.parametrize("stop_at", [3, 8])  # mid-epoch and exactly at the epoch boundary
def test_resume_matches_uninterrupted(tmp_path, uninterrupted, stop_at):
    s1 = fit(cfg_for(tmp_path, *RESUME_ARGS, "--max-steps", stop_at))
    assert s1["global_step"] == stop_at
    mid = state_of(tmp_path / "last.pth")
    assert mid["global_step"] == stop_at
    s2 = fit(cfg_for(tmp_path, *RESUME_ARGS))  # auto-resume from <output>/last.pth
    assert s2["resumed_from"] and s2["global_step"] == 16
    assert_same_training_state(state_of(tmp_path / "last.pth"), uninterrupted)


# The killed run pauses after each checkpoint so the kill lands mid-run however fast the machine is (a CI
# run once finished all 16 steps between two polls).  The pause changes no result; the resumed run is plain.
PACED_TRAIN = """
import sys, time
from groupmamba.train import cli, engine
save_last = engine.Trainer.save_last
def paced(self):
    save_last(self)
    time.sleep(0.25)
engine.Trainer.save_last = paced
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigkill_and_resume_matches_uninterrupted(tmp_path, uninterrupted):
    """A real kill -9 at an arbitrary moment (checkpointing every step), then the same command again."""
    args = ["--output", str(tmp_path), "--no-progress", "--no-tensorboard", "--save-every-steps", "1", *RESUME_ARGS]
    cmd = [PY, "-m", "groupmamba.train", *args]
    env = dict(os.environ)  # same thread count as the in-process reference run, so float sums match bitwise
    p = subprocess.Popen([PY, "-c", PACED_TRAIN, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = tmp_path / "last.pth"
    deadline = time.time() + 120
    while time.time() < deadline:
        if last.exists():
            try:
                if state_of(last)["global_step"] >= 3:
                    break
            except Exception:  # noqa: BLE001 - never expected (atomic writes), but keep polling
                pass
        if p.poll() is not None:
            pytest.fail(f"training exited early: {p.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = state_of(last)["global_step"]
    assert 3 <= killed_at < 16
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert_same_training_state(state_of(last), uninterrupted)


# ----------------------------------------------------------------------------------------------- DDP
def test_ddp_two_ranks_end_identical(tmp_path):
    port = _free_port()
    dump = tmp_path / "dump"
    env = _env()
    env["GROUPMAMBA_TRAIN_DUMP_DIR"] = str(dump)
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "groupmamba.train", "--demo", "--model", "standin", "--epochs", "1", "--batch-size", "64",
           "--mixup", "0.8", "--cutmix", "1.0", "--drop-rate", "0.2", "--device", "cpu", "--limit-train", "512",
           "--limit-val", "64",
           "--output", str(tmp_path / "run"), "--no-progress", "--no-tensorboard"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "world 2" in r.stdout and r.stdout.count("Training summary") == 1  # only rank 0 prints
    p0 = torch.load(dump / "params_rank0.pt", weights_only=True)
    p1 = torch.load(dump / "params_rank1.pt", weights_only=True)
    ck = state_of(tmp_path / "run" / "last.pth")
    assert ck["global_step"] == 512 // 2 // 64 and len(ck["rng"]) == 2
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
        assert torch.equal(p0[k], ck["model"][k]), k


# ----------------------------------------------------------------------------------------------- distillation
class _Teacher(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.calls = []

    def forward(self, x):
        self.calls.append((torch.is_grad_enabled(), self.training))
        return self.logits


def _hand_log_softmax(z):
    return [[v - math.log(sum(math.exp(u) for u in row)) for v in row] for row in z]


def test_distillation_losses_match_hand_computation():
    torch.manual_seed(0)
    head = torch.randn(4, 5, requires_grad=True)
    dist = torch.randn(4, 5, requires_grad=True)
    t_logits = torch.randn(4, 5)
    y = torch.tensor([0, 3, 1, 4])
    alpha, tau = 0.5, 2.0
    teacher = _Teacher(t_logits).eval()
    x = torch.zeros(4, 3, 8, 8)

    ce = lambda z, lab: -sum(_hand_log_softmax(z)[i][lab[i]] for i in range(len(lab))) / len(lab)  # noqa: E731
    base = ce(head.tolist(), y.tolist())

    hard = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, "hard", alpha, tau)
    loss, parts = hard(x, (head, dist), y)
    t_arg = [max(range(5), key=lambda j: row[j]) for row in t_logits.tolist()]
    expect = (1 - alpha) * base + alpha * ce(dist.tolist(), t_arg)
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    loss.backward()
    assert head.grad is not None and dist.grad is not None
    assert teacher.calls[-1] == (False, False)  # no grad, eval mode

    soft = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, "soft", alpha, tau)
    loss, _ = soft(x, (head, dist), y)
    ls = _hand_log_softmax((dist / tau).tolist())
    lt = _hand_log_softmax((t_logits / tau).tolist())
    kl = sum(math.exp(lt[i][j]) * (lt[i][j] - ls[i][j]) for i in range(4) for j in range(5))
    expect = (1 - alpha) * base + alpha * kl * tau * tau / 20
    assert loss.item() == pytest.approx(expect, rel=1e-5)

    none = DistillationLoss(torch.nn.CrossEntropyLoss(), None, "none")
    assert none(x, head, y)[0].item() == pytest.approx(base, rel=1e-5)
    # with mixup targets the base loss is soft-target CE on the class head only
    soft_t = F.one_hot(y, 5).float() * 0.9 + 0.02
    assert SoftTargetCE()(head, soft_t).item() == pytest.approx(
        -(soft_t * F.log_softmax(head, -1)).sum(-1).mean().item(), rel=1e-6)


def test_training_with_teacher_file(tmp_path):
    """Hard distillation end to end with a timm teacher loaded from a local file ('resnet18' for speed)."""
    import timm

    tpath = tmp_path / "teacher.pth"
    torch.save({"model": timm.create_model("resnet18", pretrained=False, num_classes=10).state_dict()}, tpath)
    s = fit(cfg_for(tmp_path / "run", "--demo", "--model", "standin", "--epochs", "1", "--max-steps", "2",
                    "--distillation", "hard", "--teacher-model", "resnet18", "--teacher-path", tpath))
    assert s["global_step"] == 2
    with pytest.raises(FileNotFoundError, match="teacher checkpoint not found"):
        fit(cfg_for(tmp_path / "run2", "--demo", "--model", "standin", "--distillation", "hard",
                    "--teacher-path", tmp_path / "missing.pth"))


# ----------------------------------------------------------------------------------------------- evaluation
def test_topk_on_known_logits():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0],   # top1 = 1
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # ranks 0..5
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])  # ranks 5..0
    y = torch.tensor([1, 5, 4])
    assert topk_correct(logits, y, (1, 5)).tolist() == [1.0, 2.0]  # row1: label 5 is 6th -> miss at k=5


def _write_images(root, classes, per_class):
    from PIL import Image

    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (40, 30), (i * 20, 100, 50)).save(root / c / f"{i}.png")


def test_eval_cli_reports_controlled_topk(tmp_path):
    """A standin model whose output is a constant (zero head weights, chosen biases): top-k is known."""
    from groupmamba.train.common import StandInModel
    from groupmamba.train.evaluate import main as eval_main

    classes = [f"c{i}" for i in range(7)]
    _write_images(tmp_path / "data" / "val", classes, 2)
    m = StandInModel(num_classes=7, distillation=True)
    bias = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0])  # ranking: c0 > c1 > ... > c6
    with torch.no_grad():
        for h in (m.head, m.dist_head):
            h.weight.zero_()
            h.bias.copy_(bias)
    ck = tmp_path / "flat.pth"
    torch.save(m.state_dict(), ck)  # official-style flat state dict
    out = tmp_path / "res.json"
    rc = eval_main(["--checkpoint", str(ck), "--model", "standin", "--data", str(tmp_path / "data"),
                    "--img-size", "32", "--workers", "0", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["images"] == 14
    assert res["acc1"] == pytest.approx(100 / 7) and res["acc5"] == pytest.approx(500 / 7)


def test_eval_of_training_checkpoint_uses_ema(tmp_path, capsys):
    from groupmamba.train.evaluate import main as eval_main

    fit(cfg_for(tmp_path, "--demo", "--model", "standin", "--epochs", "1", "--batch-size", "128", "--limit-train", "512"))
    rc = eval_main(["--checkpoint", str(tmp_path / "last.pth"), "--json", str(tmp_path / "e.json")])
    assert rc == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["weights"] == "ema" and res["images"] == 359 and res["model"] == "standin"
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"epoch"' in line]
    ep = [r for r in log if r["type"] == "epoch"][-1]
    assert res["acc1"] == pytest.approx(ep["ema_acc1"])  # same number as the trainer's EMA evaluation
    from groupmamba.train.plot import main as plot_main

    assert plot_main([str(tmp_path)]) == 0 and (tmp_path / "curves.png").stat().st_size > 1000
    csv_lines = (tmp_path / "log.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,") and len(csv_lines) == 2


# ----------------------------------------------------------------------------------------------- robustness
def test_atomic_save_keeps_old_file_on_crash(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    ckpt_mod.atomic_save({"v": torch.tensor([1.0])}, str(path))
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        with open(f, "wb") as fh:  # atomic_save hands torch.save the temp file's path
            fh.write(b"partial garbage")
        raise OSError("disk full (simulated crash mid-write)")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        ckpt_mod.atomic_save({"v": torch.tensor([2.0])}, str(path))
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["v"].item() == 1.0
    assert os.listdir(tmp_path) == ["last.pth"]  # no temp file left behind


def test_bad_data_inputs(tmp_path):
    from groupmamba.train.cli import main as cli_main

    common = ["--model", "standin", "--output", str(tmp_path / "o"), "--no-progress", "--no-tensorboard",
              "--distillation", "none", "--workers", "0", "--batch-size", "2", "--img-size", "32"]
    assert cli_main(["--data", str(tmp_path / "nope"), *common]) == 2
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match="no class sub-folders"):
        Trainer(config_mod.resolve(["--data", str(tmp_path / "empty"), *common]))
    # an unreadable image: a clear error naming it, or skipped and counted with --bad-images skip
    root = tmp_path / "d"
    _write_images(root / "train", ["a", "b"], 2)
    _write_images(root / "val", ["a", "b"], 1)
    (root / "train" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    cfg = config_mod.resolve(["--data", str(root), *common, "--epochs", "1", "--reprob", "0", "--mixup", "0",
                              "--cutmix", "0", "--seed", "1", "--batch-size", "1"])  # every image is visited
    with pytest.raises(DataError, match="broken.jpg"):
        Trainer(cfg).fit()
    cfg["bad_images"], cfg["output"] = "skip", str(tmp_path / "o2")
    with pytest.warns(UserWarning, match="broken.jpg"):
        s = Trainer(cfg).fit()
    assert s["bad_images"] == 1
    assert cli_main(["--demo", "--model", "standin", "--distillation", "hard", "--teacher-path",
                     str(tmp_path / "missing.pth"), "--output", str(tmp_path / "o3")]) == 5


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = cfg_for(tmp_path, "--demo", "--model", "standin", "--epochs", "3", "--batch-size", "64",
                  "--limit-train", "704", "--limit-val", "64")  # 11 steps per epoch
    tr = Trainer(cfg)
    real = tr.criterion
    calls = {"n": 0}

    def poisoned(x, out, y):
        calls["n"] += 1
        loss, parts = real(x, out, y)
        return (loss * float("nan") if calls["n"] > 14 else loss), parts

    tr.criterion = poisoned
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        tr.fit()
    ck = state_of(tmp_path / "last.pth")
    assert ck["epoch"] == 1 and ck["global_step"] == 11
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_oom_gives_advice(tmp_path, monkeypatch, capsys):
    from groupmamba.train import cli, engine

    def oom(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine, "run", oom)
    rc = cli.main(["--demo", "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_OOM and "--batch-size" in err and "--grad-checkpointing" in err


# ----------------------------------------------------------------------------------------------- --cuda-graph
def test_cuda_graph_rejects_unsupported_settings(tmp_path):
    cfg = cfg_for(tmp_path, "--demo", "--model", "standin", "--device", "cpu", "--cuda-graph", "--accum-steps", "2",
                  "--grad-checkpointing")
    with pytest.raises(ValueError) as ei:
        Trainer(cfg)
    msg = str(ei.value)
    assert "--cuda-graph" in msg and "CUDA device" in msg and "--accum-steps" in msg and "--grad-checkpointing" in msg


@pytest.mark.gpu
def test_gpu_cuda_graph_training_matches_eager(tmp_path):
    """Four optimizer steps of groupmamba_demo (fp32, no random augmentation or dropout) replayed from one CUDA
    graph end with the weights, EMA and optimizer state of the same four eager steps. Differences come only from
    float rounding (kernel choices), so the bound is loose for state (1e-4 relative, norm-wise) but far below
    what a missed or repeated step moves (one AdamW step at lr 2e-3 changes the weights by ~1e-2 relative)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 16), ("val", 4)):
        for c in range(4):
            d = tmp_path / "data" / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                px = (torch.rand(36, 36, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(px).save(d / f"{i}.png")
    common = ["--data", tmp_path / "data", "--model", "groupmamba_demo", "--img-size", "32", "--batch-size", "16",
              "--workers", "0", "--epochs", "1", "--max-steps", "4", "--amp", "none", "--distillation", "none",
              "--auto-augment", "none", "--color-jitter", "0", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
              "--smoothing", "0", "--drop-path", "0", "--lr", "2e-3", "--no-scale-lr", "--warmup-epochs", "0",
              "--ema-decay", "0.5", "--device", "cuda"]
    runs = {}
    for name, extra in (("eager", []), ("graph", ["--cuda-graph"])):
        tr = Trainer(cfg_for(tmp_path / name, *common, *extra))
        tr.fit()
        if name == "graph":
            assert tr.graphed_step.graph is not None  # the steps really were replays
        runs[name] = state_of(tmp_path / name / "last.pth")
    init = Trainer(cfg_for(tmp_path / "init", *common)).model.state_dict()
    e, g = runs["eager"], runs["graph"]
    assert e["global_step"] == g["global_step"] == 4

    def rel(a, b):
        a, b = a.double().cpu(), b.double().cpu()
        return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()

    moved = [k for k in e["model"] if e["model"][k].is_floating_point() and rel(e["model"][k], init[k]) > 1e-3]
    assert len(moved) > 10  # the comparison below is not between untouched weights
    for part in ("model", "model_ema"):
        for k, v in e[part].items():
            if v.is_floating_point():
                assert torch.isfinite(g[part][k]).all(), f"{part}.{k} not finite"
                assert rel(g[part][k], v) <= 1e-4, f"{part}.{k}: {rel(g[part][k], v):.2e}"
    for i, st in e["optimizer"]["state"].items():
        for k, v in st.items():
            assert rel(torch.as_tensor(g["optimizer"]["state"][i][k]), torch.as_tensor(v)) <= 1e-4, f"opt {i}.{k}"


# ----------------------------------------------------------------------------------------------- flat parameters
def _small_net():
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 4 * 4, 10), torch.nn.LayerNorm(10))
    return net.to(memory_format=torch.channels_last)


def test_flat_params_step_equals_per_parameter_step():
    """AdamW over FlatParams' buffers gives the per-parameter run's weights and gradient norms; the parameters stay
    views of the buffers with their shapes and (channels_last) strides, and the state dict is unchanged."""
    from groupmamba.train.common import param_groups
    from groupmamba.train.flat_params import FlatParams

    nets = [_small_net(), _small_net()]
    before = {k: v.clone() for k, v in nets[0].state_dict().items()}
    strides = [p.stride() for p in nets[0].parameters()]
    flat = FlatParams(param_groups(nets[0], 0.05))
    assert [p.stride() for p in nets[0].parameters()] == strides
    assert all(torch.equal(before[k], v) for k, v in nets[0].state_dict().items())
    bufs = flat.buffers
    assert len(bufs) == 2 and sum(b.numel() for b in bufs) == sum(p.numel() for p in nets[0].parameters())
    for buf, params, _ in flat.groups:
        lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
        assert all(lo <= p.data_ptr() < hi for p in params)
    opts = [torch.optim.AdamW(flat.param_groups, lr=1e-2), torch.optim.AdamW(param_groups(nets[1], 0.05), lr=1e-2)]
    for step in range(3):
        x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(step))
        norms = []
        for i, (net, opt) in enumerate(zip(nets, opts)):
            net(x).square().mean().backward()
            if i == 0:
                flat.gather_grads()
            params = [p for g in opt.param_groups for p in g["params"]]
            # the norm over the buffers equals the per-parameter one (up to summation order); max_norm is
            # large so both runs scale by exactly 1 and the updates must agree bit for bit
            norms.append(torch.nn.utils.clip_grad_norm_(params, 1e9))
            opt.step()
            opt.zero_grad(set_to_none=True)
        flat.zero_grad()
        assert torch.allclose(norms[0], norms[1], rtol=1e-6, atol=0)
    for (k, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        assert torch.equal(a, b), (k, (a - b).abs().max().item())
    assert not torch.equal(nets[0][3].weight, before["3.weight"])        # the steps moved the weights


def test_resume_checks_flat_optimizer_state(tmp_path):
    fit(cfg_for(tmp_path, "--demo", "--model", "standin", "--epochs", "1", "--batch-size", "32", "--limit-train",
                "64", "--limit-val", "32", "--max-steps", "1"))
    with pytest.raises(ValueError, match="flat-params"):
        fit(cfg_for(tmp_path, "--demo", "--model", "standin", "--epochs", "1", "--batch-size", "32",
                    "--limit-train", "64", "--limit-val", "32", "--no-flat-params"))
