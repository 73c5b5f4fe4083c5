"""bn_relu(bn, x): relu(bn(x)) for an nn.BatchNorm2d, on triton_batchnorm's fused kernels where they apply.

Fused: CUDA, x channels_last, a plain affine nn.BatchNorm2d with running statistics and a momentum (the
stem's layers), Triton importable, not under torch.compile, GROUPMAMBA_FORCE_REFERENCE unset. Otherwise
relu(bn(x)) with torch's modules, which also keeps subclasses (SyncBatchNorm) doing their own thing.
The fused path updates running_mean / running_var / num_batches_tracked as nn.BatchNorm2d does.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _native

try:
    from .triton_batchnorm import batch_norm_relu
except Exception:  # noqa: BLE001  (ImportError, or a Triton/torch version mismatch)
    batch_norm_relu = None


def _fusable(bn: nn.Module, x: torch.Tensor) -> bool:
    return (batch_norm_relu is not None and type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats
            and bn.momentum is not None and x.is_cuda and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last) and x.shape[0] * x.shape[2] * x.shape[3] > 1
            and not torch.compiler.is_compiling() and not _native.force_reference())


def bn_relu(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """relu(bn(x)); see the module docstring."""
    if not _fusable(bn, x):
        return F.relu(bn(x), inplace=True)   # bn(x) is a fresh tensor (the official ReLU is in place too)
    if bn.training:
        bn.num_batches_tracked.add_(1)
    return batch_norm_relu(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.training, bn.momentum, bn.eps)
