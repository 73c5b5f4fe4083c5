"""Ops of GroupMamba: the grouped four-direction selective scan (also with each group's gated out_norm),
the channel modulation, the grouped (gated) LayerNorm, the residual add + LayerNorm (also with the
modulation's pooling) and the residual add, the depthwise conv + activation, a Linear with padded GEMMs and
the stem's BatchNorm + ReLU."""
from .batchnorm import bn_relu
from .dwconv import dwconv_act, keep_preactivation
from .fast_linear import dual_linear, linear
from .modulation import add_layernorm_pool, layernorm_pool, modulate_layernorm
from .naive import grouped_scan_naive
from .norm import add_layer_norm, group_layer_norm
from .reference import GROUPS, grouped_scan_reference, scan_order
from .residual import residual_add
from .scan import check_scan_inputs, grouped_scan, register_native_ops
from .scan_norm import grouped_scan_norm, grouped_scan_norm_reference

register_native_ops()

__all__ = [
    "GROUPS",
    "add_layer_norm",
    "add_layernorm_pool",
    "bn_relu",
    "check_scan_inputs",
    "dual_linear",
    "dwconv_act",
    "group_layer_norm",
    "grouped_scan",
    "grouped_scan_naive",
    "grouped_scan_norm",
    "grouped_scan_norm_reference",
    "grouped_scan_reference",
    "keep_preactivation",
    "linear",
    "layernorm_pool",
    "modulate_layernorm",
    "residual_add",
    "scan_order",
]
