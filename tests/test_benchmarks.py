"""The benchmark scripts run end to end on CPU (smoke: arguments, tables, reports), so a GPU call is
not the first place they break. GPU-only options (--cuda-graph, --graph, --compile) are accepted here and
ignored or exercised only where the CPU allows."""
import os
import re
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def run_script(name, *args, tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
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
