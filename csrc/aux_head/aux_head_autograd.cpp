// The composite operator aux_head_loss of the C++ backends (cpu, cuda): the forward kernel
// operator, the batch reduction and the two backward kernel operators tied together by one C++
// autograd Function, registered at the Autograd key; below autograd (inference mode) the forward
// and the reduction alone. It is C++ because at CIFAR sizes this op's measured GPU time was host
// time (bench_aux_head.py), and a Python autograd Function plus a separate reduction are host time.
// Shapes are kept as SymInts, so that torch.compile can trace through it with dynamic shapes.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace mlaan_fast::aux_head {
namespace {

// The backward kernels have no derivative of their own: a graph of the gradients would give zero
// second derivatives, so building one is refused. The Triton backend's autograd (Python, usable
// without this library) says the same; a test holds the two texts equal.
constexpr const char* kDoubleBackwardError =
    "aux_head_loss: the fused op is differentiable once; its backward cannot run with "
    "create_graph=True (use the reference backend, or the unfused head, for higher derivatives)";

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2 };

Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "mean") return kMean;
  if (reduction == "sum") return kSum;
  TORCH_CHECK_VALUE(reduction == "none", "aux_head_loss: reduction must be mean, sum or none");
  return kNone;
}

// Typed handles of the kernel operators, looked up once: each call then dispatches on the device.
const auto& forward_op() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mlaan_fast::aux_head_loss_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, double, bool)>();
  return handle;
}

const auto& backward_input_op() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mlaan_fast::aux_head_loss_backward_input", "")
          .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, double, c10::SymIntArrayRef, at::ScalarType, bool)>();
  return handle;
}

const auto& backward_params_op() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mlaan_fast::aux_head_loss_backward_params", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                    const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, double)>();
  return handle;
}

at::Tensor reduce(const at::Tensor& losses, Reduction reduction) {
  return reduction == kMean ? losses.mean() : reduction == kSum ? losses.sum() : losses;
}

bool is_channels_last(const at::Tensor& features) {
  return features.dim() == 4 && !features.is_contiguous() && features.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Inputs: features, weight, bias, target. Outputs: the reduced loss and logits [B, N].
class AuxHeadLoss : public torch::autograd::Function<AuxHeadLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& features, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& target, int64_t reduction,
                               double label_smoothing, bool check_target) {
    auto [losses, logits, pooled, lse] = forward_op().call(features, weight, bias, target, label_smoothing, check_target);
    ctx->save_for_backward({logits, pooled, lse, weight, target});
    ctx->saved_data["features_shape"] = features.sym_sizes();
    ctx->saved_data["features_dtype"] = features.scalar_type();
    ctx->saved_data["channels_last"] = is_channels_last(features);
    // Absent bias: no autograd edge, so the edges are (features, weight, target).
    ctx->saved_data["bias_dtype"] = bias.has_value() ? c10::IValue(bias->scalar_type()) : c10::IValue();
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->set_materialize_grads(false);
    return {reduce(losses, static_cast<Reduction>(reduction)), logits};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK_NOT_IMPLEMENTED(!at::GradMode::is_enabled(), kDoubleBackwardError);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &pooled = saved[1], &lse = saved[2], &weight = saved[3], &target = saved[4];
    const c10::SymInt B = logits.sym_size(0);
    const auto cdt = logits.scalar_type();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const double label_smoothing = ctx->saved_data["label_smoothing"].toDouble();
    // d(loss)/d(losses): a reduction's gradient is one value for the whole batch, read with
    // stride 0 by the kernels; no gradient for the loss (logits only) is zero.
    at::Tensor grad_losses;
    if (!grads[0].defined()) {
      grad_losses = at::zeros_symint({B}, logits.options());
    } else if (reduction == kNone) {
      grad_losses = grads[0].to(cdt);
    } else {
      at::Tensor g = grads[0].to(cdt);
      if (reduction == kMean) g = g.div(c10::Scalar(B));
      grad_losses = g.expand_symint({B});
    }
    std::optional<at::Tensor> grad_logits;
    if (grads[1].defined()) grad_logits = grads[1].to(cdt);

    at::Tensor d_features, d_weight, d_bias;
    if (ctx->needs_input_grad(0)) {
      const std::vector<c10::SymInt> shape = ctx->saved_data["features_shape"].toSymIntVector();
      d_features = backward_input_op().call(grad_losses, grad_logits, logits, lse, weight, target, label_smoothing,
                                            shape, ctx->saved_data["features_dtype"].toScalarType(),
                                            ctx->saved_data["channels_last"].toBool());
    }
    const bool need_bias = !ctx->saved_data["bias_dtype"].isNone() && ctx->needs_input_grad(2);
    if (ctx->needs_input_grad(1) || need_bias) {
      auto [gw, gb] = backward_params_op().call(grad_losses, grad_logits, logits, lse, pooled, target, label_smoothing);
      if (ctx->needs_input_grad(1)) d_weight = gw.to(weight.scalar_type());
      if (need_bias) d_bias = gb.to(ctx->saved_data["bias_dtype"].toScalarType());
    }
    return {d_features, d_weight, d_bias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The Autograd-key kernel: (loss, logits [B, N]) with the backward above.
std::tuple<at::Tensor, at::Tensor> loss_autograd(const at::Tensor& features, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                                 c10::string_view reduction, double label_smoothing, bool check_target) {
  auto out = AuxHeadLoss::apply(features, weight, bias, target, static_cast<int64_t>(parse_reduction(reduction)),
                                label_smoothing, check_target);
  return {out[0], out[1]};
}

// Below autograd: the forward and the reduction.
std::tuple<at::Tensor, at::Tensor> loss_forward(const at::Tensor& features, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                                c10::string_view reduction, double label_smoothing, bool check_target) {
  const Reduction r = parse_reduction(reduction);
  auto [losses, logits, pooled, lse] = forward_op().call(features, weight, bias, target, label_smoothing, check_target);
  return {reduce(losses, r), logits};
}

}  // namespace
}  // namespace mlaan_fast::aux_head

TORCH_LIBRARY_IMPL(mlaan_fast, Autograd, m) { m.impl("aux_head_loss", &mlaan_fast::aux_head::loss_autograd); }

TORCH_LIBRARY_IMPL(mlaan_fast, CompositeExplicitAutograd, m) {
  m.impl("aux_head_loss", &mlaan_fast::aux_head::loss_forward);
}
