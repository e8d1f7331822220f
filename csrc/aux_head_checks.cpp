// Input checks of the fused auxiliary-head operators, shared by every device. Each raises a
// Python ValueError/TypeError naming the operator, the argument and the problem.
#include <vector>

#include "aux_head.h"
#include "checks.h"

namespace mlaan_fast::aux_head {

Dims check_forward_inputs(const char* op, const at::Tensor& features, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& target,
                          double label_smoothing) {
  MLAAN_CHECK_VALUE(features.dim() == 2 || features.dim() == 4, op,
                    ": features must be [B, C, H, W] or [B, C], got rank ", features.dim());
  MLAAN_CHECK_TYPE(at::isFloatingType(features.scalar_type()), op,
                   ": features must be floating point, got ", features.scalar_type());
  MLAAN_CHECK_VALUE(weight.dim() == 2, op, ": weight must be [N, C], got shape ", weight.sizes());
  MLAAN_CHECK_TYPE(at::isFloatingType(weight.scalar_type()), op,
                   ": weight must be floating point, got ", weight.scalar_type());
  MLAAN_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": target must be int64, got ",
                   target.scalar_type());
  Dims d{};
  d.B = features.size(0);
  d.C = features.size(1);
  d.H = features.dim() == 4 ? features.size(2) : 1;
  d.W = features.dim() == 4 ? features.size(3) : 1;
  d.N = weight.size(0);
  MLAAN_CHECK_VALUE(d.B > 0, op, ": features has batch size 0 (B must be >= 1)");
  MLAAN_CHECK_VALUE(d.C > 0 && d.H > 0 && d.W > 0, op, ": features has an empty dimension, shape ",
                    features.sizes());
  MLAAN_CHECK_VALUE(d.N > 0, op, ": weight has 0 classes");
  MLAAN_CHECK_VALUE(weight.size(1) == d.C, op, ": weight has ", weight.size(1),
                    " input channels but features have C = ", d.C);
  MLAAN_CHECK_VALUE(target.dim() == 1 && target.size(0) == d.B, op,
                    ": target must be [B] = [", d.B, "], got shape ", target.sizes());
  MLAAN_CHECK_VALUE(weight.device() == features.device(), op, ": weight is on ", weight.device(),
                    " but features are on ", features.device());
  MLAAN_CHECK_VALUE(target.device() == features.device(), op, ": target is on ", target.device(),
                    " but features are on ", features.device());
  if (bias.has_value()) {
    MLAAN_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == d.N, op, ": bias must be [N] = [", d.N,
                      "], got shape ", bias->sizes());
    MLAAN_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), op,
                     ": bias must be floating point, got ", bias->scalar_type());
    MLAAN_CHECK_VALUE(bias->device() == features.device(), op, ": bias is on ", bias->device(),
                      " but features are on ", features.device());
  }
  MLAAN_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    ": label_smoothing must be in [0, 1], got ", label_smoothing);
  d.stride_b = features.stride(0);
  d.stride_c = features.stride(1);
  d.stride_h = features.dim() == 4 ? features.stride(2) : 0;
  d.stride_w = features.dim() == 4 ? features.stride(3) : 0;
  return d;
}

std::pair<int64_t, int64_t> check_backward_inputs(const char* op, const at::Tensor& grad_losses,
                                                  const std::optional<at::Tensor>& grad_logits,
                                                  const at::Tensor& logits, const at::Tensor& lse,
                                                  const at::Tensor& target, double label_smoothing) {
  MLAAN_CHECK_VALUE(logits.dim() == 2 && logits.size(0) > 0 && logits.size(1) > 0, op,
                    ": logits must be a non-empty [B, N], got shape ", logits.sizes());
  const int64_t B = logits.size(0), N = logits.size(1);
  const auto dtype = logits.scalar_type();
  MLAAN_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op,
                   ": logits must be float32 or float64, got ", dtype);
  MLAAN_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": target must be int64, got ",
                   target.scalar_type());
  MLAAN_CHECK_VALUE(target.dim() == 1 && target.size(0) == B, op, ": target must be [", B,
                    "], got shape ", target.sizes());
  MLAAN_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == B, op, ": lse must be [", B, "], got shape ",
                    lse.sizes());
  MLAAN_CHECK_VALUE(grad_losses.dim() == 1 && grad_losses.size(0) == B, op,
                    ": grad_losses must be [", B, "], got shape ", grad_losses.sizes());
  MLAAN_CHECK_TYPE(lse.scalar_type() == dtype && grad_losses.scalar_type() == dtype, op,
                   ": lse and grad_losses must have the logits dtype ", dtype);
  for (const at::Tensor* t : {&grad_losses, &lse, &target}) {
    MLAAN_CHECK_VALUE(t->device() == logits.device(), op, ": all tensors must be on ",
                      logits.device(), ", found one on ", t->device());
  }
  if (grad_logits.has_value()) {
    MLAAN_CHECK_VALUE(grad_logits->sizes() == logits.sizes(), op, ": grad_logits must be [", B,
                      ", ", N, "], got shape ", grad_logits->sizes());
    MLAAN_CHECK_TYPE(grad_logits->scalar_type() == dtype, op,
                     ": grad_logits must have the logits dtype ", dtype);
    MLAAN_CHECK_VALUE(grad_logits->device() == logits.device(), op, ": grad_logits is on ",
                      grad_logits->device(), " but logits are on ", logits.device());
  }
  MLAAN_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    ": label_smoothing must be in [0, 1], got ", label_smoothing);
  return {B, N};
}

