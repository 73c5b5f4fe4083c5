"""models/group_weights.py: the four groups' parameters packed by one autograd node equal their stacking
by separate torch ops (values and gradients, bitwise: the same elements are copied and cast), and each parameter's
gradient lands contiguous in its own layout (so autograd stores it without another copy).

CPU only: the op is plain torch copies on any device; the fused CUDA model tests (test_models.py,
test_train.py) run it on the GPU."""
import pytest
import torch

from groupmamba.models.group_weights import block_diagonal, group_parameters, pack_group_weights, scan_params
from groupmamba.models.mixer import GroupMambaLayer

GROUPS = 4


def _layer(C: int, seed: int) -> GroupMambaLayer:
    torch.manual_seed(seed)
    layer = GroupMambaLayer(C, proj_impl="blockdiag")
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer


def _unpacked(layer, dtype):
    """The same tensors as the methods build them without the pack."""
    gs = layer.groups
    d = layer.dim // GROUPS
    w_in = torch.stack([g.in_proj.weight for g in gs])
    w_xz = block_diagonal(w_in.view(GROUPS, 2, d, d).transpose(0, 1)).to(dtype)
    w_out = block_diagonal(torch.stack([g.out_proj.weight for g in gs])).to(dtype)
    conv_w = torch.cat([g.conv2d.weight for g in gs])
    conv_b = torch.cat([g.conv2d.bias for g in gs])
    norm = [torch.stack([getattr(g.out_norm, n) for g in gs]) for n in ("weight", "bias")]
    return (w_xz[0], w_xz[1], w_out, conv_w, conv_b, *scan_params(gs, conv_w), *norm)


@pytest.mark.filterwarnings("ignore:Initializing zero-element")  # C = 4: the modulation's fc1 has 4 // 16 = 0 outputs
@pytest.mark.parametrize("C,dtype", [(32, torch.float32), (96, torch.bfloat16), (4, torch.float16)])
def test_pack_equals_stacking_values_and_gradients(C, dtype):
    layer = _layer(C, seed=C)
    params = group_parameters(layer.groups)
    assert len(params) == 44 and len({id(p) for p in params}) == 44
    packed = pack_group_weights(layer.groups, dtype)
    want = _unpacked(layer, dtype)
    assert len(packed) == len(want)
    for name, got, ref in zip(packed._fields, packed, want):
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        assert torch.equal(got, ref), name
    # random output gradients through both: every parameter's gradient must match bitwise
    gen = torch.Generator().manual_seed(C + 1)
    gouts = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in want]
    g_packed = torch.autograd.grad(packed, params, gouts)
    g_ref = torch.autograd.grad(_unpacked(layer, dtype), params, gouts)
    for p, a, b in zip(params, g_packed, g_ref):
        assert a.shape == p.shape and a.dtype == p.dtype and torch.equal(a, b)
        assert a.stride() == p.stride()   # stored as .grad without a copy


def test_pack_backward_with_unused_outputs():
    layer = _layer(32, seed=3)
    packed = pack_group_weights(layer.groups, torch.float32)
    # only the scan parameters and w_z reach the loss: the others' gradient parts must be zeros
    loss = packed.x_proj.square().sum() + packed.w_z.sum()
    loss.backward()
    g1 = layer.mamba_g1
    assert torch.equal(g1.x_proj_weight.grad, 2 * g1.x_proj_weight.detach())
    assert torch.count_nonzero(g1.conv2d.weight.grad) == 0 and torch.count_nonzero(g1.out_proj.weight.grad) == 0
    d = 8
    assert torch.equal(g1.in_proj.weight.grad[:d], torch.zeros(d, d))
    assert torch.equal(g1.in_proj.weight.grad[d:], torch.ones(d, d))


def test_layer_output_and_gradients_unchanged_by_pack():
    """The whole mixer with and without the pack (proj_impl="blockdiag", bf16 autocast on CPU)."""
    x = torch.randn(2, 30, 32)
    results = []
    for use_pack in (True, False):
        layer = _layer(32, seed=5)
        if not use_pack:
            layer._packed_weights = lambda x: None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x, 6, 5)
        y.float().square().sum().backward()
        results.append((y.detach(), [p.grad.clone() for p in layer.parameters()]))
    (y1, g1), (y2, g2) = results
    assert torch.equal(y1, y2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_pack_rejects_other_dtypes():
    layer = _layer(32, seed=7).double()
    with pytest.raises(ValueError, match="float32"):
        pack_group_weights(layer.groups, torch.float64)
