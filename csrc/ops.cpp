// Op schemas of the groupmamba library and the Python module stub that lets `import groupmamba._C`
// load this shared object (which runs the static TORCH_LIBRARY registrations).
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "groupmamba native kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(groupmamba, m) {
  // Forward: y (u's shape and dtype) and `states`, float32/float64 (B, 4, ceil(L/chunk), d, N):
  // states[b, g, k] is the scan state entering chunk k (steps k*chunk ...), kept for the backward.
  m.def("scan_fwd(Tensor u, Tensor x_proj_weight, Tensor dt_proj_weight, Tensor dt_bias, Tensor A_log, "
        "Tensor D, int chunk) -> (Tensor, Tensor)");
  // Backward: gradients for u and every parameter, recomputing inside each chunk from `states`.
  m.def("scan_bwd(Tensor grad_y, Tensor u, Tensor x_proj_weight, Tensor dt_proj_weight, Tensor dt_bias, "
        "Tensor A_log, Tensor D, Tensor states, int chunk) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The scan followed by each group's gated out_norm: out = LayerNorm_g(y) * SiLU(z), u's dtype, the states and
  // the norm's statistics (B, H, W, 4, 2) for the backward (scan_norm.h).
  m.def("scan_norm_fwd(Tensor u, Tensor z, Tensor x_proj_weight, Tensor dt_proj_weight, Tensor dt_bias, "
        "Tensor A_log, Tensor D, Tensor norm_weight, Tensor norm_bias, float eps, int chunk) "
        "-> (Tensor, Tensor, Tensor)");
  // Gradients for u, z, the scan's parameters and the norm's weight and bias.
  m.def("scan_norm_bwd(Tensor grad_out, Tensor u, Tensor z, Tensor x_proj_weight, Tensor dt_proj_weight, "
        "Tensor dt_bias, Tensor A_log, Tensor D, Tensor norm_weight, Tensor norm_bias, float eps, Tensor states, "
        "Tensor stats, int chunk) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
