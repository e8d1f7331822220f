// Operator schemas of the mlaan_fast namespace and the Python module entry point.
// Kernels register per backend in csrc/*_cpu.cpp (CPU) and kernels/*.cu (CUDA).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mlaan_fast, m) {
  // shadow[i] <- decay * shadow[i] + (1 - decay) * live[i], in place, for every i.
  m.def("ema_update_(Tensor(a!)[] shadow, Tensor[] live, float decay) -> ()");
  // --- aux_head_loss schemas (GAP -> Linear -> softmax cross-entropy) ---
}

// `import mlaan_fast._C` loads the library, which runs the registrations above; the module
// itself carries no functions (operators are reached through torch.ops.mlaan_fast).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "mlaan_fast operator library", -1, nullptr};
  PyObject* module = PyModule_Create(&def);
  if (module == nullptr) return nullptr;
#ifdef MLAAN_FAST_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  return module;
}
