// The fused auxiliary-head loss operators: every schema of the op, and one host function per
// kernel operator for every device (guards, allocation, dtype conversion, the target-range check),
// which then runs the CPU kernels (aux_head_cpu.cpp) or the CUDA launchers (aux_head_cuda.cpp ->
// kernels/aux_head.cu). The arguments were checked, with messages for users, by
// mlaan_fast.ops.aux_head_loss: the guards here only keep a direct call inside the memory the
// kernels index.
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>

#include "aux_head/aux_head.h"

TORCH_LIBRARY_FRAGMENT(mlaan_fast, m) {
  // loss = reduction(cross-entropy(weight @ mean_hw(features) + bias, target, label_smoothing)) and
  // the logits [B, N], differentiable once (aux_head_autograd.cpp). reduction: mean, sum or none.
  m.def("aux_head_loss(Tensor features, Tensor weight, Tensor? bias, Tensor target, str reduction,"
        " float label_smoothing, bool check_target) -> (Tensor loss, Tensor logits)");
  // Per sample b: pooled = mean_hw(features[b]), logits = weight @ pooled + bias, lse = logsumexp,
  // losses[b] = cross-entropy with label smoothing. Outputs in float32 (float64 if an input is).
  // check_target: ValueError for a target outside [0, N) before any kernel (one host sync on CUDA,
  // none while the current stream captures a CUDA graph). An unchecked out-of-range target gives a
  // NaN loss and NaN gradients, never a number.
  m.def("aux_head_loss_forward(Tensor features, Tensor weight, Tensor? bias, Tensor target,"
        " float label_smoothing, bool check_target) -> (Tensor losses, Tensor logits, Tensor pooled, Tensor lse)");
  // d(features) from d(losses) [B] (+ d(logits) [B,N]), in features_dtype and layout. Both backward
  // ops read grad_losses with its own stride: stride 0 (a reduction's gradient, expanded) is fine.
  m.def("aux_head_loss_backward_input(Tensor grad_losses, Tensor? grad_logits, Tensor logits, Tensor lse,"
        " Tensor weight, Tensor target, float label_smoothing, SymInt[] features_shape,"
        " ScalarType features_dtype, bool channels_last) -> Tensor");
  // (d(weight) [N,C], d(bias) [N]) in the logits dtype, summed over the batch in a fixed order.
  m.def("aux_head_loss_backward_params(Tensor grad_losses, Tensor? grad_logits, Tensor logits, Tensor lse,"
        " Tensor pooled, Tensor target, float label_smoothing) -> (Tensor grad_weight, Tensor grad_bias)");
}

namespace mlaan_fast::aux_head {

namespace {

// Sizes and strides of features [B,C,H,W] or [B,C] with N classes.
Dims dims_of(const at::Tensor& features, int64_t N) {
  const bool four = features.dim() == 4;
  return {features.size(0), features.size(1), four ? features.size(2) : 1, four ? features.size(3) : 1, N,
          features.stride(0), features.stride(1), four ? features.stride(2) : 0, four ? features.stride(3) : 0};
}

// float64 when either features or weight is float64, else float32: the dtype of every
// accumulator, of logits/pooled/lse/losses and of the weight/bias gradients.
at::ScalarType compute_dtype(const at::Tensor& features, const at::Tensor& weight) {
  return (features.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble) ? at::kDouble
                                                                                        : at::kFloat;
}

// ValueError naming the first element of the host tensor `target` outside [0, N), in the words of
// mlaan_fast.ops's own check.
void scan_targets(const at::Tensor& target, int64_t N) {
  const at::Tensor t = target.contiguous();
  const int64_t* p = t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < N, "aux_head_loss: target[", i, "] = ", p[i],
                      " is outside the class range [0, ", N, ")");
  }
}

