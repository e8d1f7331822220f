// Shared host-side pieces of the fused auxiliary-head loss (GAP -> Linear -> softmax cross-entropy):
// input checks and the per-sample gradient of the loss with respect to one logit.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace mlaan_fast::aux_head {

// Sizes of one call; 2-D features [B, C] are treated as [B, C, 1, 1].
struct Dims {
  int64_t B, C, H, W, N;
  int64_t stride_b, stride_c, stride_h, stride_w;
};

// Checks features [B,C,H,W] or [B,C], weight [N,C], bias [N] or None, target int64 [B] and the
// smoothing, raising ValueError/TypeError naming `op` and the argument. Range of target not checked.
Dims check_forward_inputs(const char* op, const at::Tensor& features, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& target,
                          double label_smoothing);

// Checks the saved tensors handed to a backward op: grad_losses [B], grad_logits [B,N] or None,
// logits [B,N], lse [B], target int64 [B], all of the compute dtype on one device. Returns (B, N).
std::pair<int64_t, int64_t> check_backward_inputs(const char* op, const at::Tensor& grad_losses,
                                                  const std::optional<at::Tensor>& grad_logits,
                                                  const at::Tensor& logits, const at::Tensor& lse,
                                                  const at::Tensor& target, double label_smoothing);

// check_backward_inputs plus pooled [B, C] of the logits dtype on the logits device. Returns (B, N).
std::pair<int64_t, int64_t> check_backward_params_inputs(const char* op, const at::Tensor& grad_losses,
                                                         const std::optional<at::Tensor>& grad_logits,
                                                         const at::Tensor& logits, const at::Tensor& lse,
                                                         const at::Tensor& pooled, const at::Tensor& target,
                                                         double label_smoothing);

// float64 when either features or weight is float64, else float32: the dtype of every
// accumulator, of logits/pooled/lse/losses and of the weight/bias gradients.
at::ScalarType compute_dtype(const at::Tensor& features, const at::Tensor& weight);

// Raises ValueError naming the first target outside [0, N) (host tensors only).
void check_target_range_cpu(const char* op, const at::Tensor& target, int64_t N);

}  // namespace mlaan_fast::aux_head
