// Operator schemas of the auxiliary-head loss and the Python module entry point. Its kernels
// register per backend in csrc/aux_head_ops.cpp; the EMA op lives in csrc/ema/.
#include <Python.h>
#include <torch/library.h>

#include <exception>

TORCH_LIBRARY(mlaan_fast, m) {
  // --- aux_head_loss schemas (GAP -> Linear -> softmax cross-entropy), kernels in aux_head_ops.cpp ---
  // Per sample b: pooled = mean_hw(features[b]), logits = weight @ pooled + bias, lse = logsumexp,
  // losses[b] = cross-entropy with label smoothing. Outputs in float32 (float64 if an input is).
  // check_target: raise ValueError for a target outside [0, N). Forward: on every device, one host
  // sync on CUDA, none while the current stream captures a CUDA graph. Backward: on the CPU only.
  // An unchecked out-of-range target gives a NaN loss and NaN gradients, never a number.
  m.def("aux_head_loss_forward(Tensor features, Tensor weight, Tensor? bias, Tensor target, float label_smoothing,"
        " *, bool check_target=True) -> (Tensor losses, Tensor logits, Tensor pooled, Tensor lse)");
  m.def("aux_head_loss_forward_out(Tensor features, Tensor weight, Tensor? bias, Tensor target, float label_smoothing,"
        " Tensor(a!) losses, Tensor(b!) logits, Tensor(c!) pooled, Tensor(d!) lse, *, bool check_target=True) -> ()");
  // d(features) from d(losses) [B] (+ d(logits) [B,N]), in features_dtype and layout. Both backward
  // ops read grad_losses with its own stride: stride 0 (a reduction's gradient, expanded) is fine.
  m.def("aux_head_loss_backward_input(Tensor grad_losses, Tensor? grad_logits, Tensor logits, Tensor lse,"
        " Tensor weight, Tensor target, float label_smoothing, SymInt[] features_shape,"
        " ScalarType features_dtype, bool channels_last, *, bool check_target=True) -> Tensor");
  // (d(weight) [N,C], d(bias) [N]) in the logits dtype, deterministic.
  m.def("aux_head_loss_backward_params(Tensor grad_losses, Tensor? grad_logits, Tensor logits, Tensor lse,"
        " Tensor pooled, Tensor target, float label_smoothing, *, bool check_target=True)"
        " -> (Tensor grad_weight, Tensor grad_bias)");
}

namespace mlaan_fast::aux_head {
void add_python_bindings(PyObject* module);  // aux_head_autograd.cpp
}

// `import mlaan_fast._C` loads the library, which runs the registrations above. Operators are
// reached through torch.ops.mlaan_fast; the module itself carries only the aux-head loss's
// eager autograd entry point (aux_head_loss_autograd) and the build flag with_cuda.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "mlaan_fast operator library", -1, nullptr};
  PyObject* module = PyModule_Create(&def);
  if (module == nullptr) return nullptr;
  try {
    mlaan_fast::aux_head::add_python_bindings(module);
  } catch (const std::exception& e) {
    Py_DECREF(module);
    PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
#ifdef MLAAN_FAST_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  return module;
}