// On the CPU a scan: a dispatched reduction costs more than the scan of a batch of labels. On CUDA
// one reduction and one device-to-host copy of (min, max), i.e. one host sync; more only on error.
void check_target_range(const at::Tensor& target, int64_t N) {
  if (target.is_cpu()) return scan_targets(target, N);
  at::Tensor extremes = at::empty({2}, target.options());
  at::Tensor lo = extremes.select(0, 0), hi = extremes.select(0, 1);
  at::aminmax_out(lo, hi, target);
  const at::Tensor host = extremes.cpu();
  const int64_t* p = host.const_data_ptr<int64_t>();
  if (p[0] < 0 || p[1] >= N) {
    scan_targets(target.cpu(), N);
    TORCH_CHECK_VALUE(false, "aux_head_loss: target changed while it was checked");
  }
}

// The device to make current for a kernel on t: its CUDA device, none for a CPU tensor.
std::optional<c10::Device> cuda_device(const at::Tensor& t) {
  return t.is_cuda() ? std::make_optional(t.device()) : std::nullopt;
}

void guard_forward(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const at::Tensor& target) {
  const auto dev = features.device();
  const bool floating = at::isFloatingType(features.scalar_type()) && at::isFloatingType(weight.scalar_type()) &&
                        (!bias || at::isFloatingType(bias->scalar_type()));
  TORCH_CHECK_TYPE(floating && target.scalar_type() == at::kLong,
                   "aux_head_loss_forward: features, weight and bias must be floating point, target int64");
  TORCH_CHECK_VALUE((features.dim() == 2 || features.dim() == 4) && features.numel() > 0 && weight.dim() == 2 &&
                        weight.size(0) > 0 && weight.size(1) == features.size(1) && target.dim() == 1 &&
                        target.size(0) == features.size(0) && weight.device() == dev && target.device() == dev &&
                        (!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->device() == dev)),
                    "aux_head_loss_forward: needs non-empty features [B,C,H,W] or [B,C], weight [N,C], bias [N] "
                    "or None and target [B] on one device");
}

// (B, N) of a backward op's saved tensors, after their guards.
std::pair<int64_t, int64_t> guard_backward(const char* op, const at::Tensor& grad_losses,
                                           const std::optional<at::Tensor>& grad_logits, const at::Tensor& logits,
                                           const at::Tensor& lse, const at::Tensor& target, const at::Tensor& other) {
  const auto dt = logits.scalar_type();
  const auto dev = logits.device();
  TORCH_CHECK_TYPE((dt == at::kFloat || dt == at::kDouble) && lse.scalar_type() == dt &&
                       grad_losses.scalar_type() == dt && (!grad_logits || grad_logits->scalar_type() == dt) &&
                       target.scalar_type() == at::kLong,
                   op, ": logits, lse and the gradients must all be float32 or all float64, target int64");
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.numel() > 0, op, ": logits must be a non-empty [B, N]");
  const int64_t B = logits.size(0), N = logits.size(1);
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == B && grad_losses.dim() == 1 && grad_losses.size(0) == B &&
                        target.dim() == 1 && target.size(0) == B &&
                        (!grad_logits || grad_logits->sizes() == logits.sizes()),
                    op, ": lse, grad_losses and target must be [B] and grad_logits [B, N]");
  TORCH_CHECK_VALUE(lse.device() == dev && grad_losses.device() == dev && target.device() == dev &&
                        other.device() == dev && (!grad_logits || grad_logits->device() == dev),
                    op, ": all tensors must be on one device");
  return {B, N};
}

