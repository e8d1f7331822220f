// The multi-tensor EMA operator: schema, guards and the table handed to the CPU or CUDA kernel.
// Arguments are checked, with messages for users, by mlaan_fast.ops.ema_update_; the guards here
// only keep a direct call from reading or writing memory the kernels must not touch.
#include <torch/library.h>

#include "ema/ema.h"

TORCH_LIBRARY_FRAGMENT(mlaan_fast, m) {
  // shadow[i] <- decay * shadow[i] + (1 - decay) * live[i], in place, for every i.
  m.def("ema_update_(Tensor(a!)[] shadow, Tensor[] live, float decay) -> ()");
}

namespace mlaan_fast::ema {
namespace {

void guard(at::TensorList shadow, at::TensorList live) {
  TORCH_CHECK_VALUE(shadow.size() == live.size(), "ema_update_: shadow and live differ in length");
  for (size_t i = 0; i < shadow.size(); ++i) {
    const at::Tensor &s = shadow[i], &l = live[i];
    const auto lt = l.scalar_type();
    TORCH_CHECK_VALUE(s.device() == shadow[0].device() && l.device() == shadow[0].device(), "ema_update_: pair ", i,
                      " is not on ", shadow[0].device());
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, "ema_update_: shadow[", i, "] must be float32");
    TORCH_CHECK_TYPE(lt == at::kFloat || lt == at::kBFloat16 || lt == at::kHalf, "ema_update_: live[", i,
                     "] must be float32, bfloat16 or float16");
    TORCH_CHECK_VALUE(s.sizes() == l.sizes() && s.is_contiguous(), "ema_update_: shadow[", i,
                      "] must be contiguous and of live[", i, "]'s shape");
  }
}

void ema_update(at::TensorList shadow, at::TensorList live, double decay) {
  guard(shadow, live);
  const multi_tensor::Table table = multi_tensor::build_table(shadow, live);
  if (table.total() == 0) return;
  if (shadow[0].is_cuda()) {
    update_cuda(table, shadow[0].device(), decay);
  } else {
    update_cpu(table, decay);
  }
}

}  // namespace
}  // namespace mlaan_fast::ema

TORCH_LIBRARY_IMPL(mlaan_fast, CPU, m) { m.impl("ema_update_", &mlaan_fast::ema::ema_update); }

#ifdef MLAAN_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(mlaan_fast, CUDA, m) { m.impl("ema_update_", &mlaan_fast::ema::ema_update); }
#endif