at::ScalarType compute_dtype(const at::Tensor& features, const at::Tensor& weight) {
  return (features.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble) ? at::kDouble
                                                                                        : at::kFloat;
}

std::pair<int64_t, int64_t> check_backward_params_inputs(const char* op, const at::Tensor& grad_losses,
                                                         const std::optional<at::Tensor>& grad_logits,
                                                         const at::Tensor& logits, const at::Tensor& lse,
                                                         const at::Tensor& pooled, const at::Tensor& target,
                                                         double label_smoothing) {
  const auto [B, N] = check_backward_inputs(op, grad_losses, grad_logits, logits, lse, target, label_smoothing);
  MLAAN_CHECK_VALUE(pooled.dim() == 2 && pooled.size(0) == B, op, ": pooled must be [", B, ", C], got shape ",
                    pooled.sizes());
  MLAAN_CHECK_TYPE(pooled.scalar_type() == logits.scalar_type(), op, ": pooled must have the logits dtype");
  MLAAN_CHECK_VALUE(pooled.device() == logits.device(), op, ": pooled is on ", pooled.device(),
                    " but logits are on ", logits.device());
  return {B, N};
}

void check_forward_outputs(const char* op, const Dims& d, at::ScalarType cdt, const at::Tensor& features,
                           const at::Tensor& losses, const at::Tensor& logits, const at::Tensor& pooled,
                           const at::Tensor& lse) {
  const std::pair<const char*, const at::Tensor*> outs[] = {{"losses", &losses}, {"logits", &logits}, {"pooled", &pooled}, {"lse", &lse}};
  const std::vector<int64_t> shapes[] = {{d.B}, {d.B, d.N}, {d.B, d.C}, {d.B}};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& o = *outs[i].second;
    MLAAN_CHECK_VALUE(o.sizes() == at::IntArrayRef(shapes[i]), op, ": ", outs[i].first, " must have shape ",
                      at::IntArrayRef(shapes[i]), ", got ", o.sizes());
    MLAAN_CHECK_TYPE(o.scalar_type() == cdt, op, ": ", outs[i].first, " must be ", cdt, ", got ", o.scalar_type());
    MLAAN_CHECK_VALUE(o.is_contiguous(), op, ": ", outs[i].first, " must be contiguous");
    MLAAN_CHECK_VALUE(o.device() == features.device(), op, ": ", outs[i].first, " is on ", o.device(),
                      " but features are on ", features.device());
  }
}

int64_t check_backward_input_shape(const char* op, int64_t B, int64_t N, at::IntArrayRef features_shape,
                                   at::ScalarType features_dtype, bool channels_last, const at::Tensor& weight,
                                   const at::Tensor& logits) {
  MLAAN_CHECK_VALUE(features_shape.size() == 2 || features_shape.size() == 4, op,
                    ": features_shape must have 2 or 4 entries, got ", features_shape);
  MLAAN_CHECK_VALUE(features_shape[0] == B, op, ": features_shape[0] = ", features_shape[0], " but B = ", B);
  MLAAN_CHECK_VALUE(!channels_last || features_shape.size() == 4, op, ": channels_last needs 4-D features");
  MLAAN_CHECK_TYPE(at::isFloatingType(features_dtype), op, ": features_dtype must be floating point");
  MLAAN_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == N && weight.size(1) == features_shape[1], op,
                    ": weight must be [", N, ", ", features_shape[1], "], got shape ", weight.sizes());
  MLAAN_CHECK_VALUE(weight.device() == logits.device(), op, ": weight is on ", weight.device(),
                    " but logits are on ", logits.device());
  return features_shape[1];
}

namespace {

// Raises ValueError naming the first element of the host tensor target outside [0, N).
void check_host_targets(const char* op, const at::Tensor& target_cpu, int64_t N) {
  const at::Tensor t = target_cpu.contiguous();
  const int64_t* p = t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    MLAAN_CHECK_VALUE(p[i] >= 0 && p[i] < N, op, ": target[", i, "] = ", p[i],
                      " is outside the class range [0, ", N, ")");
  }
}

}  // namespace

void check_target_range(const char* op, const at::Tensor& target, int64_t N) {
  // On the CPU a plain scan: a dispatched reduction costs more than the scan of a batch of labels.
  if (target.is_cpu()) return check_host_targets(op, target, N);
  at::Tensor extremes = at::empty({2}, target.options());
  at::Tensor lo = extremes.select(0, 0), hi = extremes.select(0, 1);
  at::aminmax_out(lo, hi, target);
  const at::Tensor host = extremes.cpu();  // the one host sync of the check
  const int64_t* p = host.const_data_ptr<int64_t>();
  if (p[0] < 0 || p[1] >= N) {
    check_host_targets(op, target.cpu(), N);
    MLAAN_CHECK_VALUE(false, op, ": target changed while it was checked");
  }
}

}  // namespace mlaan_fast::aux_head
