"""Shared test helpers. GPU tests carry @pytest.mark.gpu and are skipped when CUDA is absent."""
import os
import subprocess
import sys

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine: benchmarks/device_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN/Inf anywhere gives inf (never passes)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


def float32_scan_tol(d: int) -> float:
    """Relative-error bound for float32 scan outputs and gradients with d channels per group: 1e-5, except
    d = 1. With one channel, each direction's parameter gradient is a single sum over the steps, not averaged
    over channels, and on draws where its terms cancel float32 loses more: the CPU kernel at (2, 7, 1, 1, 1)
    and (1, 1, 3, 1, 3, 7), 80000 draws, exceeded 1e-5 on 12 (at most 9.3e-5; a float32 evaluation of the
    reference lost 2e-5 - 3.5e-5 on the same draws). d = 2 and 3 stayed under 3.6e-6 in 30000 draws each."""
    return 1e-4 if d == 1 else 1e-5


def random_scan_inputs(B, H, W, d, N=1, R=None, dtype=torch.float64, param_dtype=None, device="cpu", seed=None):
    """Fresh random operands for grouped_scan with realistic magnitudes (delta ~ 0.01..1)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(torch.seed() if seed is None else seed)
    R = R if R is not None else max(1, -(-d // 16))
    param_dtype = param_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u = r(B, H, W, 4 * d)
    x_proj_weight = r(4, R + 2 * N, d) / d ** 0.5
    dt_proj_weight = r(4, d, R) / R ** 0.5
    dt_bias = torch.log(torch.expm1(torch.empty(4, d, dtype=torch.float64).uniform_(0.01, 0.5, generator=g)))
    A_log = torch.log(torch.empty(4, d, N, dtype=torch.float64).uniform_(0.5, N + 1.0, generator=g))
    D = r(4, d)
    params = [p.to(param_dtype).to(device) for p in (x_proj_weight, dt_proj_weight, dt_bias, A_log, D)]
    return [u.to(dtype).to(device)] + params


def poison_cuda_cache():
    """Fill the caching allocator's free blocks with NaN, so any output element left unwritten shows."""
    small = [torch.full((1 << 18,) if i % 2 else (1 << 16,), float("nan"), device="cuda") for i in range(64)]
    free, _ = torch.cuda.mem_get_info()
    big = torch.full((min(free // 4, 1 << 30) // 4,), float("nan"), device="cuda")
    del small, big
    torch.cuda.synchronize()


def eager_and_cuda_graph(fn):
    """(eager, graphed): fn() run once eagerly on a side stream (the warm-up of
    groupmamba.train.graph_step.capture), then captured in a CUDA graph and replayed once. fn must return
    tensors it allocates itself."""
    from groupmamba.train.graph_step import capture

    eager = []
    graph, graphed = capture(lambda: eager.append(fn()) or eager[-1], lambda: None, warmup=1)
    graph.replay()
    torch.cuda.synchronize()
    return eager[0], graphed


def run_triton_interpreter(test_file: str) -> None:
    """Runs ``test_file --interpret`` with TRITON_INTERPRET=1 in a subprocess (the variable must be set
    before Triton is imported); its checks print "interpreter checks passed" when all pass."""
    env = dict(os.environ, TRITON_INTERPRET="1", GROUPMAMBA_FORCE_REFERENCE="0")
    path = os.path.abspath(test_file)
    r = subprocess.run([sys.executable, path, "--interpret"], env=env, capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(path))
    assert r.returncode == 0, f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-8000:]}"
    assert "interpreter checks passed" in r.stdout


def compare_outputs(res: dict, ref: dict, tol: float, tol_wb: float, what: str) -> None:
    """Every entry of ref (outputs and gradients) against res: relative error <= tol, or <= tol_wb for
    the weight / bias gradients (sums over many rows; dx_bias: dwconv_act's x_bias), and the same shapes."""
    errs = {k: (rel_err(res[k], ref[k]), tol_wb if k in ("dweight", "dbias", "dx_bias") else tol) for k in ref}
    bad = {k: e for k, (e, t) in errs.items() if not e <= t}
    assert not bad, f"{what}: over tolerance {bad} (all: { {k: e for k, (e, _) in errs.items()} })"
    for k in ref:
        assert res[k].shape == ref[k].shape, (what, k, res[k].shape, ref[k].shape)
