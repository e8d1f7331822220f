// The fused auxiliary-head operators (schemas in ops.cpp): one host function per operator for
// every device. Checks, allocation, dtype conversion and the target-range check happen here;
// the kernels then run on the CPU (aux_head_cpu.cpp) or through the CUDA launchers
// (aux_head_cuda.cpp -> kernels/aux_head.cu).
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "aux_head.h"
#include "checks.h"

namespace mlaan_fast::aux_head {
namespace {

// The device to make current for a kernel on t: its CUDA device, none for a CPU tensor.
std::optional<c10::Device> cuda_device(const at::Tensor& t) {
  return t.is_cuda() ? std::make_optional(t.device()) : std::nullopt;
}

// Forward checks that come before any work: CUDA size limits, then the target range unless
// check_target is false or the current CUDA stream is capturing a graph (a host sync would break
// the capture); an unchecked out-of-range target gives a NaN loss.
void forward_prechecks(const char* op, const at::Tensor& features, const at::Tensor& target, const Dims& d,
                       at::ScalarType cdt, bool check_target) {
  if (features.is_cuda()) cuda::check_forward_sizes(op, d, cdt);
  if (check_target && !(target.is_cuda() && cuda::stream_is_capturing())) check_target_range(op, target, d.N);
}

// Converts the operands (see ForwardOperands) and runs the kernel of the features' device.
void run_forward(const char* op, const at::Tensor& features, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias, const at::Tensor& target, double label_smoothing,
                 const Dims& d, const ForwardOutputs& out) {
  const auto cdt = out.losses.scalar_type();
  const bool widen = cdt == at::kDouble && features.scalar_type() != at::kDouble;
  const at::Tensor x = widen ? features.to(at::kDouble) : features;
  const ForwardOperands in{x, weight.to(cdt).contiguous(), bias.has_value() ? bias->to(cdt).contiguous() : at::Tensor(),
                           target.contiguous(),
                           widen ? check_forward_inputs(op, x, weight, bias, target, label_smoothing) : d,
                           label_smoothing};
  if (features.is_cuda()) cuda::forward(in, out);
  else forward_cpu(in, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_op(const at::Tensor& features, const at::Tensor& weight,
                                                                      const std::optional<at::Tensor>& bias,
                                                                      const at::Tensor& target, double label_smoothing,
                                                                      bool check_target) {
  const char* op = "aux_head_loss_forward";
  const Dims d = check_forward_inputs(op, features, weight, bias, target, label_smoothing);
  const auto cdt = compute_dtype(features, weight);
  const c10::OptionalDeviceGuard guard(cuda_device(features));
  forward_prechecks(op, features, target, d, cdt, check_target);
  const auto opts = features.options().dtype(cdt);
  const ForwardOutputs out{at::empty({d.B}, opts), at::empty({d.B, d.N}, opts), at::empty({d.B, d.C}, opts),
                           at::empty({d.B}, opts)};
  run_forward(op, features, weight, bias, target, label_smoothing, d, out);
  return {out.losses, out.logits, out.pooled, out.lse};
}

void forward_out_op(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& target, double label_smoothing, at::Tensor losses, at::Tensor logits,
                    at::Tensor pooled, at::Tensor lse, bool check_target) {
  const char* op = "aux_head_loss_forward_out";
  const Dims d = check_forward_inputs(op, features, weight, bias, target, label_smoothing);
  const auto cdt = compute_dtype(features, weight);
  check_forward_outputs(op, d, cdt, features, losses, logits, pooled, lse);
  const c10::OptionalDeviceGuard guard(cuda_device(features));
  forward_prechecks(op, features, target, d, cdt, check_target);
  run_forward(op, features, weight, bias, target, label_smoothing, d, {losses, logits, pooled, lse});
}

BackwardOperands backward_operands(const at::Tensor& grad_losses, const std::optional<at::Tensor>& grad_logits,
                                   const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& target,
                                   double label_smoothing) {
  return {grad_losses, grad_logits.has_value() ? grad_logits->contiguous() : at::Tensor(), logits.contiguous(),
          lse.contiguous(), target.contiguous(), grad_losses.stride(0), logits.size(0), logits.size(1),
          label_smoothing};
}

// The backward ops check the target range on the CPU only (no host sync in a CUDA backward: the
// forward has checked); an unchecked out-of-range target gives NaN gradients.
void backward_target_check(const char* op, bool check_target, const at::Tensor& target, int64_t N) {
  if (check_target && target.is_cpu()) check_target_range(op, target, N);
}

// d(features)[b, c, h, w] = (sum_n dlogits[b, n] W[n, c]) / (H W), in the requested dtype and layout.
at::Tensor backward_input_op(const at::Tensor& grad_losses, const std::optional<at::Tensor>& grad_logits,
                             const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& weight,
                             const at::Tensor& target, double label_smoothing, at::IntArrayRef features_shape,
                             at::ScalarType features_dtype, bool channels_last, bool check_target) {
  const char* op = "aux_head_loss_backward_input";
  const auto [B, N] = check_backward_inputs(op, grad_losses, grad_logits, logits, lse, target, label_smoothing);
  const int64_t C = check_backward_input_shape(op, B, N, features_shape, features_dtype, channels_last, weight, logits);
  const int64_t HW = features_shape.size() == 4 ? features_shape[2] * features_shape[3] : 1;
  const auto cdt = logits.scalar_type();
  const c10::OptionalDeviceGuard guard(cuda_device(logits));
  if (logits.is_cuda()) cuda::check_backward_input_sizes(op, B, N, C, HW, cdt);
  backward_target_check(op, check_target, target, N);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty(features_shape, logits.options().dtype(features_dtype).memory_format(format));
  const BackwardOperands in = backward_operands(grad_losses, grad_logits, logits, lse, target, label_smoothing);
  const at::Tensor w = weight.to(cdt).contiguous();
  if (logits.is_cuda()) cuda::backward_input(in, w, out, channels_last);
  else backward_input_cpu(in, w, out, channels_last);
  return out;
}

// (d(weight) [N, C], d(bias) [N]) in the logits dtype, summed over the batch in a fixed order.
std::tuple<at::Tensor, at::Tensor> backward_params_op(const at::Tensor& grad_losses,
                                                      const std::optional<at::Tensor>& grad_logits,
                                                      const at::Tensor& logits, const at::Tensor& lse,
                                                      const at::Tensor& pooled, const at::Tensor& target,
                                                      double label_smoothing, bool check_target) {
  const char* op = "aux_head_loss_backward_params";
  const auto [B, N] = check_backward_params_inputs(op, grad_losses, grad_logits, logits, lse, pooled, target,
                                                   label_smoothing);
  const int64_t C = pooled.size(1);
  const c10::OptionalDeviceGuard guard(cuda_device(logits));
  if (logits.is_cuda()) cuda::check_backward_params_sizes(op, B, N, C);
  backward_target_check(op, check_target, target, N);
  at::Tensor gw = at::empty({N, C}, logits.options()), gb = at::empty({N}, logits.options());
  const BackwardOperands in = backward_operands(grad_losses, grad_logits, logits, lse, target, label_smoothing);
  const at::Tensor p = pooled.contiguous();
  if (logits.is_cuda()) cuda::backward_params(in, p, gw, gb);
  else backward_params_cpu(in, p, gw, gb);
  return {gw, gb};
}

}  // namespace
}  // namespace mlaan_fast::aux_head

TORCH_LIBRARY_IMPL(mlaan_fast, CPU, m) {
  m.impl("aux_head_loss_forward", &mlaan_fast::aux_head::forward_op);
  m.impl("aux_head_loss_forward_out", &mlaan_fast::aux_head::forward_out_op);
  m.impl("aux_head_loss_backward_input", &mlaan_fast::aux_head::backward_input_op);
  m.impl("aux_head_loss_backward_params", &mlaan_fast::aux_head::backward_params_op);
}

#ifdef MLAAN_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(mlaan_fast, CUDA, m) {
  m.impl("aux_head_loss_forward", &mlaan_fast::aux_head::forward_op);
  m.impl("aux_head_loss_forward_out", &mlaan_fast::aux_head::forward_out_op);
  m.impl("aux_head_loss_backward_input", &mlaan_fast::aux_head::backward_input_op);
  m.impl("aux_head_loss_backward_params", &mlaan_fast::aux_head::backward_params_op);
}
#endif
