// Host side of the fused auxiliary-head loss (GAP -> Linear -> softmax cross-entropy): input
// checks, the operands handed to a kernel after checks and conversion, the CPU kernels
// (aux_head_cpu.cpp) and the CUDA host half (aux_head_cuda.cpp). The operators themselves are in
// aux_head_ops.cpp: one host function per operator for every device.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <utility>

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

// Checks the out= tensors: contiguous, of the compute dtype and shapes [B], [B,N], [B,C], [B].
void check_forward_outputs(const char* op, const Dims& d, at::ScalarType cdt, const at::Tensor& features,
                           const at::Tensor& losses, const at::Tensor& logits, const at::Tensor& pooled,
                           const at::Tensor& lse);

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

// Checks features_shape [B,C,H,W] or [B,C], features_dtype, layout and weight [N,C] of
// aux_head_loss_backward_input against logits [B,N]. Returns C.
int64_t check_backward_input_shape(const char* op, int64_t B, int64_t N, at::IntArrayRef features_shape,
                                   at::ScalarType features_dtype, bool channels_last, const at::Tensor& weight,
                                   const at::Tensor& logits);

// float64 when either features or weight is float64, else float32: the dtype of every
// accumulator, of logits/pooled/lse/losses and of the weight/bias gradients.
at::ScalarType compute_dtype(const at::Tensor& features, const at::Tensor& weight);

// Raises ValueError naming the first target outside [0, N). On a CUDA tensor: one reduction
// and one device-to-host copy of (min, max), i.e. one host sync; more work only on error. On a
// CPU tensor: a scan.
void check_target_range(const char* op, const at::Tensor& target, int64_t N);

// Forward operands, checked and converted: x is float64 when computing in float64 (else the
// features as they are), w [N,C] and bias [N] (undefined when absent) contiguous in the compute
// dtype, t contiguous; d describes x.
struct ForwardOperands {
  at::Tensor x, w, bias, t;
  Dims d;
  double label_smoothing;
};

struct ForwardOutputs {
  at::Tensor losses, logits, pooled, lse;  // [B], [B,N], [B,C], [B], contiguous, compute dtype
};

// Backward operands, checked, all of the compute dtype but target (int64); contiguous but
// grad_losses, which is read with its own stride (0 for one value expanded over the batch, as a
// mean or sum reduction's gradient is). grad_logits is undefined when absent.
struct BackwardOperands {
  at::Tensor grad_losses, grad_logits, logits, lse, t;
  int64_t grad_losses_stride;
  int64_t B, N;
  double label_smoothing;
};

// CPU kernels (aux_head_cpu.cpp). A target outside [0, N) gives a NaN loss and NaN gradients.
void forward_cpu(const ForwardOperands& in, const ForwardOutputs& out);
// w [N,C] contiguous; out [B,C,H,W] or [B,C] (contiguous, or channels_last) of any floating dtype.
void backward_input_cpu(const BackwardOperands& in, const at::Tensor& w, const at::Tensor& out, bool channels_last);
// pooled [B,C] contiguous -> gw [N,C], gb [N].
void backward_params_cpu(const BackwardOperands& in, const at::Tensor& pooled, const at::Tensor& gw,
                         const at::Tensor& gb);

// CUDA host half (aux_head_cuda.cpp): size limits, stream, launch and error check. Without CUDA
// in the build these raise (they are never reached: no CUDA kernel is registered).
namespace cuda {
// True while the current CUDA stream is capturing a graph (no host sync allowed).
bool stream_is_capturing();
void check_forward_sizes(const char* op, const Dims& d, at::ScalarType cdt);
void check_backward_input_sizes(const char* op, int64_t B, int64_t N, int64_t C, int64_t HW, at::ScalarType cdt);
void check_backward_params_sizes(const char* op, int64_t B, int64_t N, int64_t C);
void forward(const ForwardOperands& in, const ForwardOutputs& out);
void backward_input(const BackwardOperands& in, const at::Tensor& w, const at::Tensor& out, bool channels_last);
void backward_params(const BackwardOperands& in, const at::Tensor& pooled, const at::Tensor& gw, const at::Tensor& gb);
}  // namespace cuda

}  // namespace mlaan_fast::aux_head
