// The Python module mlaan_fast._C. Importing it loads the library, which runs every op's
// registrations (csrc/<op>/: schemas with TORCH_LIBRARY_FRAGMENT, kernels per dispatch key).
// Operators are reached through torch.ops.mlaan_fast; the module adds the build flag with_cuda and
// one direct entry into the dispatcher for the op whose eager time is host time.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>

namespace {

// mlaan_fast::aux_head_loss through the dispatcher, as torch.ops would call it (same dispatch keys,
// kernels and autograd), without torch.ops' Python layer: measured on the CPU at B=2, forward and
// backward took about 7 us less this way, out of about 100.
std::tuple<at::Tensor, at::Tensor> aux_head_loss(const at::Tensor& features, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                                 const std::string& reduction, double label_smoothing,
                                                 bool check_target) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mlaan_fast::aux_head_loss", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const std::optional<at::Tensor>&, const at::Tensor&,
                                                    c10::string_view, double, bool)>();
  return op.call(features, weight, bias, target, reduction, label_smoothing, check_target);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("aux_head_loss", &aux_head_loss, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "torch.ops.mlaan_fast.aux_head_loss(features, weight, bias, target, reduction, label_smoothing, "
        "check_target) -> (loss, logits), called without torch.ops' Python layer (eager mode)");
#ifdef MLAAN_FAST_WITH_CUDA
  m.attr("with_cuda") = 1;
#else
  m.attr("with_cuda") = 0;
#endif
}