// Converts the operands (see ForwardOperands) and runs the kernel of the features' device.
void run_forward(const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const at::Tensor& target, double label_smoothing, const ForwardOutputs& out) {
  const auto cdt = out.losses.scalar_type();
  const at::Tensor x = cdt == at::kDouble ? features.to(at::kDouble) : features;
  const ForwardOperands in{x, weight.to(cdt).contiguous(), bias.has_value() ? bias->to(cdt).contiguous() : at::Tensor(),
                           target.contiguous(), dims_of(x, weight.size(0)), label_smoothing};
  if (features.is_cuda()) cuda::forward(in, out);
  else forward_cpu(in, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_op(const at::Tensor& features, const at::Tensor& weight,
                                                                      const std::optional<at::Tensor>& bias,
                                                                      const at::Tensor& target, double label_smoothing,
                                                                      bool check_target) {
  guard_forward(features, weight, bias, target);
  const Dims d = dims_of(features, weight.size(0));
  const auto cdt = compute_dtype(features, weight);
  const c10::OptionalDeviceGuard device_guard(cuda_device(features));
  if (features.is_cuda()) cuda::check_forward_sizes(d, cdt);
  // No host sync while the current CUDA stream captures a graph: the target is then unchecked.
  if (check_target && !(target.is_cuda() && cuda::stream_is_capturing())) check_target_range(target, d.N);
  const auto opts = features.options().dtype(cdt);
  const ForwardOutputs out{at::empty({d.B}, opts), at::empty({d.B, d.N}, opts), at::empty({d.B, d.C}, opts),
                           at::empty({d.B}, opts)};
  run_forward(features, weight, bias, target, label_smoothing, out);
  return {out.losses, out.logits, out.pooled, out.lse};
}

BackwardOperands backward_operands(const at::Tensor& grad_losses, const std::optional<at::Tensor>& grad_logits,
                                   const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& target,
                                   double label_smoothing) {
  return {grad_losses, grad_logits.has_value() ? grad_logits->contiguous() : at::Tensor(), logits.contiguous(),
          lse.contiguous(), target.contiguous(), grad_losses.stride(0), logits.size(0), logits.size(1),
          label_smoothing};
}

// d(features)[b, c, h, w] = (sum_n dlogits[b, n] W[n, c]) / (H W), in the requested dtype and layout.
at::Tensor backward_input_op(const at::Tensor& grad_losses, const std::optional<at::Tensor>& grad_logits,
                             const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& weight,
                             const at::Tensor& target, double label_smoothing, at::IntArrayRef features_shape,
                             at::ScalarType features_dtype, bool channels_last) {
  const char* op = "aux_head_loss_backward_input";
  const auto [B, N] = guard_backward(op, grad_losses, grad_logits, logits, lse, target, weight);
  const size_t rank = features_shape.size();
  TORCH_CHECK_VALUE((rank == 2 || (rank == 4 && features_shape[2] > 0 && features_shape[3] > 0)) &&
                        features_shape[0] == B && (rank == 4 || !channels_last) && weight.dim() == 2 &&
                        weight.size(0) == N && weight.size(1) == features_shape[1] &&
                        at::isFloatingType(features_dtype) && at::isFloatingType(weight.scalar_type()),
                    op, ": features_shape must be [B, C, H, W] or [B, C] (channels_last: 4-D), of a floating "
                    "dtype, and weight a floating [N, C]");
  const int64_t C = features_shape[1], HW = rank == 4 ? features_shape[2] * features_shape[3] : 1;
  const auto cdt = logits.scalar_type();
  const c10::OptionalDeviceGuard device_guard(cuda_device(logits));
  if (logits.is_cuda()) cuda::check_backward_input_sizes(B, N, C, HW, cdt);
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
                                                      double label_smoothing) {
  const char* op = "aux_head_loss_backward_params";
  const auto [B, N] = guard_backward(op, grad_losses, grad_logits, logits, lse, target, pooled);
  TORCH_CHECK_VALUE(pooled.dim() == 2 && pooled.size(0) == B && pooled.scalar_type() == logits.scalar_type(), op,
                    ": pooled must be [B, C] of the logits dtype");
  const int64_t C = pooled.size(1);
  const c10::OptionalDeviceGuard device_guard(cuda_device(logits));
  if (logits.is_cuda()) cuda::check_backward_params_sizes(B, N, C);
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
  m.impl("aux_head_loss_backward_input", &mlaan_fast::aux_head::backward_input_op);
  m.impl("aux_head_loss_backward_params", &mlaan_fast::aux_head::backward_params_op);
}

#ifdef MLAAN_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(mlaan_fast, CUDA, m) {
  m.impl("aux_head_loss_forward", &mlaan_fast::aux_head::forward_op);
  m.impl("aux_head_loss_backward_input", &mlaan_fast::aux_head::backward_input_op);
  m.impl("aux_head_loss_backward_params", &mlaan_fast::aux_head::backward_params_op);
}
#endif
