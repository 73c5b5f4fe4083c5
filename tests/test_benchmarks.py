"""The benchmark scripts run end to end on CPU (smoke: arguments, tables, reports), so a GPU call is
not the first place they break. GPU-only options (--cuda-graph, --graph, --compile) are accepted here and
ignored or exercised only where the CPU allows."""
import os
import re
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def run_script(name, *args, tmp_path, env=None):
    env = dict(os.environ, OUT=str(tmp_path), **(env or {}))
    r = subprocess.run([sys.executable, os.path.join(BENCH, name), *args], capture_output=True, text=True,
                       timeout=300, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, f"{name} {args}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.parametrize("extra", [[], ["--no-ffn-recompute", "--cuda-graph"]])
def test_bench_models_cpu(tmp_path, extra):
    out = run_script("bench_models.py", "--device", "cpu", "--quick", "--baselines", "official-style",
                     "--baseline-iters", "1", "--baseline-warmup", "0", *extra, tmp_path=tmp_path)
    assert "| groupmamba_demo | fast | train_fp32 |" in out and "| groupmamba_demo | official-style |" in out
    assert (tmp_path / "bench_models.md").exists() and (tmp_path / "bench_models.json").exists()


def test_bench_layer_cpu(tmp_path):
    out = run_script("bench_layer.py", "--device", "cpu", "--quick", "--dtypes", "fp32,bf16", "--graph",
                     "--breakdown", tmp_path=tmp_path)
    assert "| Q 32@8x8 | fp32 |" in out and "| Q 64@4x4 | bf16 |" in out and "Error" not in out
    # the breakdown's chain of ops computes the layer's output: it times what the layer runs, no extra casts
    diffs = [float(v) for v in re.findall(r"chain vs layer max \|diff\| ([0-9.e+-]+)\)", out)]
    assert len(diffs) == 4 and max(diffs) < 1e-5, diffs
    assert (tmp_path / "bench_layer.md").exists()


def test_bench_dual_linear_cpu_interpreter(tmp_path):
    """bench_dual_linear.py's code path (both tables, the float64 checks) on CPU through the Triton
    interpreter, one image at T stage 1 in fp16: the GPU run is not the first place it breaks."""
    pytest.importorskip("triton")
    out = run_script("bench_dual_linear.py", "--device", "cpu", "--dtype", "fp16", "--batch", "1", "--shapes", "T1",
                     "--single", "--iters", "1", tmp_path=tmp_path, env={"TRITON_INTERPRET": "1"})
    rows = [line for line in out.splitlines() if line.startswith("| T1 | 64 |")]
    assert len(rows) == 2 and not any("err" in r or "failed" in r for r in rows), out
    assert (tmp_path / "bench_dual_linear.md").exists()
