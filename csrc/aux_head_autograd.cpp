// Eager entry point of the fused auxiliary-head loss: the forward operator, the batch reduction
// and the two backward operators tied together by a C++ autograd Function, reached from Python
// as mlaan_fast._C.aux_head_loss_autograd. It computes exactly what the Python custom op
// (mlaan_fast/ops/aux_head.py, used under torch.compile) computes, with the same kernels; it
// exists because this op's measured GPU time at CIFAR sizes was host time (bench_aux_head.py),
// and the Python autograd Function plus a separate reduction are host time.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "aux_head.h"
#include "checks.h"

namespace mlaan_fast::aux_head {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2 };

constexpr const char* kDoubleBackwardError =
    "aux_head_loss: the fused op is differentiable once; its backward cannot run with "
    "create_graph=True (use the reference backend, or the unfused head, for higher derivatives)";

Reduction parse_reduction(const std::string& reduction) {
  if (reduction == "mean") return kMean;
  if (reduction == "sum") return kSum;
  MLAAN_CHECK_VALUE(reduction == "none", "aux_head_loss: reduction must be one of ('mean', 'sum', 'none'), got '",
                    reduction, "'");
  return kNone;
}

// Typed handles of the operators, looked up once: the call then dispatches on the device.
const auto& forward_handle() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mlaan_fast::aux_head_loss_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, double, bool)>();
  return handle;
}

const auto& backward_input_handle() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mlaan_fast::aux_head_loss_backward_input", "")
          .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, double, c10::SymIntArrayRef, at::ScalarType, bool,
                            bool)>();
  return handle;
}

const auto& backward_params_handle() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mlaan_fast::aux_head_loss_backward_params", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                    const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, double, bool)>();
  return handle;
}

bool is_channels_last(const at::Tensor& features) {
  return features.dim() == 4 && !features.is_contiguous() &&
         features.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Inputs: features, weight, bias, target. Outputs: the reduced loss and logits [B, N].
class AuxHeadLoss : public torch::autograd::Function<AuxHeadLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& features, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& target, int64_t reduction,
                               double label_smoothing, bool check_target) {
    auto [losses, logits, pooled, lse] =
        forward_handle().call(features, weight, bias, target, label_smoothing, check_target);
    at::Tensor loss = reduction == kMean ? losses.mean() : reduction == kSum ? losses.sum() : losses;
    ctx->save_for_backward({logits, pooled, lse, weight, target});
    ctx->saved_data["features_shape"] = features.sizes();
    ctx->saved_data["features_dtype"] = features.scalar_type();
    ctx->saved_data["channels_last"] = is_channels_last(features);
    // Absent bias: no autograd edge, so the edges are (features, weight, target).
    ctx->saved_data["bias_dtype"] = bias.has_value() ? c10::IValue(bias->scalar_type()) : c10::IValue();
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["check_target"] = check_target;
    ctx->set_materialize_grads(false);
    return {loss, logits};
  }

  // Differentiable once: the backward operators have no derivative of their own, so building a
  // graph of the gradients (create_graph=True) would let a second derivative come out as zeros.
  // That is refused up front instead.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK_NOT_IMPLEMENTED(!at::GradMode::is_enabled(), kDoubleBackwardError);
    return gradients(ctx, grads);
  }

 private:
  static variable_list gradients(AutogradContext* ctx, const variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &pooled = saved[1], &lse = saved[2], &weight = saved[3], &target = saved[4];
    const int64_t B = logits.size(0);
    const auto cdt = logits.scalar_type();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const double label_smoothing = ctx->saved_data["label_smoothing"].toDouble();
    const bool check_target = ctx->saved_data["check_target"].toBool();
    // d(loss)/d(losses): a reduction's gradient is one value for the whole batch, read with
    // stride 0 by the kernels; no gradient for the loss (logits only) is zero.
    at::Tensor grad_losses;
    if (!grads[0].defined()) {
      grad_losses = at::zeros({B}, logits.options());
    } else if (reduction == kNone) {
      grad_losses = grads[0].to(cdt);
    } else {
      at::Tensor g = grads[0].to(cdt);
      if (reduction == kMean) g = g / static_cast<double>(B);
      grad_losses = g.expand({B});
    }
    std::optional<at::Tensor> grad_logits;
    if (grads[1].defined()) grad_logits = grads[1].to(cdt);

    at::Tensor d_features, d_weight, d_bias;
    if (ctx->needs_input_grad(0)) {
      const auto shape = ctx->saved_data["features_shape"].toIntVector();
      d_features = backward_input_handle().call(
          grad_losses, grad_logits, logits, lse, weight, target, label_smoothing, c10::fromIntArrayRefSlow(shape),
          ctx->saved_data["features_dtype"].toScalarType(), ctx->saved_data["channels_last"].toBool(), check_target);
    }
    const bool need_bias = !ctx->saved_data["bias_dtype"].isNone() && ctx->needs_input_grad(2);
    if (ctx->needs_input_grad(1) || need_bias) {
      auto [gw, gb] = backward_params_handle().call(grad_losses, grad_logits, logits, lse, pooled, target,
                                                    label_smoothing, check_target);
      if (ctx->needs_input_grad(1)) d_weight = gw.to(weight.scalar_type());
      if (need_bias) d_bias = gb.to(ctx->saved_data["bias_dtype"].toScalarType());
    }
    return {d_features, d_weight, d_bias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// -> (loss, logits [B, N]); the Python wrapper has checked the arguments, the operators check again.
std::tuple<at::Tensor, at::Tensor> aux_head_loss_autograd(const at::Tensor& features, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const at::Tensor& target, const std::string& reduction,
                                                          double label_smoothing, bool check_target) {
  const Reduction r = parse_reduction(reduction);
  auto out = AuxHeadLoss::apply(features, weight, bias, target, static_cast<int64_t>(r), label_smoothing, check_target);
  return {out[0], out[1]};
}

}  // namespace

void add_python_bindings(PyObject* module) {
  auto m = pybind11::reinterpret_borrow<pybind11::module_>(module);
  m.def("aux_head_loss_autograd", &aux_head_loss_autograd, pybind11::arg("features"), pybind11::arg("weight"),
        pybind11::arg("bias"), pybind11::arg("target"), pybind11::arg("reduction"), pybind11::arg("label_smoothing"),
        pybind11::arg("check_target"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "features [B,C,H,W] or [B,C], weight [N,C], bias [N] or None, target int64 [B] -> (loss, logits [B,N]); "
        "the fused aux-head loss with its backward, for eager mode (cpu and cuda backends)");
}

}  // namespace mlaan_fast::aux_head
