"""`import groupmamba` without the compiled extension: one clear warning, every op on the reference."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import importlib.abc, sys, warnings

    class BlockNative(importlib.abc.MetaPathFinder):   # as if groupmamba._C was never built
        def find_spec(self, name, path=None, target=None):
            if name == "groupmamba._C":
                raise ImportError("simulated: no compiled extension")

    sys.meta_path.insert(0, BlockNative())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, groupmamba
        from groupmamba.ops import grouped_scan, grouped_scan_reference
        torch.manual_seed(0)
        u = torch.randn(1, 3, 4, 8, requires_grad=True)
        ps = [torch.randn(4, 3, 2) * 0.3, torch.randn(4, 2, 1) * 0.3, torch.zeros(4, 2), torch.zeros(4, 2, 1),
              torch.ones(4, 2)]
        y = grouped_scan(u, *ps)
        y.sum().backward()
        assert torch.equal(y, grouped_scan_reference(u, *ps)), "fallback must be the reference"
        assert u.grad is not None and torch.isfinite(u.grad).all()
        model = groupmamba.create_model("groupmamba_demo", num_classes=10).eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, 32, 32))
        assert out.shape == (1, 10) and torch.isfinite(out).all()
        grouped_scan(u, *ps)   # a second call must not warn again
    native = [w for w in caught if "native extension unavailable" in str(w.message)]
    assert len(native) == 1, [str(w.message) for w in caught]
    assert "simulated: no compiled extension" in str(native[0].message)
    print("fallback ok")
""")


def test_import_and_ops_without_extension():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fallback ok" in r.stdout
