"""Small fused-scan forward+backward calls for compute-sanitizer (memcheck, racecheck): benchmarks/device_scan.sh.
Each shape runs the plain scan and the scan with the gated out_norm (grouped_scan_norm)."""
import torch, groupmamba
from groupmamba.ops import grouped_scan, grouped_scan_norm
torch.manual_seed(0)
def run(B, H, W, d, N, dtype, chunk):
    R = max(1, -(-d // 16))
    u = torch.randn(B, H, W, 4 * d, device="cuda").to(dtype).requires_grad_()
    ps = [torch.randn(4, R + 2 * N, d) / d ** 0.5, torch.randn(4, d, R) / R ** 0.5, torch.full((4, d), -1.0),
          torch.zeros(4, d, N), torch.randn(4, d)]
    ps = [p.cuda().requires_grad_() for p in ps]
    y = grouped_scan(u, *ps, chunk=chunk)
    y.backward(torch.randn_like(y))
    z = torch.randn_like(u).requires_grad_()
    norm = [(1 + 0.1 * torch.randn(4, d)).cuda().requires_grad_(), (0.1 * torch.randn(4, d)).cuda().requires_grad_()]
    out = grouped_scan_norm(u, z, *ps, *norm, 1e-5, chunk=chunk)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
for args in [(2, 9, 7, 16, 1, torch.bfloat16, 16), (2, 5, 6, 87, 1, torch.float32, 8), (1, 4, 5, 3, 2, torch.float16, 3),
             (2, 7, 7, 128, 1, torch.bfloat16, 64), (2, 14, 14, 32, 1, torch.float32, 64),
             (2, 9, 11, 87, 1, torch.bfloat16, 12),  # forward segments of 28 steps, chunks of 12
             (2, 6, 7, 106, 1, torch.bfloat16, 32)]:  # two-element vectors (d even, not a multiple of 4)
    run(*args)
print("sanitize script done")
